"""S2FT's co-permutation records: a buffer on the module owning the coupled weights (attention, MLP) listing the
original unit (query head, FFN channel) now at each position, so checkpoints carry it and export can undo it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ORDER_BUFFERS = ("s2ft_head_order", "s2ft_channel_order")


def attach_orders_from_state_dict(model: nn.Module, state_dict: dict[str, Tensor], prefix: str = "") -> None:
    """Register a checkpoint's order buffers on their modules, so the state dict fits a fresh model."""
    for key, order in state_dict.items():
        owner_name, _, buffer = key[len(prefix):].rpartition(".")
        if key.startswith(prefix) and buffer in ORDER_BUFFERS:
            owner = model.get_submodule(owner_name)
            if not hasattr(owner, buffer):
                owner.register_buffer(buffer, order.clone())


def order_records(model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """Every co-permutation record of `model`, by its key in the model's state dict (owner path + buffer name)."""
    return {prefix + name: buffer.detach().cpu().clone() for name, buffer in model.named_buffers()
            if name.rpartition(".")[2] in ORDER_BUFFERS}


def orders_in_state_dict(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A checkpoint's co-permutation records, keyed without `prefix`."""
    return {key[len(prefix):]: value for key, value in state_dict.items()
            if key.startswith(prefix) and key.rpartition(".")[2] in ORDER_BUFFERS}


def same_orders(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key].cpu(), b[key].cpu()) for key in a)
