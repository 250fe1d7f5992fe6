"""From per-unit scores to the units a layer trains, and the co-permutation that puts them first.

Grouped-query attention (G query heads per KV head) limits which head sets can be made contiguous without
moving a query head away from its KV head. Two correct options (`gqa`):

- "groups" (default): select whole KV groups (one KV head, its G query heads and their o columns); head
  counts are multiples of G. Any number of groups is contiguous once the groups are permuted.
- "heads": select query heads individually but within that rule: whole groups by group score, then the best
  `count % G` heads of one more group. Groups move as wholes and heads move only within their group, so k/v
  rows are never split; the selected heads still come first (full groups, then the partial one).

Without GQA (G = 1, e.g. BERT) both are plain per-head selection. Ties break toward the lower index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from sparse_lightning.structure.families import CoupledGroup

GQAMode = Literal["groups", "heads"]


def _ranked(scores: Tensor) -> list[int]:
    """Indices by descending score, stable (ties keep index order)."""
    return torch.sort(scores, descending=True, stable=True).indices.tolist()


def choose_units(group: CoupledGroup, scores: Tensor, count: int, gqa: GQAMode = "groups") -> list[int]:
    """The `count` best units of one layer under the GQA rule (scores: one per query head or channel; higher
    is better, so negate them to pick the smallest). Returns sorted unit indices."""
    if not 0 <= count <= group.num_units:
        raise ValueError(f"{group.owner}: cannot select {count} of {group.num_units} {group.kind}")
    size = group.group_size
    if size == 1:
        return sorted(_ranked(scores)[:count])
    full, partial = divmod(count, size)
    if partial and gqa == "groups":
        raise ValueError(gqa_count_error(group, count))
    by_group = scores.view(-1, size)
    chosen = _ranked(by_group.sum(1))[:full]
    selected = [g * size + i for g in chosen for i in range(size)]
    if partial:
        rest = [g for g in range(by_group.shape[0]) if g not in chosen]
        best = [torch.sort(by_group[g], descending=True, stable=True) for g in rest]
        sums = torch.stack([b.values[:partial].sum() for b in best])
        pick = _ranked(sums)[0]
        selected += [rest[pick] * size + i for i in best[pick].indices[:partial].tolist()]
    return sorted(selected)


def gqa_count_error(group: CoupledGroup, count: int) -> str:
    size = group.group_size
    return (f"{group.owner}: {group.num_units} query heads share {group.num_units // size} KV heads in groups of "
            f"{size}; with gqa='groups' the heads trained per layer must be a multiple of {size}, got {count}: set "
            f"num_heads to one of {list(range(size, group.num_units + 1, size))} or use gqa='heads'")


def allocate_global(groups: Sequence[CoupledGroup], scores: dict[str, Tensor], total: int,
                    gqa: GQAMode = "groups") -> dict[str, int]:
    """Split `total` units over layers by pooling every layer's units and keeping the best `total` (whole KV
    groups with gqa='groups'). Returns units per group owner (zero for layers that get none)."""
    step = groups[0].group_size if gqa == "groups" else 1
    pooled = torch.cat([scores[g.owner].view(-1, step).sum(1) for g in groups])
    owners = [g.owner for g in groups for _ in range(g.num_units // step)]
    counts = dict.fromkeys((g.owner for g in groups), 0)
    for index in _ranked(pooled)[: total // step]:
        counts[owners[index]] += step
    return counts


def selection_order(group: CoupledGroup, selected: Sequence[int]) -> Tensor:
    """The co-permutation putting `selected` (sorted) first: under GQA whole groups move, full ones before the
    one partial group, and heads move only within their group."""
    chosen = sorted(set(selected))
    size = group.group_size
    if size == 1:
        rest = [u for u in range(group.num_units) if u not in set(chosen)]
        return torch.tensor(chosen + rest, dtype=torch.long)
    per_group: dict[int, list[int]] = {}
    for head in chosen:
        per_group.setdefault(head // size, []).append(head)
    partial = [g for g, heads in per_group.items() if len(heads) < size]
    if len(partial) > 1:
        raise ValueError(f"{group.owner}: heads {chosen} fill {len(partial)} KV groups partially; at most one "
                         "group may be partial for the selected heads to be contiguous (see gqa='heads')")
    touched = [g for g in per_group if g not in partial] + partial
    order: list[int] = []
    for g in touched + [g for g in range(group.num_units // size) if g not in per_group]:
        heads = per_group.get(g, [])
        order += heads + [h for h in range(g * size, (g + 1) * size) if h not in heads]
    return torch.tensor(order, dtype=torch.long)
