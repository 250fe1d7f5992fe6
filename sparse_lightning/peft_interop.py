"""Moved to `sparse_lightning.borders` (the PEFT formats: `borders.peft`; exporting to them: `borders.export`,
`format="peft"` / `"peft-supertuning"`). Every name this module held is still importable from here."""

from sparse_lightning.borders.export import export_checkpoint_peft, export_peft
from sparse_lightning.borders.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_PICKLE,
    FORMATS,
    MIN_PEFT_VERSION,
    MODULE_NAME,
    PREFIX,
    SEQ_CLS_HEADS,
    SHIRA,
    SUPERTUNING,
    TASK_TYPES,
    PeftExportError,
    apply_peft_adapter,
    dense_modules,
    is_peft_adapter,
    pad_entries,
    peft_adapter,
    shira_rank,
    supertuning_count,
    supertuning_sparsity,
    target_entries,
    task_type_of,
    write_peft_adapter,
)
from sparse_lightning.borders.peft import checked_peft_updates as _checked_peft_updates

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_WEIGHTS_PICKLE", "FORMATS", "MIN_PEFT_VERSION", "MODULE_NAME",
    "PREFIX", "SEQ_CLS_HEADS", "SHIRA", "SUPERTUNING", "TASK_TYPES", "PeftExportError", "apply_peft_adapter",
    "dense_modules", "export_checkpoint_peft", "export_peft", "is_peft_adapter", "pad_entries", "peft_adapter",
    "shira_rank", "supertuning_count", "supertuning_sparsity", "target_entries", "task_type_of", "write_peft_adapter",
    "_checked_peft_updates",
]
