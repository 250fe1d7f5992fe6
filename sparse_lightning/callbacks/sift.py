"""SIFT (Song et al., 2024): train the top-k |gradient| entries of each target weight.

The selection (`sparse_lightning.methods.sift.select_by_gradient`) runs once, at the start of training, on the
module's calibration batches. With `allocation="global"` one budget goes to the largest |gradient| entries of all
targets together (`sparse_lightning.methods.sift_global`); each weight's share is known only after scoring, so that
selection runs when the deltas attach (`configure_model`), before the optimizer exists and DDP wraps the model.

Unlike the reference code, deltas live in their own fp32 parameter (weight decay pulls them toward the pretrained
weight, not toward an always-zero vector), gradients come from our autograd Function (no hooks nulling `.grad`, so DDP
and FSDP work), and nothing is merged late: the effective weight is `W + delta` at every forward.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from sparse_lightning.callbacks.base import ElementSparseCallback
from sparse_lightning.methods.calibration import Calibration, require
from sparse_lightning.methods.sift_global import attach_by_global_gradient
from sparse_lightning.scoring.score_groups import DEFAULT_SCORE_MEMORY, check_score_memory
from sparse_lightning.methods.sift import select_by_gradient, unselected_layers
from sparse_lightning.sparse import sparse_delta_layers

#: How the budget is split over the target weights; the first is the paper's and the default.
ALLOCATIONS = ("per_weight", "global")


class GradientTopKCallback(ElementSparseCallback):
    """Select each target weight's k trainable entries by |gradient| summed over calibration batches.

    Args:
        density: fraction of each target weight's entries to train (default 0.01).
        num_params: total trainable entries over all targets, split in proportion to their sizes.
        lora_rank: as many entries as LoRA of this rank would train on the same targets.
        target_modules: module-name patterns (a suffix such as `q_proj`, or a regex); default: the
            architecture's own (`sparse_lightning.architectures`).
        exclude_modules: patterns removed from the targets.
        dense_modules: modules trained densely (default: the task module's new heads).
        calibration_batches: training batches whose gradients score the entries.
        score_memory: with several calibration batches, the most the summed scores hold at once, as a fraction of
            a full fp32 score for every target weight (default 0.125; 1.0 holds them all, the fastest); on N ranks
            (DDP, FSDP2) each rank holds its 1/N rows of every sum, so the fraction is of that share. The selection
            is the same whatever it is: smaller fractions re-run the batches more often, about 1 / score_memory
            times. One calibration batch needs about one layer's gradient at a time and ignores it.
        allocation: "per_weight" (the paper's: every target weight trains its own density's share, k fixed from
            the shapes, chosen at the start of training) or "global" (the same total, given to the entries of
            largest |gradient| over all target weights together, chosen when the deltas attach; a weight that
            gets none keeps no delta and stays frozen; a resumed run rebuilds each delta at the size its checkpoint
            recorded; not under FSDP2 or with `quantize` yet).
    """

    method = "sift"

    def __init__(
        self,
        density: float | None = None,
        num_params: int | None = None,
        lora_rank: int | None = None,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        dense_modules: list[str] | None = None,
        calibration_batches: int = 1,
        score_memory: float = DEFAULT_SCORE_MEMORY,
        allocation: Literal["per_weight", "global"] = "per_weight",
    ) -> None:
        super().__init__(density, num_params, lora_rank, target_modules, exclude_modules, dense_modules)
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"GradientTopKCallback allocation must be one of {list(ALLOCATIONS)} (per_weight: the "
                             f"paper's), got {allocation!r}")
        self.calibration_batches = calibration_batches
        self.score_memory = check_score_memory(score_memory)
        self.allocation = allocation

    @property
    def attaches_from_shapes(self) -> bool:
        """Per-weight k comes from the shapes; a global budget is split by the calibration's gradients."""
        return self.allocation == "per_weight"

    @property
    def sizes_from_data(self) -> bool:
        return not self.attaches_from_shapes

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.allocation != "global" or stage != "fit":
            return
        if isinstance(trainer.strategy, ModelParallelStrategy):
            raise ValueError('GradientTopKCallback allocation="global" is not supported under FSDP2 '
                             '(ModelParallelStrategy) yet: use allocation="per_weight" there, or train on one device '
                             'or with DDP')
        if getattr(pl_module, "hparams", {}).get("quantize"):
            raise ValueError('GradientTopKCallback allocation="global" is not supported with model.quantize yet (a '
                             'resumed run could not resize deltas on a quantized base): use allocation="per_weight" '
                             'or an unquantized base')

    def attach(self, model: nn.Module, calibration: Calibration | None = None) -> None:
        if self.allocation == "per_weight" or sparse_delta_layers(model):
            super().attach(model, calibration)
            return
        calibration = require(calibration, 'SIFT with allocation="global"')
        targets = self.target_linears(model)
        budget = sum(self.allocate(model, [tuple(linear.weight.shape) for linear in targets.values()]))
        attached = attach_by_global_gradient(model, list(targets), calibration.batches(self.calibration_batches),
                                             calibration.loss_fn, budget, self.score_memory)
        counts = [layer.k for layer in attached.values()]
        rank_zero_info(f"SIFT (global): selected {budget:,} entries in {len(attached)} of {len(targets)} weights "
                       f"({min(counts):,} to {max(counts):,} each) from |gradient| over {self.calibration_batches} "
                       "calibration batch(es)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not unselected_layers(pl_module):  # a resumed run or a reloaded checkpoint keeps its selection
            return
        calibration = pl_module.calibration()
        chosen = select_by_gradient(pl_module, calibration.batches(self.calibration_batches), calibration.loss_fn,
                                    self.score_memory)
        if chosen:
            rank_zero_info(f"SIFT: selected {sum(l.k for l in chosen.values()):,} entries in {len(chosen)} weights "
                           f"from |gradient| over {self.calibration_batches} calibration batch(es)")

    def describe(self) -> dict[str, Any]:
        described = {**super().describe(), "calibration_batches": self.calibration_batches}
        return {**described, "allocation": self.allocation} if self.allocation != "per_weight" else described
