"""Rebuilding the module a `sparse-lightning fit` checkpoint was saved from, without running code: checkpoints load
with `torch.load(weights_only=True)` and the module class a checkpoint names is imported only from this package (or
a class the caller names explicitly)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_lightning.borders.checkpoint_file import CheckpointError, read_checkpoint
from sparse_lightning.delta_checkpoint import BaseMismatchError
from sparse_lightning.modules import SparseFineTuningModule


#: Module classes a checkpoint may name without the caller vouching for them: this package's own.
TRUSTED_MODULE_PACKAGE = "sparse_lightning"
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def sparse_lightning_info(checkpoint: dict[str, Any], ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint's `sparse_lightning` entry (what export needs to describe the delta)."""
    info = checkpoint.get("sparse_lightning")
    if not isinstance(info, dict):
        raise CheckpointError(f"{ckpt_path} was not written by a sparse-lightning module (no 'sparse_lightning' entry)")
    return info



def module_class_for(ckpt_path: str | Path, named: Any, trusted: str | None = None) -> type:
    """The LightningModule class to rebuild: `trusted` when the caller names one, else the checkpoint's `named`
    class, which is imported only from this package."""
    path = trusted or named
    if not isinstance(path, str) or not _DOTTED_NAME.fullmatch(path):
        raise CheckpointError(f"{ckpt_path}: the module class {path!r} is not a dotted class path")
    if trusted is None and path.partition(".")[0] != TRUSTED_MODULE_PACKAGE:
        raise CheckpointError(f"{ckpt_path}: names the module class {path!r}, outside {TRUSTED_MODULE_PACKAGE}; "
                              f"classes named by a checkpoint are imported only from {TRUSTED_MODULE_PACKAGE}. If you "
                              f"trust it, name it yourself: --module_class {path}")
    module_path, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_path), class_name)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(f"{ckpt_path}: cannot import the module class {path!r} ({error})") from None
    if not (isinstance(cls, type) and issubclass(cls, SparseFineTuningModule)):
        raise CheckpointError(f"{ckpt_path}: {path!r} is not a SparseFineTuningModule subclass")
    return cls



def require_finite_deltas(checkpoint: dict[str, Any], ckpt_path: str | Path) -> None:
    """Refuse a checkpoint whose trained tensors hold NaN or Inf (a diverged run)."""
    state = checkpoint.get("state_dict", {})
    trainable = checkpoint.get("sparse_lightning", {}).get("trainable", [])
    for name in trainable:
        value = state.get(name)
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{ckpt_path}: refusing to export: {name} holds {bad} non-finite value(s) (NaN/Inf); "
                                  "the run diverged: train again with a lower learning rate")



def load_trained_module(ckpt_path: str | Path, module_class: str | None = None):
    """Rebuild the LightningModule a sparse-lightning checkpoint was saved from (on CPU), reading it with
    `weights_only=True`; `module_class` names a class of your own to rebuild it with."""
    checkpoint = read_checkpoint(ckpt_path)
    info = sparse_lightning_info(checkpoint, ckpt_path)
    cls = module_class_for(ckpt_path, info.get("module_class"), module_class)
    require_finite_deltas(checkpoint, ckpt_path)
    del checkpoint
    try:  # a delta checkpoint: the base is rebuilt from model_name_or_path and must be the one it was trained on
        return cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True), info
    except BaseMismatchError as error:
        raise CheckpointError(f"{ckpt_path}: {error}") from None
