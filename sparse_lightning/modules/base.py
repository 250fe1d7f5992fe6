"""The LightningModule every task module stands on: load the HF model, attach a method, optimise.

No sparse callback on the trainer means full fine-tuning; `lora=...` means the PEFT LoRA baseline;
otherwise the one `SparseMethodCallback` attaches its deltas in `configure_model` (when fitting), before the
strategy wraps or shards the model, and the optimizer only ever sees trainable parameters. What trains is decided
by `prepare_model` (modules/prepare.py), which benchmarks and scripts call without a Trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from sparse_lightning.borders.apply import apply_delta
from sparse_lightning.borders.delta import delta_base_model
from sparse_lightning.borders.models import resolve_model_path
from sparse_lightning.callbacks.base import SparseMethodCallback
from sparse_lightning.delta_checkpoint import (
    CheckpointKeysError,
    base_fingerprint,
    check_checkpoint_keys,
    check_same_base,
    check_same_method,
    frozen_base_keys,
)
from sparse_lightning.methods.calibration import Calibration
from sparse_lightning.modes import enable_activation_checkpointing
from sparse_lightning.modules.fsdp2 import fully_shard_model
from sparse_lightning.modules.lora import LoRASettings, saved_module_copies
from sparse_lightning.modules.param_groups import parameter_groups
from sparse_lightning.modules.prepare import prepare_model
from sparse_lightning.modules.schedules import Schedule, warmup_then_decay
from sparse_lightning.modules.sharded_checkpoint import check_before_loading, saved_tensor_names
from sparse_lightning.modules.sharded_loading import ShardedLoad, build_on_meta, checkpoint_files, load_shards
from sparse_lightning.sparse.frozen_delta import is_delta_parameter
from sparse_lightning.sparse.inject import attach_deltas_from_state_dict, resize_deltas_as_recorded
from sparse_lightning.sparse.quantized import (
    QUANTIZE,
    QuantizedLinear,
    Quantize,
    quantize_frozen_linears,
    quantize_linears,
    quantized_linear_names,
    quantized_shells_from_state_dict,
)
from sparse_lightning.structure.permute import permute_as_recorded
from sparse_lightning.structure.records import order_records, orders_in_state_dict, same_orders


def rng_state() -> dict[str, Any]:
    """This process's torch random state (CPU and every CUDA device)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def same_model(a: str, b: str) -> bool:
    """Whether two model names or paths name the same model (an alias and its directory count as one)."""
    def where(name: str) -> str:
        try:
            return str(Path(resolve_model_path(name)).resolve())
        except (ValueError, FileNotFoundError, OSError, ImportError, RuntimeError):
            return name

    return a == b or where(a) == where(b)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, PEFT's way (global shapes under FSDP2; a quantized weight counts its
    entries, not its packed bytes)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return trainable, sum(p.numel() for p in model.parameters()) + quantized


class SparseFineTuningModule(LightningModule):
    """The base every task module stands on: load the HF model, attach the run's method, optimise.

    Subclasses define `build_model`, `compute_loss` and their evaluation.

    Args:
        model_name_or_path: a local HF model directory, a built-in alias (`sparse_lightning.models`) or a hub id.
        optimizer: the optimizer over trainable parameters only (e.g. AdamW with its lr; SM3 for SpIEL-MA).
        warmup_ratio: share of the optimizer steps with a linear warm-up, in [0, 1).
        lr_schedule: learning-rate decay after warm-up ("linear", "cosine" or "constant").
        lora: PEFT LoRA settings for the LoRA baseline (instead of a sparse callback).
        fsdp_param_dtype: parameter dtype under FSDP2 (e.g. bfloat16); deltas stay fp32.
        gradient_checkpointing: recompute activations in backward to save memory.
        model_kwargs: extra `from_pretrained` config overrides, e.g. `hidden_dropout_prob: 0.0`.
        quantize: store the frozen base in "nf4", "fp4" or "int8" (bitsandbytes); deltas stay fp32.
        init_delta: start from an exported delta directory or a PEFT SHiRA / Super-Tuning adapter, merged into the
            base (checked like `apply_delta`) when a trainer builds the model, before the method attaches.
        full_checkpoint: save the whole model, frozen base included, in every checkpoint. By default a checkpoint
            holds only what trains (and a fingerprint of the base): loading it rebuilds the base from
            `model_name_or_path`.
        head_lr: learning rate of the parameters trained densely beside a sparse or LoRA delta (a callback's
            `dense_modules`, LoRA's `modules_to_save`: the task head, the pooler); None: the optimizer's own lr,
            as in the papers (`sparse_lightning.modules.param_groups`).
    """

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
        quantize: Quantize | None = None,
        init_delta: str | None = None,
        full_checkpoint: bool = False,
        head_lr: float | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if head_lr is not None and not head_lr > 0.0:
            raise ValueError(f"head_lr must be > 0 (or unset for the optimizer's lr), got {head_lr}")
        if quantize is not None and quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {list(QUANTIZE)} (or unset), got {quantize!r}")
        self.save_hyperparameters(ignore=["optimizer", "lora"])
        # A plain dict, so checkpoints load with torch.load(weights_only=True); a reload passes that dict back.
        self.hparams["lora"] = None if lora is None else asdict(lora) if isinstance(lora, LoRASettings) else dict(lora)
        self.optimizer_factory = optimizer
        self.model: nn.Module | None = None
        self._sparse_attached = False
        self._load_by_shards = False  # set by configure_model under FSDP2; read by load_pretrained
        self._sharded_load: ShardedLoad | None = None
        self._init_delta_merged = False
        self._base_fingerprint: dict[str, Any] | None = None  # of the base as built: what a delta checkpoint adds to
        self._applied_orders: dict[str, Tensor] = {}  # S2FT's co-permutations this run applied to its base

    @property
    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """`model_kwargs` for `from_pretrained`: config overrides such as `hidden_dropout_prob: 0.0`."""
        return dict(self.hparams.model_kwargs or {})

    def build_model(self) -> nn.Module:
        """Load the Hugging Face model (called once, from `configure_model`), through `load_pretrained` below so
        that FSDP2 runs load by shards."""
        raise NotImplementedError

    def load_pretrained(self, auto_class: Any, model_name_or_path: str, **kwargs: Any) -> nn.Module:
        """`auto_class.from_pretrained(resolved path, **kwargs)`; while `configure_model` loads by shards (FSDP2),
        the same model with its checkpoint weights on the meta device instead, filled per rank after sharding
        (modules/sharded_loading.py). A model the shard loader cannot read (no safetensors, keys it cannot map)
        loads in full, as before."""
        path = resolve_model_path(model_name_or_path)
        files = checkpoint_files(path) if self._load_by_shards and Path(path).is_dir() else None
        if files is not None:
            built = build_on_meta(auto_class, path, files, type(self).head_modules, **kwargs)
            if built is not None:
                self._sharded_load = built[1]
                return built[0]
        if self._load_by_shards:
            rank_zero_info(f"{model_name_or_path}: not a safetensors checkpoint this loader can map by name, so every "
                           "rank loads the whole model before FSDP2 shards it")
        return auto_class.from_pretrained(path, **kwargs)

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        """Training loss of one batch; also what calibration passes differentiate."""
        raise NotImplementedError

    @property
    def attached_trainer(self) -> Trainer | None:
        """The trainer running this module, or None (Lightning's `trainer` property raises when there is none)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    @property
    def attached_datamodule(self) -> LightningDataModule | None:
        trainer = self.attached_trainer
        return trainer.datamodule if trainer is not None else None

    def sparse_callbacks(self) -> list[SparseMethodCallback]:
        trainer = self.attached_trainer
        return [cb for cb in trainer.callbacks if isinstance(cb, SparseMethodCallback)] if trainer else []

    @property
    def method(self) -> str:
        if self.hparams.lora is not None:
            return "lora"
        callbacks = self.sparse_callbacks()
        return callbacks[0].method if callbacks else "full"

    def sparse_method(self) -> SparseMethodCallback | None:
        """The run's one method: a sparse callback, LoRA (`model.lora`) or neither (full fine-tuning)."""
        callbacks = self.sparse_callbacks()
        if len(callbacks) > 1:
            names = ", ".join(type(cb).__name__ for cb in callbacks)
            raise ValueError(f"one sparse method per run, got {len(callbacks)}: {names}; keep one callback")
        if callbacks and self.hparams.lora is not None:
            raise ValueError(f"choose LoRA (model.lora) or {type(callbacks[0]).__name__}, not both")
        return callbacks[0] if callbacks else None

    def configure_model(self) -> None:
        method = self.sparse_method()
        trainer = self.attached_trainer
        fitting = trainer is None or trainer.state.fn in (None, TrainerFn.FITTING)  # not validate/test/predict
        if self.device_mesh is not None and trainer is not None:  # FSDP2: Lightning loads a checkpoint itself
            check_before_loading(trainer.strategy, self._check_saved_tensors)
        if self.model is not None:
            if method is not None and fitting and not self._sparse_attached:
                self._attach_late(method)
            return
        # Under FSDP2 a method that attaches from weight shapes (LoRA does too) lets every rank load only its shard
        # (init_delta then adds its entries to each rank's rows); S2FT selections from data need the whole base.
        self._load_by_shards = (self.device_mesh is not None
                                and (method is None or not fitting or method.attaches_from_shapes))
        model = self.build_model()
        self._load_by_shards = False
        model.train()  # from_pretrained returns eval mode, and Lightning keeps each module's mode
        self._base_fingerprint = base_fingerprint(model, self.hparams.model_name_or_path, self._sharded_load)
        if self.hparams.get("init_delta") and trainer is not None:  # a reload's checkpoint holds the merged weights
            self._merge_init_delta(model)
        if self.hparams.lora is not None:
            model = prepare_model(model, LoRASettings(**self.hparams.lora), heads=self.head_modules)
            if self._sharded_load is not None:
                self._sharded_load.follow_copies(saved_module_copies(model))
        self.model = model  # compute_loss reads self.model, and calibration may run during attach
        if self.hparams.gradient_checkpointing:  # before attach: scoring passes then use the model's own function
            enable_activation_checkpointing(model)
        if method is not None and fitting:
            self._attach(method)
        if self.hparams.quantize and fitting and trainer is not None:  # a reload gets its shells from the checkpoint
            self._quantize_base(method)
        if self.device_mesh is not None:
            dtype = getattr(torch, self.hparams.fsdp_param_dtype) if self.hparams.fsdp_param_dtype else None
            fully_shard_model(model, self.device_mesh, dtype)
            # Lightning's FSDP2 loader demands every model tensor from a strict checkpoint, and a delta checkpoint
            # leaves the (rebuilt) base out; what trains is checked by name first (`_check_saved_tensors`), as
            # `load_state_dict` checks it in one process.
            self.strict_loading = bool(self.hparams.get("full_checkpoint"))
        if self._sharded_load is not None:
            load_shards(model, self._sharded_load, trainer.strategy.root_device if trainer else torch.device("cpu"))
            self._sharded_load = None

    def _merge_init_delta(self, model: nn.Module) -> None:
        """Add `init_delta` onto the freshly built base; `apply_delta` checks all of it first (shapes, names,
        finite values) and changes nothing on a bad file. A base waiting on the meta device to be loaded by shards
        keeps the updates of its checkpoint weights in the plan: each rank adds those in its rows as it reads them
        (`load_shards`, before `configure_model` returns)."""
        path = Path(self.hparams.init_delta).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"init_delta {path}: no such directory (an exported delta directory or a PEFT "
                                    "SHiRA / Super-Tuning adapter directory)")
        named = delta_base_model(path)
        if named is not None and not same_model(named, self.hparams.model_name_or_path):
            rank_zero_warn(f"init_delta {path} was trained on {named!r}, this run builds "
                           f"{self.hparams.model_name_or_path!r}: every shape matches, so it is applied; make sure "
                           "they are the same model")
        plan = self._sharded_load
        try:
            apply_delta(model, path, plan.defer if plan is not None else None)
        except BaseException:
            if plan is not None:
                plan.drop_updates()
            raise
        self._init_delta_merged = True
        rank_zero_info(f"init_delta: started from {path}")

    def _attach(self, method: SparseMethodCallback) -> None:
        """What trains: the method's deltas, plus its `dense_modules` (default: this module's new heads); everything
        else is frozen (`prepare_model`, the one place that decides it, with or without a Trainer)."""
        prepare_model(self.model, method, self.calibration(), self.head_modules)
        self._sparse_attached = True
        self._applied_orders = order_records(self.model)

    def _quantize_base(self, method: SparseMethodCallback | None) -> None:
        """After the method attached (S2FT permutes full-precision weights first; LoRA wraps its targets, which
        makes QLoRA), every frozen Linear but the heads is stored quantized."""
        if method is None and self.hparams.lora is None:
            raise ValueError(f"quantize={self.hparams.quantize!r} needs a frozen base: add a sparse method callback "
                             "or model.lora (full fine-tuning trains every weight)")
        if self.device_mesh is not None:
            raise ValueError("quantized bases are not supported under FSDP2 yet: use one device or DDP")
        dense = (method.dense_modules or []) if method is not None else []
        keep = [*self.head_modules, *dense, "lm_head"]
        quantize_frozen_linears(self.model, self.hparams.quantize, keep)

    def _attach_late(self, method: SparseMethodCallback) -> None:
        """The model was built by an earlier validate/test without the method (a baseline evaluation, say);
        attach now, or this fit would silently train every parameter."""
        if self.device_mesh is not None:
            raise RuntimeError(f"the model was built by an earlier run without {type(method).__name__}, and under a "
                               "sharding strategy delta layers must exist before the model is sharded: fit a freshly "
                               "constructed module")
        self._attach(method)

    def calibration(self) -> Calibration:
        """The first training batches, placed by the strategy on the model's device, and the training loss under the
        precision plugin's forward context: what SIFT and S2FT choose from. Batches come from a fresh training
        loader, so calibrating never moves the training order."""
        trainer = self.attached_trainer

        def draw(count: int) -> list[dict[str, Any]]:
            if trainer is None:
                raise ValueError("calibration batches come from the trainer's training data: run under Trainer.fit")
            device = next(self.model.parameters()).device
            batches = []
            for batch in self._training_batches(trainer):
                if len(batches) == count:
                    break
                batches.append(trainer.strategy.batch_to_device(batch, device))
            return batches

        def loss_fn(batch: dict[str, Any]) -> Tensor:
            if trainer is None:
                return self.compute_loss(batch)
            with trainer.precision_plugin.forward_context():
                return self.compute_loss(batch)

        return Calibration(draw=draw, loss_fn=loss_fn)

    def _training_batches(self, trainer: Trainer) -> Iterable[Any]:
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        if trainer.train_dataloader is not None:  # set once fitting runs (SIFT chooses at on_train_start)
            return trainer.train_dataloader
        raise ValueError("calibration batches are drawn from the training data before it is loaded: pass a "
                         "LightningDataModule to Trainer.fit (datamodule=...), or choose without data "
                         "(S2FT select_by='random' or 'weight', or load_selection)")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """What trains (and the small buffers beside it: indices, S2FT's records), never the frozen base, unless
        `full_checkpoint`: every Lightning checkpoint is written from this (FSDP2 gathers only these tensors)."""
        state = super().state_dict(*args, **kwargs)
        if self.hparams.get("full_checkpoint") or self.model is None:
            return state
        prefix = kwargs.get("prefix", "")
        frozen = frozen_base_keys(self)
        for key in [key for key in state if key.startswith(prefix) and key[len(prefix):] in frozen]:
            del state[key]
        return state

    def _checkpoint_keys(self) -> tuple[set[str], set[str]]:
        """(the keys a checkpoint must hold: every tensor `state_dict()` writes, the keys it may hold: every tensor
        of this module, frozen base included)."""
        return set(self.state_dict(keep_vars=True)), set(super().state_dict(keep_vars=True))

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Strict about what a checkpoint must hold (every tensor `state_dict()` writes; no key this module lacks),
        checked before anything changes; the frozen base may be absent (a delta checkpoint: the base was rebuilt).
        Under FSDP2 Lightning loads without calling this: `_check_saved_tensors` checks the same first."""
        needed, known = self._checkpoint_keys()
        if strict:
            check_checkpoint_keys(state_dict, needed, known, type(self).__name__, self._checkpoint_name())
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        result.missing_keys[:] = [key for key in result.missing_keys if key in needed]
        return result

    def _check_saved_tensors(self, path: Path) -> None:
        """What `load_state_dict` checks, for the checkpoint Lightning's FSDP2 loader is about to read into the
        sharded model: from the names of its tensors only (modules/sharded_checkpoint.py)."""
        saved = saved_tensor_names(path)
        if saved is None:
            return
        needed, known = self._checkpoint_keys()
        deltas = sorted(key for key in saved - known if is_delta_parameter(key))
        trainer = self.attached_trainer
        stage = trainer.state.fn if trainer is not None else None
        if deltas and stage not in (None, TrainerFn.FITTING):  # a fit without the method: check_same_method's case
            raise CheckpointKeysError(
                f"{path} holds sparse deltas (e.g. {deltas[0]}), but {stage.value} under FSDP2 builds the model "
                "without its method, and delta layers must exist before the model is sharded: run it on one device "
                "or under DDP, or export the checkpoint (sparse-lightning export) and evaluate the delta")
        check_checkpoint_keys(saved, needed, known, type(self).__name__, str(path))

    def _checkpoint_name(self) -> str:
        trainer = self.attached_trainer
        path = trainer.ckpt_path if trainer is not None else None
        return str(path) if path else "this checkpoint"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `load_from_checkpoint` builds the module without a trainer (so without callbacks), and validate/test build
        # it without attaching the method: recreate the checkpoint's delta layers so its state dict fits. A delta
        # checkpoint holds no base: this rebuilt one gets `init_delta`, S2FT's recorded permutation and `quantize`
        # as training did. (ModelParallelStrategy loads the weights itself, once `_check_saved_tensors` has checked
        # their names, and passes no "state_dict".)
        info = checkpoint.get("sparse_lightning", {})
        self._resumed_rng = info.get("rng")
        where = self._checkpoint_name()
        trainer = self.attached_trainer
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if fitting:
            check_same_method(info.get("method"), self.method, where)
        holds_base = info.get("holds_base", True)  # checkpoints written before delta checkpoints hold the model
        if not holds_base:
            check_same_base(info.get("base_fingerprint"), self._base_fingerprint, where)
        state = checkpoint.get("state_dict")
        if self.model is None:
            return
        if state is None:
            if not holds_base and not same_orders(order_records(self.model), self._applied_orders):
                raise ValueError(f"{where}: this run selected other S2FT units than the checkpoint, and a sharded base "
                                 "cannot be re-permuted: resume with load_selection (the file save_selection wrote)")
            return
        if not holds_base:
            self._rebuild_trained_base(state, info)
        if fitting and getattr(self.sparse_method(), "sizes_from_data", False):  # never this run's calibration's sizes
            resize_deltas_as_recorded(self.model, state, prefix="model.")
        attach_deltas_from_state_dict(self.model, state, prefix="model.")
        if self.hparams.quantize and holds_base:  # the packed weights come with the checkpoint
            quantized_shells_from_state_dict(self.model, state, self.hparams.quantize, "model.")
        elif self.hparams.quantize:  # quantize the rebuilt base where training did
            quantize_linears(self.model, info.get("quantized", []), self.hparams.quantize)
        if not fitting and isinstance(info.get("trainable"), list):  # the trained module's trainable set, as saved
            trainable = set(info["trainable"])
            for name, param in self.named_parameters():
                param.requires_grad_(name in trainable)

    def _rebuild_trained_base(self, state: dict[str, Any], info: dict[str, Any]) -> None:
        """The base a delta checkpoint adds onto: `init_delta` merged (a reload built it without a trainer), then
        S2FT's co-permutation as recorded (a resumed run that selected other units is put right)."""
        if self.hparams.get("init_delta") and not self._init_delta_merged:
            self._merge_init_delta(self.model)
        permute_as_recorded(self.model, orders_in_state_dict(state, "model."))
        self._applied_orders = order_records(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._require_finite_deltas()
        full = bool(self.hparams.get("full_checkpoint"))
        # Kept with the weights (also under save_weights_only): what export needs to describe the delta.
        checkpoint["sparse_lightning"] = {
            "method": self.method,
            "module_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "base_model": self.hparams.model_name_or_path,
            "callbacks": [cb.describe() for cb in self.sparse_callbacks()],
            "trainable": [name for name, p in self.named_parameters() if p.requires_grad],
            "init_delta": self.hparams.get("init_delta"),  # the exported delta adds onto base + init_delta
            "rng": rng_state(),
            "holds_base": full,  # False: `state_dict` left the frozen base out; loading rebuilds it
            "base_fingerprint": self._base_fingerprint,
        }
        if not full and self.model is not None and self.hparams.quantize:
            checkpoint["sparse_lightning"]["quantized"] = quantized_linear_names(self.model)

    def _require_finite_deltas(self) -> None:
        """A step can turn deltas non-finite after its (finite) loss; such a checkpoint would only spread NaN."""
        bad = [name for name, p in self.named_parameters()
               if is_delta_parameter(name) and not bool(torch.isfinite(getattr(p, "to_local", lambda: p)()).all())]
        trainer = self.attached_trainer
        finite = not bad if trainer is None else trainer.strategy.reduce_boolean_decision(not bad, all=True)
        if not finite:
            where = f" ({bad[0]})" if bad else " (on another rank)"
            raise FloatingPointError(f"not saving a checkpoint at step {self.global_step}: deltas are not finite"
                                     f"{where}; training diverged, lower the learning rate (optimizer lr)")

    def on_train_start(self) -> None:
        # A resumed run continues the random stream (dropout) where the checkpoint left it, so it retraces the
        # uninterrupted run; restored here, after everything that draws while a run is set up.
        if getattr(self, "_resumed_rng", None) is not None:
            restore_rng_state(self._resumed_rng)
            self._resumed_rng = None

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self)
        self.trainable_parameters = trainable
        rank_zero_info(f"[{self.method}] trainable params: {trainable:,} || all params: {total:,} "
                       f"|| trainable%: {100 * trainable / total:.4f}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        # Stop at the first non-finite loss (every rank agrees, so none waits in a collective), before it is logged
        # or stepped: a diverged run must not train on, checkpoint or export NaN deltas.
        finite = bool(torch.isfinite(loss.detach()).all())
        trainer = self.attached_trainer
        if trainer is not None:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite and self.global_step == 0:  # before any update: the model as built, not the learning rate
            init = self.hparams.get("init_delta")
            start = f"base + init_delta {init}" if init else f"the base model {self.hparams.model_name_or_path}"
            raise FloatingPointError(f"the training loss is {loss.item()} at step 0 (batch {batch_idx}), before any "
                                     f"update: {start} already gives a non-finite loss; check "
                                     f"{'the init_delta values' if init else 'its weights, the precision and the data'}"
                                     " (the learning rate is not the cause)")
        if not finite:
            raise FloatingPointError(f"the training loss is {loss.item()} at step {self.global_step} (batch {batch_idx} "
                                     "of the epoch): training diverged; lower the learning rate (optimizer lr)")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def loader_names(self, stage: str) -> list[str]:
        """The datamodule's names for its `stage` loaders (`val_set_names`, `test_set_names`; test falls
        back to the validation names, as GLUE evaluates on its dev sets)."""
        datamodule = self.attached_datamodule
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
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters: check the sparse callback's targets or dense_modules")
        optimizer = self.optimizer_factory(parameter_groups(named, self.hparams.get("head_lr")))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(self.hparams.lr_schedule, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
