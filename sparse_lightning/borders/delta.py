"""This library's delta format: `delta.safetensors` + `delta_config.json`, written and checked.

The delta file holds, per target weight, flat row-major `indices` and fp32 `values` in the HF model's own parameter
names (S2FT: the original-layout `columns` or `rows` and a dense fp32 `block`, already un-permuted), plus every densely
trained parameter (e.g. the classifier) in full. `checked_delta_updates` checks such a file completely; applying it
(`sparse_lightning.borders.apply`) then adds it onto a freshly loaded base model. Delta files are safetensors and JSON:
reading them runs no code.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from sparse_lightning.borders.checks import (
    TensorFile,
    read_json_object,
    readable_by_all,
    require_finite,
    require_finite_results,
    unchanged_model_error,
)
from sparse_lightning.sparse import delta_layers


DELTA_WEIGHTS = "delta.safetensors"
DELTA_CONFIG = "delta_config.json"
FORMAT_NAME = "sparse_lightning.delta"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"


def delta_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The delta of an HF model with attached deltas: tensors to save and the per-target metadata (each layer
    writes its own, in the base weight's original layout)."""
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, Any] = {}
    for name, layer in delta_layers(model).items():
        layer_tensors, targets[name] = layer.export_tensors(name)
        tensors.update(layer_tensors)
    return tensors, targets



def export_delta(model: nn.Module, output: str | Path, metadata: dict[str, Any], dense: list[str]) -> Path:
    """Write `delta.safetensors` and `delta_config.json`; `dense` names fully trained HF parameters."""
    output = Path(output)
    tensors, targets = delta_tensors(model)
    params = dict(model.named_parameters())
    for name in dense:
        tensors[name] = params[name].detach().cpu().contiguous()
    require_finite(tensors, "the delta")
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / DELTA_WEIGHTS))
    config = {"format": FORMAT, **metadata, "targets": targets, "dense": dense}
    (output / DELTA_CONFIG).write_text(json.dumps(config, indent=2))
    readable_by_all(output / DELTA_WEIGHTS, output / DELTA_CONFIG)
    return output



def checked_delta_updates(model: nn.Module, delta_dir: Path) -> list[tuple[Tensor, int | None, Tensor | None, Tensor]]:
    """Everything `apply_delta` will do, as (weight, dim or None, index, delta), after checking all of it."""
    config_path, weights_path = delta_dir / DELTA_CONFIG, delta_dir / DELTA_WEIGHTS

    for path in (config_path, weights_path):
        if not path.is_file():
            raise unchanged_model_error(path, "no such file (a delta directory holds delta_config.json and delta.safetensors)")
    config = read_json_object(config_path)
    fmt = config.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_NAME + "/"):
        raise unchanged_model_error(config_path, f"format {fmt!r} is not a sparse-lightning delta (expected {FORMAT!r})")
    if fmt != FORMAT:
        raise unchanged_model_error(config_path, f"format version {fmt.rpartition('/')[2]!r} is not supported (this version reads "
                                f"{FORMAT!r})")
    targets, dense = config.get("targets"), config.get("dense", [])
    if not isinstance(targets, dict):
        raise unchanged_model_error(config_path, "'targets' must be an object of target weights")
    if not isinstance(dense, list) or not all(isinstance(name, str) for name in dense):
        raise unchanged_model_error(config_path, "'dense' must be a list of parameter names")
    file = TensorFile(weights_path)
    tensors = file.tensors
    params = dict(model.named_parameters())
    base = config.get("base_model")
    expected_keys: set[str] = set()
    updates: list[tuple[Tensor, int | None, Tensor | None, Tensor]] = []

    def tensor(key: str) -> Tensor:
        if key not in tensors:
            raise file.error(f"tensor {key!r} is missing")
        expected_keys.add(key)
        return tensors[key]

    def positions(key: str, size: int) -> Tensor:
        return file.positions(key, file.integers(key, tensor(key)), size)

    for name, target in targets.items():
        if not isinstance(target, dict) or not isinstance(target.get("weight"), str):
            raise unchanged_model_error(config_path, f"target {name!r} must be an object with a 'weight' name")
        weight_name, shape, kind = target["weight"], target.get("shape"), target.get("kind", "entries")
        weight = params.get(weight_name)
        if weight is None:
            raise unchanged_model_error(config_path, f"target {name!r}: this model has no parameter {weight_name!r}; was the delta "
                                    f"trained on {base}?")
        if not isinstance(shape, list) or list(weight.shape) != shape:
            raise unchanged_model_error(config_path, f"target {name!r}: {weight_name} has shape {list(weight.shape)} in this model, "
                                    f"the delta says {shape}; was the delta trained on {base}?")
        if kind == "entries":
            index = positions(f"{name}.indices", weight.numel())
            values = file.floats(f"{name}.values", tensor(f"{name}.values"))
            if values.numel() != index.numel():
                raise unchanged_model_error(weights_path, f"tensor {name + '.values'!r} holds {values.numel()} values for "
                                         f"{index.numel()} indices")
            if "k" in target and target["k"] != index.numel():
                raise unchanged_model_error(weights_path, f"target {name!r}: {index.numel()} indices, the config says k={target['k']}")
            updates.append((weight, -1, index, values))
        elif kind in ("columns", "rows"):
            dim = 1 if kind == "columns" else 0
            index = positions(f"{name}.{kind}", weight.shape[dim])
            block = file.floats(f"{name}.block", tensor(f"{name}.block"), ndim=2)
            expected = list(weight.shape)
            expected[dim] = index.numel()
            if list(block.shape) != expected:
                raise unchanged_model_error(weights_path, f"tensor {name + '.block'!r} has shape {list(block.shape)}, expected "
                                         f"{expected} for {index.numel()} {kind}")
            updates.append((weight, dim, index, block))
        else:
            raise unchanged_model_error(config_path, f"target {name!r}: unknown kind {kind!r} (entries, columns or rows)")
    for name in dense:
        if name not in params:
            raise unchanged_model_error(config_path, f"dense parameter {name!r} does not exist in this model; was the delta trained "
                                    f"on {base}?")
        value = file.floats(name, tensor(name), ndim=params[name].dim())
        if value.shape != params[name].shape:
            raise unchanged_model_error(weights_path, f"tensor {name!r} has shape {list(value.shape)}, the model's parameter "
                                     f"{list(params[name].shape)}")
        updates.append((params[name], None, None, value))
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise unchanged_model_error(weights_path, f"tensor {unexpected[0]!r} is not described by {DELTA_CONFIG} "
                                 f"({len(unexpected)} such tensor(s))")
    touched = [id(weight) for weight, *_ in updates]
    if len(set(touched)) != len(touched):
        raise unchanged_model_error(config_path, "two entries change the same parameter")
    require_finite_results(model, updates, lambda problem: unchanged_model_error(weights_path, problem))
    return updates



def warn_if_quantized_run(directory: Path) -> None:
    quantize = json.loads((directory / DELTA_CONFIG).read_text(encoding="utf-8")).get("quantize")
    if quantize:
        warnings.warn(f"{directory} was trained on a {quantize}-quantized base: on another base (this one, unless you "
                      f"quantized it the same way) the result differs from the trained model by the quantization "
                      "error; the trained model itself is the merged export (--merged true)", stacklevel=3)



def delta_base_model(delta_dir: str | Path) -> str | None:
    """The base model a delta or PEFT adapter directory names (None when it names none or cannot be read: then
    `apply_delta` reports the problem)."""
    for name, key in ((DELTA_CONFIG, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            config = json.loads((Path(delta_dir) / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(config, dict) and isinstance(config.get(key), str):
            return config[key]
    return None
