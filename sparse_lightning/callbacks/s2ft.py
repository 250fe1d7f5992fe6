"""S2FT (Yang et al., 2024): select a few heads and FFN channels per layer, co-permute them to the front, and
train dense blocks on them with partial back-propagation.

Everything happens in `attach`, from the module's `configure_model`, before the strategy wraps or shards the
model and before the optimizer exists: the selection (random, weight norm, or from calibration batches of
the training data), the co-permutation, and block layers of a size fixed by the ratios/counts. Data-driven
strategies read the first `calibration_batches` training batches of the datamodule there (the model is still
whole on every rank, so this works under DDP and FSDP2 alike); statistics are summed over ranks and the
selection is broadcast from rank 0, so every rank permutes identically. A selection can be saved to a JSON file
and loaded instead (e.g. computed once on one process for a large sharded run).

The checkpoint holds the permuted base weights, the blocks, their original-layout positions and the
co-permutation record of every group, so resuming restores the exact state and export can un-permute. A
resumed run selects again before the checkpoint overwrites that selection, so block shapes must come out the
same: they always do with uniform allocation; with allocation='global' and a data-driven strategy, resume with
`load_selection` pointing at the file `save_selection` wrote. Outside `fit` nothing is attached: a checkpoint
being evaluated brings its own blocks and permutation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from sparse_lightning.callbacks.base import SparseMethodCallback, _distributed
from sparse_lightning.sparse.block import ColumnBlockLinear, RowBlockLinear, block_delta_layers
from sparse_lightning.structure.families import COLUMN_ROLES, KV_ROLES, CoupledGroup, base_linear, find_groups
from sparse_lightning.structure.permute import expand, permute_group, role_order
from sparse_lightning.structure.scores import activation_scores, gradient_scores, weight_scores
from sparse_lightning.structure.select import GQAMode, allocate_global, choose_units, gqa_count_error, selection_order

Strategy = Literal["random", "weight", "activation", "weight_activation", "gradient"]
STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")
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


class S2FTStructureCallback(SparseMethodCallback):
    """Train dense blocks on co-permuted heads (o columns, optionally v rows) and channels (down columns,
    optionally up/gate rows).

    Budgets are per layer: `head_ratio`/`num_heads` (query heads; under gqa='groups' ratios round to whole
    KV groups and counts must be multiples of the group size) and `channel_ratio`/`num_channels`.
    `allocation='global'` keeps the same total but gives it to the best (layer, unit) pairs over all layers.
    `strategy` ranks units (see `sparse_lightning.structure.scores`); `order` picks the largest or smallest.
    """

    method = "s2ft"

    def __init__(
        self,
        head_ratio: float | None = None,
        num_heads: int | None = None,
        channel_ratio: float | None = None,
        num_channels: int | None = None,
        train: list[str] | None = None,
        allocation: Literal["uniform", "global"] = "uniform",
        strategy: Strategy = "random",
        order: Literal["largest", "smallest"] = "largest",
        calibration_batches: int = 4,
        seed: int = 0,
        gqa: GQAMode = "groups",
        load_selection: str | None = None,
        save_selection: str | None = None,
        dense_modules: list[str] | None = None,
    ) -> None:
        super().__init__(dense_modules)
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
        choices = {"allocation": (allocation, ("uniform", "global")), "strategy": (strategy, STRATEGIES),
                   "order": (order, ("largest", "smallest")), "gqa": (gqa, ("groups", "heads"))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        self.head_ratio, self.num_heads = head_ratio, num_heads
        self.channel_ratio, self.num_channels = channel_ratio, num_channels
        self.allocation, self.strategy, self.order, self.gqa = allocation, strategy, order, gqa
        self.calibration_batches, self.seed = calibration_batches, seed
        self.load_selection, self.save_selection = load_selection, save_selection
        self._trainer: pl.Trainer | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer  # attach runs next, from configure_model, and may read calibration batches

    def attach(self, model: nn.Module, batches: Iterable[dict[str, Any]] | None = None,
               loss_fn: Callable[[dict[str, Any]], Tensor] | None = None) -> None:
        """Select, co-permute and add the blocks. Without a Trainer, data-driven strategies need `batches`
        (and `loss_fn`, by default `model(**batch).loss`)."""
        if block_delta_layers(model):
            return
        trainer = self._trainer
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            return
        every_group = find_groups(model)
        self._check_roles(model, every_group)
        groups = [g for g in every_group if self.roles(g)]
        if self.load_selection:
            selection = read_selection(self.load_selection, groups)
        else:
            selection = self._broadcast(groups, self.select(model, groups, batches, loss_fn))
            if self.save_selection and (not _distributed() or dist.get_rank() == 0):
                write_selection(self.save_selection, model, groups, selection, self.describe())
        added = self.apply(model, groups, selection)
        rank_zero_info(f"S2FT: {self.strategy} ({self.order}) selection, {added:,} trainable block entries in "
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

    def scores(self, model: nn.Module, groups: list[CoupledGroup], batches: Iterable[dict[str, Any]] | None,
               loss_fn: Callable[[dict[str, Any]], Tensor] | None) -> dict[str, Tensor]:
        """One score per unit and group, higher = preferred (negated for order='smallest')."""
        if self.strategy == "random":
            generator = torch.Generator().manual_seed(self.seed)
            scores = {g.owner: torch.rand(g.num_units, generator=generator, dtype=torch.float64) for g in groups}
        else:
            roles = sorted({r for g in groups for r in self.roles(g)})
            if self.strategy == "weight":
                scores = weight_scores(model, groups, roles)
            else:
                batches, loss_fn = self._calibration(model, batches, loss_fn)
                with self._loss_on(model):
                    if self.strategy == "gradient":
                        scores = gradient_scores(model, groups, roles, batches, loss_fn, _all_reduce)
                    else:
                        scores = activation_scores(model, groups, batches, loss_fn, _all_reduce)
                if self.strategy == "weight_activation":
                    weights = weight_scores(model, groups, roles)
                    scores = {owner: score * weights[owner] for owner, score in scores.items()}
        return {owner: -s if self.order == "smallest" else s for owner, s in scores.items()}

    def select(self, model: nn.Module, groups: list[CoupledGroup], batches: Iterable[dict[str, Any]] | None = None,
               loss_fn: Callable[[dict[str, Any]], Tensor] | None = None) -> dict[str, list[int]]:
        """Selected units (query heads / channels, original indices) per group owner."""
        scores = self.scores(model, groups, batches, loss_fn)
        counts = {g.owner: self.count(g) for g in groups}
        if self.allocation == "global":
            for kind in ("heads", "channels"):
                of_kind = [g for g in groups if g.kind == kind]
                if of_kind:
                    total = sum(counts[g.owner] for g in of_kind)
                    counts.update(allocate_global(of_kind, scores, total, self.gqa))
        return {g.owner: choose_units(g, scores[g.owner], counts[g.owner], self.gqa)
                for g in groups if counts[g.owner]}

    def _calibration(self, model: nn.Module, batches, loss_fn):
        if batches is None:
            trainer = self._trainer
            if trainer is None:
                raise ValueError(f"strategy={self.strategy!r} needs calibration batches: attach under Trainer.fit "
                                 "(the first calibration_batches training batches are used) or pass batches=...")
            source = trainer.datamodule.train_dataloader() if trainer.datamodule else \
                trainer.fit_loop._data_source.dataloader()
            batches = [batch for _, batch in zip(range(self.calibration_batches), source)]
        device = next(model.parameters()).device
        batches = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()} for b in batches]
        if loss_fn is None:
            module = self._trainer.lightning_module if self._trainer is not None else None
            loss_fn = module.compute_loss if module is not None else (lambda batch: model(**batch).loss)
        return batches, loss_fn

    @contextmanager
    def _loss_on(self, model: nn.Module):
        """The LightningModule's `compute_loss` reads `self.model`, which configure_model sets only after attach."""
        module = self._trainer.lightning_module if self._trainer is not None else None
        if module is None or getattr(module, "model", None) is not None:
            yield
            return
        module.model = model
        try:
            yield
        finally:
            module.model = None

    def _broadcast(self, groups: list[CoupledGroup], selection: dict[str, list[int]]) -> dict[str, list[int]]:
        """Rank 0's selection on every rank (scores are reduced already; this makes ties bitwise safe)."""
        if not _distributed():
            return selection
        masks = torch.zeros(sum(g.num_units for g in groups), dtype=torch.int32)
        offsets = {}
        offset = 0
        for g in groups:
            offsets[g.owner] = offset
            masks[[offset + u for u in selection.get(g.owner, [])]] = 1
            offset += g.num_units
        masks = _to_collective(masks)
        dist.broadcast(masks, src=0)
        masks = masks.cpu()
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
                positions = expand(units[:count], group.unit_size)
                linear = base_linear(model, group.roles[role])
                layer = (ColumnBlockLinear if role in COLUMN_ROLES else RowBlockLinear)(linear, positions)
                parent, _, child = group.roles[role].rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
                added += layer.delta_block.numel()
        return added

    def describe(self) -> dict[str, Any]:
        settings = {"head_ratio": self.head_ratio, "num_heads": self.num_heads, "channel_ratio": self.channel_ratio,
                    "num_channels": self.num_channels, "train": self.train, "allocation": self.allocation,
                    "strategy": self.strategy, "order": self.order, "gqa": self.gqa, "seed": self.seed,
                    "calibration_batches": self.calibration_batches, "load_selection": self.load_selection}
        return {"method": self.method, **{k: v for k, v in settings.items() if v is not None}}


def _to_collective(tensor: Tensor) -> Tensor:
    """NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def _all_reduce(tensor: Tensor) -> Tensor:
    """Sum a statistic over ranks (it comes back on the device it came from)."""
    if not _distributed():
        return tensor
    reduced = _to_collective(tensor.clone())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


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
        selection[owner] = units
    return selection
