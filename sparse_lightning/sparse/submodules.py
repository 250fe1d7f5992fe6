"""Swapping a submodule by its dotted name: how every delta layer and quantized weight goes in and comes out (a
module of its own, so frozen_delta.py and quantized.py do not import each other)."""

from __future__ import annotations

from torch import nn


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
