"""Switching a model to eval mode for a while without losing any submodule's own train/eval mode, and turning on
its activation checkpointing under whichever name the installed transformers gives it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


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
    """`eval_mode` for passes that score from gradients, keeping the model's gradient checkpointing: transformers
    recomputes a checkpointed layer only while that layer is training, so such layers (their own flag, none of their
    submodules': dropout stays off) are left training meanwhile, and a scoring pass holds what a checkpointed
    training step holds."""
    with eval_mode(model):
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True
        yield model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers >= 5 calls it `activation_checkpointing_enable` (the old `gradient_checkpointing_enable` warns that
    it goes in v6); older versions (>= 4.45, which we support) have only the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
