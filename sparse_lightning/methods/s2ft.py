"""S2FT (Yang et al., 2024) as a plain algorithm: select a few heads and FFN channels per layer, co-permute them to the front, and
train dense blocks on them with partial back-propagation.

Everything happens in `S2FT.attach` (from the module's `configure_model` under a Trainer), before the strategy wraps or shards the
model and before the optimizer exists: the selection (random, weight norm, or from calibration batches of
the training data), the co-permutation, and block layers of a size fixed by the ratios/counts. Data-driven
selections read the first `calibration_batches` training batches from the module's `Calibration` there (the model
is still whole on every rank, so this works under DDP and FSDP2 alike); statistics are summed over ranks and the
selection is broadcast from rank 0, so every rank permutes identically. A selection can be saved to a JSON file
and loaded instead (e.g. computed once on one process for a large sharded run).

The checkpoint holds the blocks, their original-layout positions and the co-permutation record of every group
(not the base: loading co-permutes the rebuilt base as recorded, `structure.permute_as_recorded`), so resuming
restores the exact state and export can un-permute. A resumed run selects again before the checkpoint's selection
replaces it (its base is put back and permuted as recorded), so block shapes must come out the same: they always do
with uniform allocation; with allocation='global' and a data-driven strategy, resume with `load_selection` pointing
at the file `save_selection` wrote (required under FSDP2 or a quantized base, which cannot be re-permuted). The
module attaches only when fitting: a checkpoint being evaluated brings its own blocks and permutation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from sparse_lightning.distributed import all_reduce_sum_, broadcast_from_rank_zero_, is_rank_zero
from sparse_lightning.meta_weights import whole_weights
from sparse_lightning.methods.calibration import Calibration, require
from sparse_lightning.methods.seeding import run_seed
from sparse_lightning.sparse.block import ColumnBlockLinear, RowBlockLinear, block_delta_layers
from sparse_lightning.sparse.submodules import replace_submodule
from sparse_lightning.structure.families import COLUMN_ROLES, KV_ROLES, CoupledGroup, base_linear, find_groups
from sparse_lightning.structure.permute import permute_group, role_order
from sparse_lightning.scoring.score_groups import DEFAULT_SCORE_MEMORY, check_score_memory
from sparse_lightning.structure.scores import activation_scores, gradient_scores, weight_scores
from sparse_lightning.structure.select import GQAMode, allocate_global, choose_units, gqa_count_error, selection_order

SelectBy = Literal["random", "weight", "activation", "weight_activation", "gradient"]
SELECT_BY = ("random", "weight", "activation", "weight_activation", "gradient")
HEAD_ROLES, CHANNEL_ROLES = ("o", "v"), ("down", "up", "gate")
SELECTION_FORMAT = "sparse_lightning.s2ft_selection/1"
#: Paper defaults (LLaMA-7B): 5.2% of heads for o, 2% of channels for down.
DEFAULT_HEAD_RATIO, DEFAULT_CHANNEL_RATIO = 0.052, 0.02


def _check_budget(unit: str, ratio: float | None, count: int | None) -> None:
    if ratio is not None and count is not None:
        raise ValueError(f"give {unit}_ratio or num_{unit}s, not both")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"{unit}_ratio must be in (0, 1], got {ratio}")
    if count is not None and count < 1:
        raise ValueError(f"num_{unit}s must be a positive integer, got {count}")


class S2FT:
    """Select heads and channels, co-permute them to the front and put dense blocks on them, before any
    optimizer exists. Settings are those of `S2FTStructureCallback` (its docstring explains each)."""

    method = "s2ft"

    def __init__(
        self,
        head_ratio: float | None = None,
        num_heads: int | None = None,
        channel_ratio: float | None = None,
        num_channels: int | None = None,
        train: list[str] | None = None,
        allocation: Literal["uniform", "global"] = "uniform",
        select_by: SelectBy = "random",
        order: Literal["largest", "smallest"] = "largest",
        calibration_batches: int = 4,
        seed: int | None = None,
        gqa: GQAMode = "groups",
        load_selection: str | None = None,
        save_selection: str | None = None,
        score_memory: float = DEFAULT_SCORE_MEMORY,
    ) -> None:
        self.train = list(train) if train is not None else ["o", "down"]
        unknown = [r for r in self.train if r not in HEAD_ROLES + CHANNEL_ROLES]
        if unknown or not self.train:
            raise ValueError(f"train must name projections among {list(HEAD_ROLES + CHANNEL_ROLES)} (q and k are not "
                             f"offered: the paper's ablation ranks them last), got {self.train}")
        _check_budget("head", head_ratio, num_heads)
        _check_budget("channel", channel_ratio, num_channels)
        for kind, roles, given in (("head", HEAD_ROLES, (head_ratio, num_heads)),
                                   ("channel", CHANNEL_ROLES, (channel_ratio, num_channels))):
            if any(v is not None for v in given) and not set(roles) & set(self.train):
                raise ValueError(f"a {kind} budget is set but train={self.train} has no {kind} projection "
                                 f"({' / '.join(roles)}): add one to train or drop the budget")
        choices = {"allocation": (allocation, ("uniform", "global")), "select_by": (select_by, SELECT_BY),
                   "order": (order, ("largest", "smallest")), "gqa": (gqa, ("groups", "heads"))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        self.head_ratio, self.num_heads = head_ratio, num_heads
        self.channel_ratio, self.num_channels = channel_ratio, num_channels
        self.allocation, self.select_by, self.order, self.gqa = allocation, select_by, order, gqa
        self.calibration_batches, self.seed = calibration_batches, seed
        self.load_selection, self.save_selection = load_selection, save_selection
        self.score_memory = check_score_memory(score_memory)

    @property
    def attaches_from_shapes(self) -> bool:
        """A random or loaded selection reads no weight value, and weight norms read one layer's weights at a time
        from the checkpoint: under FSDP2 the base then stays on the meta device while S2FT co-permutes it (only the
        order is recorded) and each rank reads its permuted rows after sharding. Calibration passes run the whole
        model, so those selections load it whole first."""
        return bool(self.load_selection) or self.select_by in ("random", "weight")

    def attach(self, model: nn.Module, calibration: Calibration | None = None) -> None:
        """Select, co-permute and add the blocks. Data-driven selections read `calibration` (from the module under
        a Trainer; `Calibration.from_batches(model, batches)` without one)."""
        if block_delta_layers(model):
            return
        every_group = find_groups(model)
        self._check_roles(model, every_group)
        groups = [g for g in every_group if self.roles(g)]
        if self.load_selection:
            selection = read_selection(self.load_selection, groups)
            self._check_loaded_counts(groups, selection)
            how = f"loaded from {self.load_selection}:"
        else:
            selection = self._broadcast(groups, self.select(model, groups, calibration))
            if self.save_selection and is_rank_zero():
                write_selection(self.save_selection, model, groups, selection, self.describe())
            how = f"{self.select_by} ({self.order}) selection,"
        added = self.apply(model, groups, selection)
        rank_zero_info(f"S2FT: {how} {added:,} trainable block entries in "
                       f"{len(block_delta_layers(model))} projections of {len({g.layer for g in groups})} layers")

    def roles(self, group: CoupledGroup) -> list[str]:
        """The group's projections this run trains."""
        return [r for r in self.train if r in group.roles]

    def _check_roles(self, model: nn.Module, groups: list[CoupledGroup]) -> None:
        available = {r for g in groups for r in g.roles}
        missing = [r for r in self.train if r not in available]
        if missing:
            raise ValueError(f"{model.config.model_type} blocks have no {missing} projection; choose train among "
                             f"{sorted(available & set(HEAD_ROLES + CHANNEL_ROLES))}")
        for group in groups[:2]:
            for role in self.roles(group):
                spec = group.fused.get(role)
                if spec is None:
                    continue
                if spec.interleaved:
                    raise ValueError(f"{model.config.model_type} interleaves {'/'.join(spec.fused)} per head in "
                                     f"{group.roles[role]}, so the selected {role} rows cannot form one block: "
                                     f"train {role} is not offered here (train o, down or up)")
                shared = [r for r in self.train if r != role and r in spec.fused]
                if shared:
                    raise ValueError(f"{role} and {shared[0]} share one fused weight ({group.roles[role]}) in "
                                     f"{model.config.model_type}: train one of them")

    # ------------------------------------------------------------------------------------------ selection

    def count(self, group: CoupledGroup) -> int:
        """Units this layer trains under uniform allocation (the per-layer mean under global allocation)."""
        heads = group.kind == "heads"
        count = self.num_heads if heads else self.num_channels
        ratio = (self.head_ratio or DEFAULT_HEAD_RATIO) if heads else (self.channel_ratio or DEFAULT_CHANNEL_RATIO)
        noun = "query heads" if heads else "FFN channels"
        if count is not None:
            if count > group.num_units:
                raise ValueError(f"num_{'heads' if heads else 'channels'}={count} but {group.owner} has "
                                 f"{group.num_units} {noun} per layer: choose at most {group.num_units}")
            if heads and self.gqa == "groups" and count % group.group_size:
                raise ValueError(gqa_count_error(group, count))
            return count
        step = group.group_size if heads and self.gqa == "groups" else 1
        return max(1, round(ratio * group.num_units / step)) * step

    def _check_loaded_counts(self, groups: list[CoupledGroup], selection: dict[str, list[int]]) -> None:
        """A loaded selection must train what the configured budget asks (when one is set explicitly)."""
        for group in groups:
            heads = group.kind == "heads"
            budget = (self.num_heads, self.head_ratio) if heads else (self.num_channels, self.channel_ratio)
            if budget == (None, None):
                continue
            wanted, loaded = self.count(group), len(selection.get(group.owner, []))
            if self.allocation == "uniform" and wanted != loaded:
                noun = "query heads" if heads else "FFN channels"
                raise ValueError(f"{self.load_selection} selects {loaded} {noun} in {group.owner} but the budget asks "
                                 f"for {wanted}: drop the budget to use the file's counts, or save a new selection")

    def scores(self, model: nn.Module, groups: list[CoupledGroup], calibration: Calibration | None) -> dict[str, Tensor]:
        """One score per unit and group, higher = preferred (negated for order='smallest')."""
        if self.select_by == "random":
            generator = torch.Generator().manual_seed(run_seed(self.seed))
            scores = {g.owner: torch.rand(g.num_units, generator=generator, dtype=torch.float64) for g in groups}
        else:
            roles = sorted({r for g in groups for r in self.roles(g)})
            if self.select_by == "weight":
                scores = _weight_scores(model, groups, roles)
            else:
                calibration = require(calibration, f"S2FT select_by={self.select_by!r}")
                batches, loss_fn = calibration.batches(self.calibration_batches), calibration.loss_fn
                if self.select_by == "gradient":
                    scores = gradient_scores(model, groups, roles, batches, loss_fn, _all_reduce, self.score_memory)
                else:
                    scores = activation_scores(model, groups, batches, loss_fn, _all_reduce)
                if self.select_by == "weight_activation":
                    weights = weight_scores(model, groups, roles)
                    scores = {owner: score * weights[owner] for owner, score in scores.items()}
        return {owner: -s if self.order == "smallest" else s for owner, s in scores.items()}

    def select(self, model: nn.Module, groups: list[CoupledGroup],
               calibration: Calibration | None = None) -> dict[str, list[int]]:
        """Selected units (query heads / channels, original indices) per group owner."""
        scores = self.scores(model, groups, calibration)
        counts = {g.owner: self.count(g) for g in groups}
        if self.allocation == "global":
            for kind in ("heads", "channels"):
                of_kind = [g for g in groups if g.kind == kind]
                if of_kind:
                    total = sum(counts[g.owner] for g in of_kind)
                    counts.update(allocate_global(of_kind, scores, total, self.gqa))
        return {g.owner: choose_units(g, scores[g.owner], counts[g.owner], self.gqa)
                for g in groups if counts[g.owner]}

    def _broadcast(self, groups: list[CoupledGroup], selection: dict[str, list[int]]) -> dict[str, list[int]]:
        """Rank 0's selection on every rank (scores are reduced already; this makes ties bitwise safe)."""
        masks = torch.zeros(sum(g.num_units for g in groups), dtype=torch.int32)
        offsets = {}
        offset = 0
        for g in groups:
            offsets[g.owner] = offset
            masks[[offset + u for u in selection.get(g.owner, [])]] = 1
            offset += g.num_units
        broadcast_from_rank_zero_(masks)
        chosen = {g.owner: torch.nonzero(masks[offsets[g.owner]:offsets[g.owner] + g.num_units]).flatten().tolist()
                  for g in groups}
        return {owner: units for owner, units in chosen.items() if units}

    # ------------------------------------------------------------------------------------------ applying

    def apply(self, model: nn.Module, groups: list[CoupledGroup], selection: dict[str, list[int]]) -> int:
        """Co-permute each selected group and wrap its trained projections in block layers; returns the
        number of trainable block entries."""
        added = 0
        for group in groups:
            selected = selection.get(group.owner)
            if not selected:
                continue
            order = selection_order(group, selected)
            permute_group(model, group, order)
            for role in self.roles(group):
                units = role_order(group, role, order)
                count = math.ceil(len(selected) / group.group_size) if role in KV_ROLES else len(selected)
                positions = group.positions(role, units[:count])  # original layout, for export
                start = int(group.positions(role, torch.zeros(1, dtype=torch.long))[0])  # the role's first row now
                linear = base_linear(model, group.roles[role])
                layer = ColumnBlockLinear(linear, positions) if role in COLUMN_ROLES else \
                    RowBlockLinear(linear, positions, start)
                replace_submodule(model, group.roles[role], layer)
                added += layer.delta_block.numel()
        return added

    def describe(self) -> dict[str, Any]:
        settings = {"head_ratio": self.head_ratio, "num_heads": self.num_heads, "channel_ratio": self.channel_ratio,
                    "num_channels": self.num_channels, "train": self.train, "allocation": self.allocation,
                    "select_by": self.select_by, "order": self.order, "gqa": self.gqa, "seed": run_seed(self.seed),
                    "calibration_batches": self.calibration_batches, "load_selection": self.load_selection}
        return {"method": self.method, **{k: v for k, v in settings.items() if v is not None}}


def _weight_scores(model: nn.Module, groups: list[CoupledGroup], roles: list[str]) -> dict[str, Tensor]:
    """`weight_scores`; on a base still on the meta device (loaded by shards under FSDP2), each group's weights are
    read from the checkpoint in turn, so a rank holds one layer's projections at a time."""
    if not any(p.is_meta for p in model.parameters()):
        return weight_scores(model, groups, roles)
    scores: dict[str, Tensor] = {}
    for group in groups:
        with whole_weights(model, [base_linear(model, group.roles[r]) for r in roles if r in group.roles]):
            scores.update(weight_scores(model, [group], roles))
    return scores


def _all_reduce(tensor: Tensor) -> Tensor:
    """Sum a statistic over ranks into a copy (scores must not alias the model's gradients)."""
    return all_reduce_sum_(tensor.clone())


def write_selection(path: str | Path, model: nn.Module, groups: list[CoupledGroup], selection: dict[str, list[int]],
                    settings: dict[str, Any]) -> None:
    """JSON: per group owner, its kind and selected units (original indices), with the settings that chose them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": SELECTION_FORMAT, "model_type": model.config.model_type, "settings": settings,
            "groups": {g.owner: {"kind": g.kind, "units": selection[g.owner]} for g in groups if g.owner in selection}}
    path.write_text(json.dumps(body, indent=1))


def read_selection(path: str | Path, groups: list[CoupledGroup]) -> dict[str, list[int]]:
    """A saved selection, checked against this model's groups (its counts replace the configured budget)."""
    body = json.loads(Path(path).read_text())
    if body.get("format") != SELECTION_FORMAT:
        raise ValueError(f"{path} is not an S2FT selection file (format {body.get('format')!r})")
    by_owner = {g.owner: g for g in groups}
    selection = {}
    for owner, entry in body["groups"].items():
        group = by_owner.get(owner)
        if group is None or group.kind != entry["kind"]:
            raise ValueError(f"{path}: {entry['kind']} group {owner!r} is not trained in this model (trained groups: "
                             f"{sorted(by_owner)[:4]}...); was it saved for another model or another train= setting?")
        units = [int(u) for u in entry["units"]]
        if not all(0 <= u < group.num_units for u in units):
            raise ValueError(f"{path}: {owner} selects units outside 0..{group.num_units - 1}")
        if len(set(units)) != len(units):
            raise ValueError(f"{path}: {owner} selects some units twice ({sorted(units)}): each unit at most once")
        selection[owner] = units
    return selection
