"""Reading and writing 1-D per-slot tensors whether they are plain or FSDP2-sharded DTensors.

Every rank calls these with the same full-size arguments (statistics are all-reduced first), so a
slot update needs no communication: each rank writes the part of the full tensor it holds.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank (an all-gather for a sharded DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def set_parameter_data_(param: Tensor, data: Tensor) -> None:
    """`param.data = data`, also for an FSDP2-sharded parameter: a DTensor's `.data` setter changes its reported dtype
    but leaves the local shard (what FSDP2 all-gathers and the optimizer steps) as it was, so swap the whole tensor,
    as `nn.Module._apply` does for such parameters (the parameter object stays the same)."""
    if isinstance(param, DTensor):
        torch.utils.swap_tensors(param, torch.nn.Parameter(data, requires_grad=param.requires_grad))
    else:
        param.data = data


def local_tensor(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_slot_range(tensor: Tensor) -> tuple[int, int]:
    """[start, end) of the global slots this rank holds: all of them unless FSDP2 shards dim 0."""
    if not isinstance(tensor, DTensor):
        return 0, tensor.shape[0]
    if tensor.device_mesh.ndim != 1 or not isinstance(tensor.placements[0], Shard) or tensor.placements[0].dim != 0:
        raise NotImplementedError(f"per-slot updates support plain tensors and 1-D meshes sharded on dim 0, got "
                                  f"placements {tensor.placements}")
    total, ranks = tensor.shape[0], tensor.device_mesh.size()
    chunk = -(-total // ranks)  # torch.chunk's split, as FSDP2 shards
    start = min(tensor.device_mesh.get_local_rank() * chunk, total)
    return start, start + tensor.to_local().shape[0]


@torch.no_grad()
def write_slots_(tensor: Tensor, slots: Tensor, values: Tensor | float) -> None:
    """`tensor[slots] = values` for a plain or sharded 1-D tensor (same slots and values on every rank)."""
    if not isinstance(tensor, DTensor):
        tensor[slots] = values if isinstance(values, float) else values.to(tensor.dtype)
        return
    full = torch.zeros(tensor.shape, dtype=tensor.dtype, device=slots.device)
    mask = torch.zeros(tensor.shape, dtype=torch.bool, device=slots.device)
    full[slots] = values if isinstance(values, float) else values.to(tensor.dtype)
    mask[slots] = True
    local = tensor.to_local()
    local.copy_(torch.where(_local_part(tensor, mask).to(local.device), _local_part(tensor, full).to(local.device), local))


def _local_part(template: DTensor, full: Tensor) -> Tensor:
    """This rank's part of `full` under `template`'s sharding, cut locally (no communication)."""
    return distribute_tensor(full, template.device_mesh, template.placements, src_data_rank=None).to_local()
