"""SIFT (Song et al., 2024): train the top-k |gradient| entries of each target weight.

Scores are the gradient summed over `calibration_batches` batches (and over ranks), taken once at
the start of training; the scoring passes update nothing. Unlike the reference code, deltas live in
their own fp32 parameter (weight decay pulls them toward the pretrained weight, not toward an
always-zero vector), gradients come from our autograd Function (no hooks nulling `.grad`, so DDP and
FSDP work), and nothing is merged late: the effective weight is `W + delta` at every forward.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from sparse_lightning.callbacks.base import ElementSparseCallback, all_reduce_sum_, select_top_k
from sparse_lightning.modes import eval_mode
from sparse_lightning.sparse import sparse_delta_layers


class GradientTopKCallback(ElementSparseCallback):
    """Select each target weight's k trainable entries by |gradient| on calibration batches."""

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
    ) -> None:
        super().__init__(density, num_params, lora_rank, target_modules, exclude_modules, dense_modules)
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        self.calibration_batches = calibration_batches

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Layers already selected (a resumed run, a reloaded checkpoint) keep their indices and trained values;
        # `delta_selected` is the same on every rank, so all ranks take the same branch.
        layers = {name: layer for name, layer in sparse_delta_layers(pl_module).items()
                  if not bool(layer.delta_selected)}
        if not layers:
            return
        scores = {name: torch.zeros(layer.weight_shape, dtype=torch.float32, device=pl_module.device)
                  for name, layer in layers.items()}
        for name, layer in layers.items():
            layer.weight_grad_observer = scores[name].add_
        try:
            seen = self._accumulate_gradients(trainer, pl_module)
        finally:
            for layer in layers.values():
                layer.weight_grad_observer = None
        for name, layer in layers.items():
            select_top_k(layer, all_reduce_sum_(scores[name]).abs_())
        del scores
        rank_zero_info(f"SIFT: selected {sum(l.k for l in layers.values()):,} entries in {len(layers)} weights "
                       f"from |gradient| over {seen} calibration batch(es)")

    def _accumulate_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Forward/backward on the first batches with dropout off; the parameter gradients are dropped and every
        module gets back the train/eval mode it had."""
        seen = 0
        with eval_mode(pl_module):
            try:
                for batch in trainer.train_dataloader:
                    if seen == self.calibration_batches:
                        break
                    batch = trainer.strategy.batch_to_device(batch)
                    with trainer.precision_plugin.forward_context():
                        loss = pl_module.compute_loss(batch)
                    loss.backward()
                    seen += 1
            finally:
                pl_module.zero_grad(set_to_none=True)
        return seen

    def describe(self) -> dict:
        return {**super().describe(), "calibration_batches": self.calibration_batches}
