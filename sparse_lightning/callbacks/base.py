"""What every sparse-method callback shares: attaching deltas from `configure_model` and rank sync.

Lightning has no callback hook between `configure_model` and the strategy's wrapping, so our
LightningModule calls `attach` on each `SparseMethodCallback` it finds on the trainer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch import Tensor, nn

from sparse_lightning.sparse import (
    SparseDeltaLinear,
    allocate_budget,
    attach_sparse_deltas,
    default_targets,
    find_linear_targets,
    sparse_delta_layers,
)
from sparse_lightning.sparse.delta import validate_budget


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum a statistic over ranks in place, so every rank selects from the same numbers."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank_zero_(tensor: Tensor) -> Tensor:
    """Make a selection bitwise identical on every rank (ties could otherwise break differently)."""
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


class SparseMethodCallback(Callback):
    """Base of the sparse fine-tuning methods; `method` names it in checkpoints and exported deltas."""

    method: str = "sparse"

    def __init__(self, dense_modules: list[str] | None = None) -> None:
        self.dense_modules = dense_modules

    def attach(self, model: nn.Module) -> None:
        """Add the method's trainable deltas to `model` (safe to call twice)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings recorded with exported deltas."""
        return {"method": self.method}


class ElementSparseCallback(SparseMethodCallback):
    """k trainable entries per target weight, k from a density, a global count or a LoRA rank."""

    def __init__(
        self,
        density: float | None = None,
        num_params: int | None = None,
        lora_rank: int | None = None,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        dense_modules: list[str] | None = None,
    ) -> None:
        super().__init__(dense_modules)
        if density is None and num_params is None and lora_rank is None:
            density = 0.01
        validate_budget(density, num_params, lora_rank)
        self.density, self.num_params, self.lora_rank = density, num_params, lora_rank
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules or []

    def attach(self, model: nn.Module) -> None:
        if sparse_delta_layers(model):
            return
        patterns = self.target_modules or list(default_targets(model))
        targets = find_linear_targets(model, patterns, self.exclude_modules)
        shapes = [tuple(linear.weight.shape) for linear in targets.values()]
        self.initialize(attach_sparse_deltas(model, dict(zip(targets, self.allocate(model, shapes)))))

    def allocate(self, model: nn.Module, shapes: list[tuple[int, int]]) -> list[int]:
        """Slots per target weight; `density` is per tensor here (SIFT), SpIEL reads it model-wide."""
        return allocate_budget(shapes, density=self.density, num_params=self.num_params, lora_rank=self.lora_rank)

    def initialize(self, layers: dict[str, SparseDeltaLinear]) -> None:
        """Initial indices before any selection; subclasses override (SpIEL starts at random)."""

    def describe(self) -> dict[str, Any]:
        budget = {"density": self.density, "num_params": self.num_params, "lora_rank": self.lora_rank}
        return {"method": self.method, **{k: v for k, v in budget.items() if v is not None}}


@torch.no_grad()
def select_top_k(layer: SparseDeltaLinear, scores: Tensor) -> None:
    """Point `layer`'s slots at the k largest scores (identical on every rank), values reset to zero."""
    chosen = torch.topk(scores.view(-1), layer.k, sorted=False).indices.sort().values
    layer.set_indices(broadcast_from_rank_zero_(chosen.to(layer.delta_indices.dtype)))
