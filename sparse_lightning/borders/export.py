"""The one export pipeline: a trained model (or a checkpoint) -> a directory in one format, and a merged HF model.

Every format goes the same way: one metadata block (`run_metadata`: method, base model, the methods' settings, and
what the trained model is besides base + delta: `init_delta`, `quantize`), the same facts for the model card, the same
checks (`sparse_lightning.borders.checks`), then its writer (`WRITERS`: this library's delta, PEFT SHiRA, PEFT
Super-Tuning), the merged model if asked, and a README.md model card in every directory, all written aside and moved
into place whole (`sparse_lightning.borders.export_target`). What a format cannot hold is refused or warned about in
one place (`_refuse_what_the_format_cannot_hold`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from torch import nn
from transformers import AutoTokenizer

from sparse_lightning.borders.checkpoint import load_trained_module
from sparse_lightning.borders.checks import readable_by_all, require_finite_model
from sparse_lightning.borders.delta import export_delta
from sparse_lightning.borders.export_target import check_export_target, published, staged_export
from sparse_lightning.borders.model_card import run_facts, write_model_cards
from sparse_lightning.borders.models import resolve_model_path
from sparse_lightning.borders.peft import SHIRA, SUPERTUNING, PeftExportError, write_peft_adapter
from sparse_lightning.sparse import delta_layers, merge_and_unwrap
from sparse_lightning.sparse.frozen_delta import is_delta_parameter
from sparse_lightning.sparse.quantized import dequantize_model
from sparse_lightning.structure import restore_original_layout

#: A writer puts one format's files in a directory: (HF model with deltas, directory, dense parameter names, metadata).
Writer = Callable[[nn.Module, Path, list[str], dict[str, Any]], Path]

#: `--format` -> (the key of its directory in the returned dict, its writer).
WRITERS: dict[str, tuple[str, Writer]] = {
    "delta": ("delta", lambda model, out, dense, metadata: export_delta(model, out, metadata, dense)),
    "peft": ("peft", lambda model, out, dense, metadata: write_peft_adapter(
        model, out, dense, SHIRA, metadata.get("base_model"), metadata)),
    "peft-supertuning": ("peft", lambda model, out, dense, metadata: write_peft_adapter(
        model, out, dense, SUPERTUNING, metadata.get("base_model"), metadata)),
}
#: The formats that are PEFT adapters (`export_peft` writes these).
PEFT_FORMATS = ("peft", "peft-supertuning")


def run_metadata(method: str, base_model: str | None, callbacks: list[dict[str, Any]], hparams: Any = None
                 ) -> dict[str, Any]:
    """The metadata block every format records (the delta's config, the model card): the method, the base model, the
    methods' settings and `run_start`."""
    return {"method": method, "base_model": base_model, "callbacks": callbacks,
            **(run_start(hparams) if hparams is not None else {})}


def run_start(hparams: Any) -> dict[str, Any]:
    """What the trained model is besides base + delta: `init_delta` (trained from base + that delta: `apply_delta`
    applies it first) and `quantize` (trained on a quantized base: `apply_delta` warns on a full-precision one)."""
    return {key: hparams.get(key) for key in ("init_delta", "quantize") if hparams.get(key)}


def export_checkpoint(ckpt_path: str | Path, output: str | Path, merged: bool = False,
                      module_class: str | None = None, replace: bool = False, format: str = "delta"
                      ) -> dict[str, Path]:
    """Export a checkpoint's delta to `output` in `format` (`WRITERS`) and, if `merged`, a plain HF model to
    `output/merged` that vanilla transformers loads. `output` must be new or empty unless `replace` (then it is
    replaced whole); it appears complete or not at all (`sparse_lightning.borders.export_target`)."""
    _require_format(format)
    target = check_export_target(output, replace, keep=[ckpt_path])
    module, info = load_trained_module(ckpt_path, module_class)
    trainable = [name.removeprefix("model.") for name in info["trainable"]]
    metadata = run_metadata(info["method"], info["base_model"], info["callbacks"], module.hparams)
    facts = run_facts(module.model, trainable, checkpoint=ckpt_path)  # before the in-place merge
    return _export(module.model, target, replace, format, merged, metadata, trainable, facts, in_place=True)


def export_model(model: nn.Module, output: str | Path, merged: bool = False, base_model: str | None = None,
                 replace: bool = False, format: str = "delta") -> dict[str, Path]:
    """Export a trained model without a checkpoint: `model` is a `SparseFineTuningModule` or an HF model with
    deltas attached. Writes the delta in `format` (densely trained parameters included) and, if `merged`, a plain HF
    model to `output/merged`; the model passed in is left as it was (the merge happens on a copy). `output` as in
    `export_checkpoint`."""
    _require_format(format)
    target = check_export_target(output, replace)
    module = model if isinstance(model, LightningModule) else None
    hf_model = module.model if module is not None else model
    if module is not None:
        metadata = run_metadata(module.method, module.hparams.model_name_or_path,
                                [cb.describe() for cb in module.sparse_callbacks()], module.hparams)
    else:
        methods = sorted({type(layer).__name__ for layer in delta_layers(hf_model).values()})
        metadata = run_metadata("+".join(methods) or "full",
                                base_model or getattr(getattr(hf_model, "config", None), "_name_or_path", None), [])
    trainable = [name for name, param in hf_model.named_parameters() if param.requires_grad]
    facts = run_facts(hf_model, trainable, module=module)
    return _export(hf_model, target, replace, format, merged, metadata, trainable, facts, in_place=False)


def export_peft(model: nn.Module, output: str | Path, format: str = "peft", merged: bool = False,
                base_model: str | None = None, replace: bool = False) -> dict[str, Path]:
    """`export_model` as a PEFT adapter directory (`format` "peft": SHiRA, "peft-supertuning": Super-Tuning)."""
    _require_format(format, PEFT_FORMATS)
    return export_model(model, output, merged=merged, base_model=base_model, replace=replace, format=format)


def export_checkpoint_peft(ckpt_path: str | Path, output: str | Path, format: str = "peft", merged: bool = False,
                           module_class: str | None = None, replace: bool = False) -> dict[str, Path]:
    """`export_checkpoint` as a PEFT adapter directory (`format` as in `export_peft`)."""
    _require_format(format, PEFT_FORMATS)
    return export_checkpoint(ckpt_path, output, merged=merged, module_class=module_class, replace=replace,
                             format=format)


def _require_format(format: str, formats: tuple[str, ...] | None = None) -> None:
    formats = formats or tuple(WRITERS)
    if format not in formats:
        what = "PEFT format" if formats == PEFT_FORMATS else "export format"
        raise ValueError(f"unknown {what} {format!r}: choose one of {', '.join(formats)}")


def _refuse_what_the_format_cannot_hold(model: nn.Module, format: str, merged: bool, metadata: dict[str, Any]) -> None:
    """A run a format cannot represent is refused before anything is written; what it cannot record warns."""
    if format in PEFT_FORMATS:
        if not delta_layers(model):
            what = "a LoRA model: it is a PEFT adapter already (save it with save_pretrained)" if hasattr(
                model, "peft_config") else f"a {metadata['method']} model, not a sparse delta"
            raise PeftExportError(f"{what}; export it merged (--format delta --merged true)")
        if metadata.get("init_delta"):
            raise PeftExportError(f"this run started from init_delta {metadata['init_delta']}, which a PEFT adapter "
                                  "cannot carry (PEFT would load it onto the plain base): export --format delta (it "
                                  "records init_delta, and apply_delta applies both) or --format delta --merged true")
        if metadata.get("quantize"):
            warnings.warn(f"this run trained on a {metadata['quantize']}-quantized base, which a PEFT adapter cannot "
                          "record: on the full-precision base the adapter differs from the trained model by the "
                          "quantization error; the merged export (--merged true) is the trained model", stacklevel=4)
    elif not delta_layers(model) and not merged:
        raise ValueError(f"the model is a {metadata['method']} model, not a sparse delta: export it merged "
                         "(--merged true / merged=True)")


def _export(model: nn.Module, target: Path, replace: bool, format: str, merged: bool, metadata: dict[str, Any],
            trainable: list[str], facts: dict[str, Any], in_place: bool) -> dict[str, Path]:
    """The format's files, the merged model if asked, and a README.md model card in every directory, written aside
    and moved to `target` whole."""
    _refuse_what_the_format_cannot_hold(model, format, merged, metadata)
    key, writer = WRITERS[format]
    with staged_export(target, replace) as staging:
        written: dict[str, Path] = {}
        if delta_layers(model):
            dense = [name for name in trainable if not is_delta_parameter(name)]
            written[key] = writer(model, staging, dense, metadata)
        if merged:
            written["merged"] = write_merged(model if in_place else copy.deepcopy(model), staging / "merged",
                                             metadata.get("base_model"))
        write_model_cards(written, metadata, facts, staged=(staging, target))
    return published(written, staging, target)


def write_merged(model: nn.Module, output: Path, base_model: str | None) -> Path:
    """A plain HF model (deltas added, original layout, de-quantized) and the base's tokenizer; `model` is merged in
    place."""
    if hasattr(model, "merge_and_unload"):  # the PEFT LoRA baseline; QLoRA's base de-quantized first, as PEFT does
        model = dequantize_model(model).merge_and_unload()  # adds into base_layer.weight (never re-quantized)
    model = restore_original_layout(dequantize_model(merge_and_unwrap(model)))
    require_finite_model(model, "the merged model")
    model.save_pretrained(output)
    if base_model:
        save_tokenizer(base_model, output)
    readable_by_all(*(path for path in output.rglob("*") if path.is_file()))
    return output


def save_tokenizer(base_model: str, output: Path) -> None:
    AutoTokenizer.from_pretrained(resolve_model_path(base_model)).save_pretrained(output)
