"""The LightningModule every task module stands on: load the HF model, attach a method, optimise.

No sparse callback on the trainer means full fine-tuning; `lora=...` means the PEFT LoRA baseline;
otherwise each `SparseMethodCallback` attaches its deltas in `configure_model`, before the strategy
wraps or shards the model, and the optimizer only ever sees trainable parameters.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from sparse_lightning.callbacks.base import SparseMethodCallback
from sparse_lightning.modules.fsdp2 import fully_shard_model
from sparse_lightning.modules.lora import LoRASettings, apply_lora
from sparse_lightning.modules.schedules import Schedule, warmup_then_decay
from sparse_lightning.sparse import default_targets, freeze_except
from sparse_lightning.sparse.inject import attach_deltas_from_state_dict


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, PEFT's way (global shapes under FSDP2)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class SparseFineTuningModule(LightningModule):
    """Shared base: subclasses define `build_model`, `compute_loss` and their evaluation."""

    #: Newly initialised task heads, trained densely by default (a callback's `dense_modules` overrides).
    head_modules: tuple[str, ...] = ()

    def __init__(
        self,
        model_name_or_path: str,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.0,
        lr_schedule: Schedule = "linear",
        lora: LoRASettings | None = None,
        fsdp_param_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters(ignore=["optimizer", "lora"])
        # A plain dict, so checkpoints load with torch.load(weights_only=True).
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self.optimizer_factory = optimizer
        self.model: nn.Module | None = None
        self._sparse_attached = False

    @property
    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """`model_kwargs` for `from_pretrained`: config overrides such as `hidden_dropout_prob: 0.0`."""
        return dict(self.hparams.model_kwargs or {})

    def build_model(self) -> nn.Module:
        """Load the Hugging Face model (called once, from `configure_model`)."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        """Training loss of one batch; also what calibration passes differentiate."""
        raise NotImplementedError

    def sparse_callbacks(self) -> list[SparseMethodCallback]:
        trainer = self._trainer
        return [cb for cb in trainer.callbacks if isinstance(cb, SparseMethodCallback)] if trainer else []

    @property
    def method(self) -> str:
        if self.hparams.lora is not None:
            return "lora"
        callbacks = self.sparse_callbacks()
        return "+".join(cb.method for cb in callbacks) if callbacks else "full"

    def configure_model(self) -> None:
        callbacks = self.sparse_callbacks()
        if callbacks and self.hparams.lora is not None:
            raise ValueError("choose LoRA (model.lora) or a sparse callback, not both")
        if self.model is not None:
            if callbacks and not self._sparse_attached:
                self._attach_late(callbacks)
            return
        model = self.build_model()
        model.train()  # from_pretrained returns eval mode, and Lightning keeps each module's mode
        if self.hparams.lora is not None:
            model.requires_grad_(False)
            model = apply_lora(model, LoRASettings(**self.hparams.lora), list(default_targets(model)), list(self.head_modules))
        elif callbacks:
            self._attach(model, callbacks)
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.device_mesh is not None:
            dtype = getattr(torch, self.hparams.fsdp_param_dtype) if self.hparams.fsdp_param_dtype else None
            fully_shard_model(model, self.device_mesh, dtype)
        self.model = model

    def _attach(self, model: nn.Module, callbacks: list[SparseMethodCallback]) -> None:
        for callback in callbacks:
            callback.attach(model)
        chosen = [cb.dense_modules for cb in callbacks if cb.dense_modules is not None]
        freeze_except(model, chosen[0] if chosen else self.head_modules)
        self._sparse_attached = True

    def _attach_late(self, callbacks: list[SparseMethodCallback]) -> None:
        """The model was built by an earlier validate/test without the method's callback (a baseline
        evaluation, say); attach now, or this fit would silently train every parameter."""
        if self.device_mesh is not None:
            methods = ", ".join(type(cb).__name__ for cb in callbacks)
            raise RuntimeError(f"the model was built by an earlier run without {methods}, and under a sharding "
                               "strategy delta layers must exist before the model is sharded: fit a freshly "
                               "constructed module")
        self._attach(self.model, callbacks)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `load_from_checkpoint` builds the module without a trainer (so without callbacks): recreate
        # the checkpoint's delta layers so its state dict fits. (ModelParallelStrategy loads the weights
        # itself and passes on a checkpoint without "state_dict".)
        if self.model is not None and "state_dict" in checkpoint:
            attach_deltas_from_state_dict(self.model, checkpoint["state_dict"], prefix="model.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Kept with the weights (also under save_weights_only): what export needs to describe the delta.
        checkpoint["sparse_lightning"] = {
            "method": self.method,
            "module_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "base_model": self.hparams.model_name_or_path,
            "callbacks": [cb.describe() for cb in self.sparse_callbacks()],
            "trainable": [name for name, p in self.named_parameters() if p.requires_grad],
        }

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self)
        self.trainable_parameters = trainable
        rank_zero_info(f"[{self.method}] trainable params: {trainable:,} || all params: {total:,} "
                       f"|| trainable%: {100 * trainable / total:.4f}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def loader_names(self, stage: str) -> list[str]:
        """The datamodule's names for its `stage` loaders (`val_set_names`, `test_set_names`; test falls
        back to the validation names, as GLUE evaluates on its dev sets)."""
        datamodule = self._trainer.datamodule if self._trainer else None
        names = getattr(datamodule, f"{stage}_set_names", None)
        if names is None and stage == "test":
            names = getattr(datamodule, "val_set_names", None)
        return list(names) if names else []

    def metric_prefix(self, stage: str, dataloader_idx: int) -> str:
        """`val/` with one loader, `val/<set name>/` with several (MNLI matched/mismatched, math test sets)."""
        names = self.loader_names(stage)
        if len(names) <= 1 and dataloader_idx == 0:
            return f"{stage}/"
        name = names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)
        return f"{stage}/{name}/"

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check the sparse callback's targets or dense_modules")
        optimizer = self.optimizer_factory(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(self.hparams.lr_schedule, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
