"""Write trained deltas as files (safetensors + JSON metadata) and/or a merged plain HF model.

The delta file holds, per target weight, flat row-major `indices` and fp32 `values` in the HF
model's own parameter names (S2FT: the original-layout `columns` or `rows` and a dense fp32 `block`,
already un-permuted), plus every densely trained parameter (e.g. the classifier) in full.
`apply_delta` adds such a file onto a freshly loaded base model.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparse_lightning.sparse import merge_and_unwrap, sparse_delta_layers
from sparse_lightning.sparse.block import block_delta_layers
from sparse_lightning.structure import restore_original_layout

DELTA_WEIGHTS = "delta.safetensors"
DELTA_CONFIG = "delta_config.json"
FORMAT = "sparse_lightning.delta/1"


def delta_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The delta of an HF model with attached deltas: tensors to save and the per-target metadata."""
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, Any] = {}
    for name, layer in sparse_delta_layers(model).items():
        tensors[f"{name}.indices"] = layer.delta_indices.detach().cpu().contiguous()
        tensors[f"{name}.values"] = layer.delta_values.detach().float().cpu().contiguous()
        targets[name] = {"shape": list(layer.weight_shape), "k": layer.k, "weight": f"{name}.weight"}
    for name, layer in block_delta_layers(model).items():
        kind = "columns" if layer.dim == 1 else "rows"
        tensors[f"{name}.{kind}"] = layer.index.detach().cpu().contiguous()
        tensors[f"{name}.block"] = layer.delta_block.detach().float().cpu().contiguous()
        targets[name] = {"shape": list(layer.weight_shape), "kind": kind, "size": layer.size, "weight": f"{name}.weight"}
    return tensors, targets


def export_delta(model: nn.Module, output: str | Path, metadata: dict[str, Any], dense: list[str]) -> Path:
    """Write `delta.safetensors` and `delta_config.json`; `dense` names fully trained HF parameters."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tensors, targets = delta_tensors(model)
    params = dict(model.named_parameters())
    for name in dense:
        tensors[name] = params[name].detach().cpu().contiguous()
    save_file(tensors, str(output / DELTA_WEIGHTS))
    config = {"format": FORMAT, **metadata, "targets": targets, "dense": dense}
    (output / DELTA_CONFIG).write_text(json.dumps(config, indent=2))
    return output


@torch.no_grad()
def apply_delta(model: nn.Module, delta_dir: str | Path) -> nn.Module:
    """Add an exported delta onto a plain base model in place (the model then equals the merged one)."""
    delta_dir = Path(delta_dir)
    config = json.loads((delta_dir / DELTA_CONFIG).read_text())
    tensors = load_file(str(delta_dir / DELTA_WEIGHTS))
    params = dict(model.named_parameters())
    for name, target in config["targets"].items():
        weight = params.get(target["weight"])
        if weight is None or list(weight.shape) != target["shape"]:
            raise ValueError(f"{delta_dir}: target {target['weight']} of shape {target['shape']} does not exist in "
                             f"this model; was the delta trained on {config.get('base_model')}?")
        kind = target.get("kind", "entries")
        if kind == "entries":
            flat = weight.view(-1)
            flat.index_add_(0, tensors[f"{name}.indices"].to(flat.device), tensors[f"{name}.values"].to(flat))
        else:  # an S2FT block on original-layout columns or rows
            index = tensors[f"{name}.{kind}"].to(weight.device)
            weight.index_add_(1 if kind == "columns" else 0, index, tensors[f"{name}.block"].to(weight))
    for name in config["dense"]:
        params[name].copy_(tensors[name])
    return model


def load_trained_module(ckpt_path: str | Path):
    """Rebuild the LightningModule a sparse-lightning checkpoint was saved from (on CPU)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    info = checkpoint.get("sparse_lightning")
    if info is None:
        raise ValueError(f"{ckpt_path} was not written by a sparse-lightning module (no 'sparse_lightning' entry)")
    module_path, _, class_name = info["module_class"].rpartition(".")
    cls = getattr(importlib.import_module(module_path), class_name)
    return cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False), info


def export_checkpoint(ckpt_path: str | Path, output: str | Path, merged: bool = False) -> dict[str, Path]:
    """Export a checkpoint's delta to `output` (sparse methods) and, if `merged`, a plain HF model to
    `output/merged` that vanilla transformers loads."""
    module, info = load_trained_module(ckpt_path)
    model = module.model
    written: dict[str, Path] = {}
    hf_trainable = [name.removeprefix("model.") for name in info["trainable"]]
    if sparse_delta_layers(model) or block_delta_layers(model):
        dense = [name for name in hf_trainable if not name.endswith(("delta_values", "delta_block"))]
        metadata = {key: info[key] for key in ("method", "base_model", "callbacks")}
        written["delta"] = export_delta(model, output, metadata, dense)
    elif not merged:
        raise ValueError(f"{ckpt_path} holds a {info['method']} model, not a sparse delta: pass --merged true")
    if merged:
        if hasattr(model, "merge_and_unload"):  # the PEFT LoRA baseline
            model = model.merge_and_unload()
        merged_dir = Path(output) / "merged"
        restore_original_layout(merge_and_unwrap(model)).save_pretrained(merged_dir)
        _save_tokenizer(info["base_model"], merged_dir)
        written["merged"] = merged_dir
    return written


def _save_tokenizer(base_model: str, output: Path) -> None:
    from transformers import AutoTokenizer

    from sparse_lightning.models import resolve_model_path

    AutoTokenizer.from_pretrained(resolve_model_path(base_model)).save_pretrained(output)
