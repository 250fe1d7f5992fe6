"""Per-unit statistics for S2FT's selection strategies (paper Table 4): one score per query head or channel.

- weight: L2 norm of the unit's slice of the trained projections (o columns, v rows, down columns, up/gate rows);
- activation: L2 norm of the unit's activations entering o / down (the head's attention output, the channel's
  gated activation) over the calibration tokens, padding excluded;
- weight_activation: the product of the two;
- gradient: L2 norm of the unit's slice of the summed loss gradient of the trained projections.

`reduce` sums a statistic over ranks (identity on one process), so every rank scores the same numbers.
Scoring passes run in eval mode and update nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from sparse_lightning.scoring.score_groups import DEFAULT_SCORE_MEMORY, groups_within
from sparse_lightning.modes import eval_mode, scoring_mode
from sparse_lightning.structure.families import COLUMN_ROLES, KV_ROLES, CoupledGroup, base_linear

Reduce = Callable[[Tensor], Tensor]
LossFn = Callable[[dict[str, Any]], Tensor]


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def unit_norms_sq(group: CoupledGroup, tensors: dict[str, Tensor]) -> Tensor:
    """Sum of squares per unit over the given role tensors (weights or their gradients); a KV head's share
    counts for each of its query heads."""
    total = torch.zeros(group.num_units, dtype=torch.float64)
    for role, tensor in tensors.items():
        per_slice = tensor.detach().double().pow(2).sum(0 if role in COLUMN_ROLES else 1).cpu()
        per_unit = per_slice[group.all_positions(role)].view(group.units_of(role), group.unit_size).sum(1)
        total += per_unit.repeat_interleave(group.group_size) if role in KV_ROLES else per_unit
    return total


def weight_scores(model: nn.Module, groups: Sequence[CoupledGroup], roles: Sequence[str]) -> dict[str, Tensor]:
    return {g.owner: unit_norms_sq(g, {r: base_linear(model, g.roles[r]).weight for r in roles if r in g.roles}).sqrt()
            for g in groups}


@contextmanager
def _recording_inputs(model: nn.Module, groups: Sequence[CoupledGroup], mask: dict[str, Tensor | None]):
    """Sum of squared inputs per unit of each group's o / down projection (tokens where `mask['current']` is 1)."""
    sums = {g.owner: torch.zeros(g.num_units, dtype=torch.float64) for g in groups}
    handles = []
    for group in groups:
        def hook(module: nn.Module, args: tuple, group: CoupledGroup = group) -> None:
            x = args[0].detach()
            current = mask["current"]
            if current is not None and current.shape == x.shape[:-1]:
                x = x[current.bool()]
            per_unit = x.double().pow(2).reshape(-1, group.num_units, group.unit_size).sum((0, 2))
            sums[group.owner] += per_unit.cpu()

        column_role = "o" if group.kind == "heads" else "down"
        handles.append(model.get_submodule(group.roles[column_role]).register_forward_pre_hook(hook))
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def activation_scores(model: nn.Module, groups: Sequence[CoupledGroup], batches: Iterable[dict[str, Any]],
                      loss_fn: LossFn, reduce: Reduce = _identity) -> dict[str, Tensor]:
    mask: dict[str, Tensor | None] = {"current": None}
    with eval_mode(model), _recording_inputs(model, groups, mask) as sums:
        for batch in batches:
            mask["current"] = batch.get("attention_mask")
            loss_fn(batch)
    return {owner: reduce(total).sqrt() for owner, total in sums.items()}


def gradient_scores(model: nn.Module, groups: Sequence[CoupledGroup], roles: Sequence[str],
                    batches: Sequence[dict[str, Any]], loss_fn: LossFn, reduce: Reduce = _identity,
                    score_memory: float = DEFAULT_SCORE_MEMORY) -> dict[str, Tensor]:
    """Loss gradients of the trained projections only (every other parameter frozen meanwhile), summed over batches
    and ranks, reduced to per-unit norms and dropped, in bounded memory: from one batch each weight's gradient is
    reduced as it forms; from several, the sums are kept for groups of weights holding at most `score_memory` x all
    their gradients at once, the batches re-run once per group (`scoring/score_groups.py`). Either way the numbers
    are those of summing every gradient at once."""
    keys = {(g.owner, r): base_linear(model, g.roles[r]).weight for g in groups for r in roles if r in g.roles}
    weights = {id(w): w for w in keys.values()}  # a fused projection serves several roles
    roles_of = {i: [key for key, w in keys.items() if id(w) == i] for i in weights}
    by_owner = {g.owner: g for g in groups}
    parts: dict[tuple[str, str], Tensor] = {}

    def to_units(weight: Tensor) -> None:
        """This weight's share of each of its units' squared norms, from its (summed) gradient, which it drops."""
        if weight.grad is not None:
            grad = reduce(weight.grad)
            for owner, role in roles_of[id(weight)]:
                parts[(owner, role)] = unit_norms_sq(by_owner[owner], {role: grad})
        weight.grad = None

    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    handles = []
    try:
        with scoring_mode(model):
            if len(batches) == 1:
                for weight in weights.values():
                    weight.requires_grad_(True)
                    handles.append(weight.register_post_accumulate_grad_hook(to_units))
                loss_fn(batches[0]).backward()
            else:
                sizes = {i: w.numel() * w.element_size() for i, w in weights.items()}
                for chunk in groups_within(sizes, score_memory):
                    for i in chunk:
                        weights[i].requires_grad_(True)
                    for batch in batches:
                        loss_fn(batch).backward()
                    for i in chunk:
                        to_units(weights[i])
                        weights[i].requires_grad_(False)
        return {g.owner: _summed_roles(g, roles, parts).sqrt() for g in groups}
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags.items():
            param.grad = None
            param.requires_grad_(flag)


def _summed_roles(group: CoupledGroup, roles: Sequence[str], parts: dict[tuple[str, str], Tensor]) -> Tensor:
    """The roles' shares added in `roles` order, as `unit_norms_sq` adds them."""
    total = torch.zeros(group.num_units, dtype=torch.float64)
    for role in roles:
        if (group.owner, role) in parts:
            total += parts[(group.owner, role)]
    return total
