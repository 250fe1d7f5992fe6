"""What trains and what is frozen, decided in one place, with or without a Trainer.

`SparseFineTuningModule.configure_model` calls `prepare_model` with the run's one method (the sparse callback on
the trainer, or `model.lora`); benchmarks and scripts call it on a plain Hugging Face model, so every caller trains
exactly what a `sparse-lightning fit` run trains. Choices made at the start of training (SIFT's selection, SpIEL's
first cycle) stay with the callbacks' hooks; without a Trainer, run their algorithms (`sparse_lightning.methods`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from sparse_lightning.callbacks.base import SparseMethodCallback
from sparse_lightning.methods.calibration import Calibration
from sparse_lightning.modules.lora import LoRASettings, apply_lora
from sparse_lightning.registry import method as registry_method
from sparse_lightning.sparse import default_targets, freeze_except

Method = SparseMethodCallback | LoRASettings | None


def method_from_name(name: str, **settings: Any) -> Method:
    """The registry method `name` with `settings`: its callback, `LoRASettings` for LoRA, None for full fine-tuning."""
    row = registry_method(name)
    if row.sparse:
        return row.make_callback(**settings)
    if row.name == "lora":
        return LoRASettings(**settings)
    if settings:
        raise ValueError(f"{name} takes no settings, got {sorted(settings)}")
    return None


def prepare_model(model: nn.Module, method: Method | str = None, calibration: Calibration | None = None,
                  heads: Sequence[str] = ()) -> nn.Module:
    """Make `model` ready to train with `method` and return it (LoRA returns PEFT's wrapper; otherwise `model`).

    Args:
        model: the loaded base model.
        method: a `SparseMethodCallback` (its deltas and its `dense_modules` train, everything else is frozen),
            `LoRASettings` (PEFT LoRA on the targets, `modules_to_save` dense), None for full fine-tuning (nothing
            changes: every parameter trains), or a registry name (`sparse_lightning.registry`) with default settings.
        calibration: the batches and loss a method that chooses in `attach` reads (S2FT's data-driven selections).
        heads: the newly initialised task heads, trained densely when the method names no `dense_modules`.
    """
    if isinstance(method, str):
        method = method_from_name(method)
    if method is None:
        return model
    if isinstance(method, LoRASettings):
        model.requires_grad_(False)
        dense = method.modules_to_save if method.modules_to_save is not None else list(heads)
        return apply_lora(model, method, list(default_targets(model)), dense)
    method.attach(model, calibration)
    freeze_except(model, method.dense_modules if method.dense_modules is not None else heads)
    return model
