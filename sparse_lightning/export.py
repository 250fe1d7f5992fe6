"""Moved to `sparse_lightning.borders` (the export pipeline: `borders.export`; the delta format: `borders.delta`;
applying: `borders.apply`; checkpoints: `borders.checkpoint`; shared checks: `borders.checks`). Every name this module
held is still importable from here."""

from sparse_lightning.borders.apply import apply_delta
from sparse_lightning.borders.apply import checked_updates_any as _checked_any
from sparse_lightning.borders.apply import init_chain as _init_chain
from sparse_lightning.borders.checkpoint import (
    TRUSTED_MODULE_PACKAGE,
    CheckpointError,
    load_trained_module,
    module_class_for,
    read_checkpoint,
    require_finite_deltas,
    sparse_lightning_info,
)
from sparse_lightning.borders.checks import DeltaFileError, overflowing, require_finite_results
from sparse_lightning.borders.checks import add_rounding_once as _add_rounding_once
from sparse_lightning.borders.checks import readable_by_all as _readable_by_all
from sparse_lightning.borders.checks import require_finite as _require_finite
from sparse_lightning.borders.checks import require_finite_model as _require_finite_model
from sparse_lightning.borders.delta import (
    DELTA_CONFIG,
    DELTA_WEIGHTS,
    FORMAT,
    FORMAT_NAME,
    FORMAT_VERSION,
    delta_base_model,
    delta_tensors,
    export_delta,
)
from sparse_lightning.borders.export import export_checkpoint, export_model, run_start
from sparse_lightning.borders.export import save_tokenizer as _save_tokenizer

__all__ = [
    "DELTA_CONFIG", "DELTA_WEIGHTS", "FORMAT", "FORMAT_NAME", "FORMAT_VERSION", "TRUSTED_MODULE_PACKAGE",
    "CheckpointError", "DeltaFileError", "apply_delta", "delta_base_model", "delta_tensors", "export_checkpoint",
    "export_delta", "export_model", "load_trained_module", "module_class_for", "overflowing", "read_checkpoint",
    "require_finite_deltas", "require_finite_results", "run_start", "sparse_lightning_info",
    "_add_rounding_once", "_checked_any", "_init_chain", "_readable_by_all", "_require_finite", "_require_finite_model",
    "_save_tokenizer",
]
