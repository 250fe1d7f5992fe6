"""What a method may look at before it chooses: a few training batches and the training loss.

The LightningModule builds one (`SparseFineTuningModule.calibration`) with the batches placed by the strategy
and the loss run under the precision plugin's forward context; a Python user builds one from a list of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

Batch = dict[str, Any]
LossFn = Callable[[Batch], Tensor]


@dataclass(frozen=True)
class Calibration:
    """`draw(n)` returns the first n training batches on the model's device; `loss_fn(batch)` the training loss."""

    draw: Callable[[int], list[Batch]]
    loss_fn: LossFn

    def batches(self, count: int) -> list[Batch]:
        batches = self.draw(count)
        if not batches:
            raise ValueError("calibration found no training batch: the training data is empty")
        return batches

    @classmethod
    def from_batches(cls, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn | None = None) -> Calibration:
        """Batches moved to the model's device; the loss defaults to the HF model's own (`model(**batch).loss`)."""
        device = next(model.parameters()).device
        placed = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()} for batch in batches]
        return cls(draw=lambda count: placed[:count], loss_fn=loss_fn or (lambda batch: model(**batch).loss))


def require(calibration: Calibration | None, who: str) -> Calibration:
    """The calibration a data-driven choice needs, or an error that says how to give one."""
    if calibration is None:
        raise ValueError(f"{who} needs calibration batches: run it under Trainer.fit with a SparseFineTuningModule, "
                         "or pass calibration=Calibration.from_batches(model, batches)")
    return calibration
