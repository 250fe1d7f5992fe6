"""SIFT (Song et al., 2024): train the top-k |gradient| entries of each target weight.

The selection (`sparse_lightning.methods.sift.select_by_gradient`) runs once, at the start of training, on the
module's calibration batches. Unlike the reference code, deltas live in their own fp32 parameter (weight decay
pulls them toward the pretrained weight, not toward an always-zero vector), gradients come from our autograd
Function (no hooks nulling `.grad`, so DDP and FSDP work), and nothing is merged late: the effective weight is
`W + delta` at every forward.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from sparse_lightning.callbacks.base import ElementSparseCallback
from sparse_lightning.score_groups import DEFAULT_SCORE_MEMORY, check_score_memory
from sparse_lightning.methods.sift import select_by_gradient, unselected_layers


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
    ) -> None:
        super().__init__(density, num_params, lora_rank, target_modules, exclude_modules, dense_modules)
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        self.calibration_batches = calibration_batches
        self.score_memory = check_score_memory(score_memory)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not unselected_layers(pl_module):  # a resumed run or a reloaded checkpoint keeps its selection
            return
        calibration = pl_module.calibration()
        chosen = select_by_gradient(pl_module, calibration.batches(self.calibration_batches), calibration.loss_fn,
                                    self.score_memory)
        if chosen:
            rank_zero_info(f"SIFT: selected {sum(l.k for l in chosen.values()):,} entries in {len(chosen)} weights "
                           f"from |gradient| over {self.calibration_batches} calibration batch(es)")

    def describe(self) -> dict:
        return {**super().describe(), "calibration_batches": self.calibration_batches}
