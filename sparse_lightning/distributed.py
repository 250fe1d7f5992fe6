"""Rank collectives, in one place: every method selects from the same numbers and the same indices on every rank.

NCCL only reduces CUDA tensors and gloo only CPU ones; `_collective` moves a tensor where the backend wants it
and the result comes back on the tensor's own device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def _collective(tensor: Tensor) -> Tensor:
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def all_reduce_sum_(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum a statistic over ranks in place, so every rank selects from the same numbers."""
    if is_distributed():
        moved = _collective(tensor)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def reduce_scatter_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's slice of `tensor` summed over ranks: dim 0 cut into equal slices in rank order (its length must
    divide by the world size), so no rank receives the whole sum."""
    moved = _collective(tensor.contiguous())
    out = moved.new_empty((moved.shape[0] // world_size(group), *moved.shape[1:]))
    dist.reduce_scatter_single(out, moved, group=group)
    return out.to(tensor.device)


def all_gather_cat(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's `tensor` (one shape on every rank) concatenated along dim 0 in rank order; the same on every
    rank, bit for bit."""
    moved = _collective(tensor.contiguous())
    out = moved.new_empty((moved.shape[0] * world_size(group), *moved.shape[1:]))
    dist.all_gather_single(out, moved, group=group)
    return out.to(tensor.device)


def broadcast_from_rank_zero_(tensor: Tensor) -> Tensor:
    """Make a selection bitwise identical on every rank (ties could otherwise break differently)."""
    if is_distributed():
        moved = _collective(tensor)
        dist.broadcast(moved, src=0)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


@contextmanager
def own_process_group() -> Iterator[dist.ProcessGroup | None]:
    """A process group of every rank, for collectives issued inside backward, where FSDP2 issues its own on the
    default group (None on one process). Every rank must enter it: creating a group is a collective."""
    if not is_distributed():
        yield None
        return
    group = dist.new_group()
    try:
        yield group
    finally:
        dist.destroy_process_group(group)
