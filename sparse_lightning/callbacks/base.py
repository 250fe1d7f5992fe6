"""What every sparse-method callback shares: attaching deltas from `configure_model`.

Lightning has no callback hook between `configure_model` and the strategy's wrapping, so our
LightningModule calls `attach` on the `SparseMethodCallback` it finds on the trainer, with a `Calibration`
(training batches and loss) for methods that choose from data. The choosing itself lives in
`sparse_lightning.methods`, as plain functions; the callbacks decide only when it happens.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback
from torch import nn

from sparse_lightning.sparse import (
    SparseDeltaLinear,
    allocate_budget,
    attach_sparse_deltas,
    default_targets,
    find_linear_targets,
    sparse_delta_layers,
)
from sparse_lightning.methods.calibration import Calibration
from sparse_lightning.sparse.delta import validate_budget


class SparseMethodCallback(Callback):
    """Base of the sparse fine-tuning methods; `method` names it in checkpoints, exported deltas, file and config
    names. `dense_modules` (module-name patterns trained densely, e.g. a new task head) replaces the module's
    default heads; the module freezes everything else in one place (`SparseFineTuningModule.configure_model`)."""

    method: str = "sparse"
    #: Whether `attach` needs only the weights' shapes (not their values): then, under FSDP2, the base is built on
    #: the meta device and each rank loads only its shard after sharding (modules/sharded_loading.py).
    attaches_from_shapes: bool = False
    #: Whether `attach` sizes each delta from data (SIFT's global allocation): a resumed run then rebuilds its deltas
    #: at the sizes its checkpoint recorded, whatever this run's calibration chose.
    sizes_from_data: bool = False

    def __init__(self, dense_modules: list[str] | None = None) -> None:
        self.dense_modules = dense_modules

    def attach(self, model: nn.Module, calibration: Calibration | None = None) -> None:
        """Add the method's trainable deltas to `model` (safe to call twice); data-driven choices read
        `calibration`. It freezes nothing: the module's `configure_model` freezes the base, and on a bare model
        `sparse_lightning.modules.prepare.prepare_model` attaches and freezes in one call."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings recorded with exported deltas."""
        return {"method": self.method}


class ElementSparseCallback(SparseMethodCallback):
    """k trainable entries per target weight, k from a density, a global count or a LoRA rank."""

    attaches_from_shapes = True  # k comes from the shapes; initial indices from a seed (data-driven choices run later)

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

    def attach(self, model: nn.Module, calibration: Calibration | None = None) -> None:
        if sparse_delta_layers(model):
            return
        targets = self.target_linears(model)
        shapes = [tuple(linear.weight.shape) for linear in targets.values()]
        self.initialize(attach_sparse_deltas(model, dict(zip(targets, self.allocate(model, shapes)))), model)

    def target_linears(self, model: nn.Module) -> dict[str, nn.Module]:
        """The Linear modules the method targets, by name, in model order."""
        patterns = self.target_modules or list(default_targets(model))
        return find_linear_targets(model, patterns, self.exclude_modules)

    def allocate(self, model: nn.Module, shapes: list[tuple[int, int]]) -> list[int]:
        """Slots per target weight; `density` is per tensor here (SIFT), SpIEL reads it model-wide."""
        return allocate_budget(shapes, density=self.density, num_params=self.num_params, lora_rank=self.lora_rank)

    def initialize(self, layers: dict[str, SparseDeltaLinear], model: nn.Module) -> None:
        """Initial indices before any selection; subclasses override (SpIEL and the random mask draw them)."""

    def describe(self) -> dict[str, Any]:
        budget = {"density": self.density, "num_params": self.num_params, "lora_rank": self.lora_rank}
        return {"method": self.method, **{k: v for k, v in budget.items() if v is not None}}
