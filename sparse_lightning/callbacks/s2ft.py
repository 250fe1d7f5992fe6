"""S2FT (Yang et al., 2024): dense blocks on a few co-permuted heads and FFN channels, with partial
back-propagation. The algorithm is `sparse_lightning.methods.s2ft.S2FT`; this callback only gives it the Lightning
life cycle: the module calls `attach` from `configure_model` when fitting, before the strategy wraps or shards the
model (a checkpoint being evaluated brings its own blocks and permutation).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from sparse_lightning.callbacks.base import SparseMethodCallback
from sparse_lightning.methods.s2ft import S2FT, SelectBy
from sparse_lightning.scoring.score_groups import DEFAULT_SCORE_MEMORY
from sparse_lightning.structure.select import GQAMode


class S2FTStructureCallback(S2FT, SparseMethodCallback):
    """Train dense blocks on a few co-permuted attention heads and FFN channels per layer.

    Heads train their o columns (optionally v rows), channels their down columns (optionally up/gate rows).

    Budgets are per layer: `head_ratio`/`num_heads` (query heads; under gqa='groups' ratios round to whole
    KV groups and counts must be multiples of the group size) and `channel_ratio`/`num_channels`.
    `allocation='global'` keeps the same total but gives it to the best (layer, unit) pairs over all layers.
    `select_by` ranks units (see `sparse_lightning.structure.scores`); `order` picks the largest or smallest.

    Args:
        head_ratio: share of query heads per layer whose o columns (and v rows) train (default 0.052).
        num_heads: query heads per layer instead of a ratio.
        channel_ratio: share of FFN channels per layer whose down columns (and up/gate rows) train (default 0.02).
        num_channels: FFN channels per layer instead of a ratio.
        train: projections to train among o, v (heads) and down, up, gate (channels); default [o, down].
        allocation: "uniform" (the same count per layer) or "global" (the best units over all layers).
        select_by: "random", "weight" (norm), "activation", "weight_activation" or "gradient" (calibration data).
        order: keep the "largest" or the "smallest" scores.
        calibration_batches: training batches read by data-driven selections.
        seed: draws the random selection; default: the run's `seed_everything` value.
        gqa: under grouped-query attention, select whole KV "groups" or single query "heads".
        load_selection: a JSON selection written by `save_selection` (replaces selecting; counts must match).
        save_selection: write the selection to this JSON file.
        dense_modules: modules trained densely (default: the task module's new heads).
        score_memory: for select_by="gradient" with several calibration batches, the most the summed gradients hold
            at once, as a fraction of all the trained projections' gradients (default 0.125; 1.0 holds them all, the
            fastest). The scores are the same whatever it is: smaller fractions re-run the batches more often.
    """

    #: Arguments that went, and their new names (the CLI's unknown-key message reads this too): `strategy` clashed
    #: with the Trainer's.
    renamed = {"strategy": "select_by"}

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
        dense_modules: list[str] | None = None,
        score_memory: float = DEFAULT_SCORE_MEMORY,
        **removed: Any,
    ) -> None:
        if removed:
            key = next(iter(removed))
            hint = f"; it is now {self.renamed[key]}=..." if key in self.renamed else ""
            raise TypeError(f"S2FTStructureCallback got an unexpected argument {key!r}{hint}")
        S2FT.__init__(self, head_ratio, num_heads, channel_ratio, num_channels, train, allocation, select_by, order,
                      calibration_batches, seed, gqa, load_selection, save_selection, score_memory)
        SparseMethodCallback.__init__(self, dense_modules)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(trainer.strategy, ModelParallelStrategy) and not self.attaches_from_shapes:
            rank_zero_warn(f"S2FT select_by={self.select_by!r} scores calibration data through the whole model, so "
                           "every rank loads the whole base before FSDP2 shards it (host memory grows with the model "
                           "per rank); to load by shards, write the selection once in one process (save_selection) "
                           "and start the FSDP2 run from it (load_selection)")
