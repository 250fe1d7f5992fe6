"""Switching a model to eval mode for a while without losing any submodule's own train/eval mode."""

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
