"""Switching a model to eval mode for a while without losing any submodule's own train/eval mode (and checkpointing
its activations meanwhile for scoring passes), and turning on its activation checkpointing under whichever name the
installed transformers gives it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off inside the block; afterwards every module gets back the mode it had (Lightning keeps
    per-module modes, so a blanket `model.train()` would be wrong)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`eval_mode` for passes that score from gradients, with activation checkpointing on meanwhile wherever the
    model supports it: a scoring pass is a sparse run's one-shot peak (it forms dense weight gradients beside the
    activations), and recomputing each layer in backward costs one more forward per scoring batch. transformers
    recomputes a checkpointed layer only while that layer is training, so such layers (their own flag, none of their
    submodules': dropout stays off) are left training meanwhile."""
    with eval_mode(model), checkpointed_layers(model) as layers:
        for module in layers:
            module.training = True
        yield model


@contextmanager
def checkpointed_layers(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Every module with transformers' `gradient_checkpointing` flag checkpoints inside the block (as
    `_set_gradient_checkpointing` sets them), with the model's own checkpointing function if it has one, else the
    non-reentrant one (it needs no input that requires a gradient), and the configs' `use_cache` is off (a scoring pass
    caches nothing; left on, transformers warns that checkpointing turns it off); yields those modules; afterwards
    all is as it was."""
    saved, caching = [], {}
    for module in model.modules():
        if isinstance(getattr(module, "gradient_checkpointing", None), bool):
            saved.append((module, {name: module.__dict__[name] for name in _CHECKPOINTING_ATTRIBUTES
                                   if name in module.__dict__}))
        if getattr(config := getattr(module, "config", None), "use_cache", False) is True:
            caching[id(config)] = config
    for module, _ in saved:
        if getattr(module, "_gradient_checkpointing_func", None) is None:
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        module.gradient_checkpointing = True
    for config in caching.values():
        config.use_cache = False
    try:
        yield [module for module, _ in saved]
    finally:
        for config in caching.values():
            config.use_cache = True
        for module, attributes in saved:
            for name in _CHECKPOINTING_ATTRIBUTES:
                if name in attributes:
                    setattr(module, name, attributes[name])
                else:
                    module.__dict__.pop(name, None)


_CHECKPOINTING_ATTRIBUTES = ("gradient_checkpointing", "_gradient_checkpointing_func")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers >= 5 calls it `activation_checkpointing_enable` (the old `gradient_checkpointing_enable` warns that
    it goes in v6); older versions (>= 4.45, which we support) have only the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
