"""Co-permutation of a coupled group's weights, its record on the owning module, and its undoing.

An `order` lists, for each new position, the original unit (query head or channel) placed there. Applying
it to every role of the group leaves outputs unchanged; the order is kept as a buffer on the group's owner
(`s2ft_head_order` / `s2ft_channel_order`), so checkpoints carry it and export can restore the original layout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_lightning.structure.records import ORDER_BUFFERS
from sparse_lightning.structure.families import COLUMN_ROLES, KV_ROLES, CoupledGroup, base_linear, find_groups


def order_buffer(group: CoupledGroup) -> str:
    return ORDER_BUFFERS[0] if group.kind == "heads" else ORDER_BUFFERS[1]


def check_order(group: CoupledGroup, order: Tensor) -> None:
    """A permutation of the units that keeps every query head with its KV head's group."""
    if not torch.equal(order.sort().values, torch.arange(group.num_units, device=order.device)):
        raise ValueError(f"{group.owner}: order must be a permutation of {group.num_units} units")
    if group.group_size > 1:
        kv_of_position = order.view(-1, group.group_size) // group.group_size
        if not (kv_of_position == kv_of_position[:, :1]).all():
            raise ValueError(f"{group.owner}: this order moves a query head out of its KV group "
                             f"({group.group_size} query heads share each KV head)")


def role_order(group: CoupledGroup, role: str, order: Tensor) -> Tensor:
    """The order in the role's own units: KV heads follow their query-head groups."""
    if role in KV_ROLES:
        return order[:: group.group_size] // group.group_size
    return order


def role_gathers(model: nn.Module, group: CoupledGroup, order: Tensor) -> list[tuple[nn.Module, int, Tensor]]:
    """Per Linear of the group: the dim its units lie along and the (CPU) index that gathers the co-permuted weight
    from the original one, `permuted = weight.index_select(dim, index)` (and the bias, for rows). Each role moves its
    own rows/columns; the rest of a fused weight (the other roles' part) stays put."""
    gathers = []
    for role, path in group.roles.items():
        linear = base_linear(model, path)
        dim = 1 if role in COLUMN_ROLES else 0
        index = torch.arange(linear.weight.shape[dim])
        index[group.all_positions(role)] = group.positions(role, role_order(group, role, order.cpu()))
        gathers.append((linear, dim, index))
    return gathers


def recorded_gathers(model: nn.Module) -> dict[tuple[int, str], tuple[int, Tensor]]:
    """(id of a Linear, "weight" or "bias") -> (dim, index) for every weight the model's order records say is
    co-permuted: what a base still on the meta device (loaded by shards after FSDP2 wraps it,
    `modules/sharded_loading.py`) reads to hold the values `permute_group` would have moved."""
    if not any(name in module._buffers for module in model.modules() for name in ORDER_BUFFERS):
        return {}
    gathers: dict[tuple[int, str], tuple[int, Tensor]] = {}
    for group in find_groups(model):
        order = model.get_submodule(group.owner)._buffers.get(order_buffer(group))
        if order is None:
            continue
        for linear, dim, index in role_gathers(model, group, order):
            gathers[(id(linear), "weight")] = (dim, index)
            if dim == 0 and linear.bias is not None:
                gathers[(id(linear), "bias")] = (0, index)
    return gathers


@torch.no_grad()
def _apply(model: nn.Module, group: CoupledGroup, order: Tensor) -> None:
    """Move the group's weights; a weight on the meta device has no values yet: the shard loader reads them
    permuted, from the order record (`recorded_gathers`)."""
    for linear, dim, index in role_gathers(model, group, order):
        if linear.weight.is_meta:
            continue
        index = index.to(linear.weight.device)
        linear.weight.copy_(linear.weight.index_select(dim, index))
        if dim == 0 and linear.bias is not None:
            linear.bias.copy_(linear.bias[index])


def permute_group(model: nn.Module, group: CoupledGroup, order: Tensor) -> None:
    """Co-permute the group's weights in place (same parameter objects) and record `order` on its owner."""
    owner = model.get_submodule(group.owner)
    name = order_buffer(group)
    if hasattr(owner, name):
        raise RuntimeError(f"{group.owner} is already co-permuted; permute a model once")
    order = order.to(torch.long)
    check_order(group, order)
    _apply(model, group, order)
    device = next(owner.parameters()).device
    owner.register_buffer(name, order.to(torch.get_default_device() if device.type == "meta" else device))


@torch.no_grad()
def permute_as_recorded(model: nn.Module, orders: dict[str, Tensor]) -> None:
    """Co-permute the base as `orders` records (`owner.s2ft_head_order` -> order), for a checkpoint that holds the
    records but not the permuted weights (a delta checkpoint). A group already permuted another way is put back
    first (exact: permutations only move values); a quantized base cannot move, so that is refused."""
    if not orders:
        return
    groups = {f"{group.owner}.{order_buffer(group)}": group for group in find_groups(model)}
    for key, order in orders.items():
        group = groups.get(key)
        if group is None:
            raise ValueError(f"the checkpoint records a co-permutation {key!r} that this model has no group for: was it "
                             "trained on another model?")
        owner = model.get_submodule(group.owner)
        buffer = order_buffer(group)
        current = owner._buffers.get(buffer)
        if current is not None and torch.equal(current.cpu(), order.cpu().to(current.dtype)):
            continue
        if current is not None:
            if any(hasattr(base_linear(model, path), "qweight") for path in group.roles.values()):
                raise ValueError(f"{group.owner}: this run selected other S2FT units than the checkpoint and its base "
                                 "is quantized, so it cannot be re-permuted: resume with load_selection (the file "
                                 "save_selection wrote)")
            _apply(model, group, torch.argsort(owner._buffers.pop(buffer).cpu()))
        permute_group(model, group, order)


def restore_original_layout(model: nn.Module) -> nn.Module:
    """Undo every recorded co-permutation and drop the records: the original HF layout again.

    Fold block deltas first (`merge_and_unwrap`): a block is a delta on the *permuted* weight. A model
    that was never co-permuted is returned as is, whatever its architecture.
    """
    if not any(name in module._buffers for module in model.modules() for name in ORDER_BUFFERS):
        return model
    for group in find_groups(model):
        owner = model.get_submodule(group.owner)
        name = order_buffer(group)
        if name in owner._buffers:
            order = owner._buffers.pop(name)
            _apply(model, group, torch.argsort(order.cpu()))
    return model
