"""Write trained deltas as files (safetensors + JSON metadata) and/or a merged plain HF model.

The delta file holds, per target weight, flat row-major `indices` and fp32 `values` in the HF
model's own parameter names (S2FT: the original-layout `columns` or `rows` and a dense fp32 `block`,
already un-permuted), plus every densely trained parameter (e.g. the classifier) in full.
`apply_delta` checks such a file completely, then adds it onto a freshly loaded base model.

Nothing read here runs code: checkpoints load with `torch.load(weights_only=True)`, delta files are
safetensors and JSON, and the module class a checkpoint names is imported only from this package
(or a class the caller names explicitly).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sparse_lightning.delta_checkpoint import BaseMismatchError
from sparse_lightning.export_target import check_export_target, published, staged_export
from sparse_lightning.sparse import delta_layers, merge_and_unwrap
from sparse_lightning.sparse.frozen_delta import is_delta_parameter
from sparse_lightning.sparse.quantized import dequantize_model
from sparse_lightning.structure import restore_original_layout

DELTA_WEIGHTS = "delta.safetensors"
DELTA_CONFIG = "delta_config.json"
FORMAT_NAME = "sparse_lightning.delta"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
#: Module classes a checkpoint may name without the caller vouching for them: this package's own.
TRUSTED_MODULE_PACKAGE = "sparse_lightning"
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class CheckpointError(ValueError):
    """A checkpoint that is refused: unreadable, needing code to load, foreign, or holding non-finite deltas."""


class DeltaFileError(ValueError):
    """A delta directory that fails validation; nothing was changed."""


# ------------------------------------------------------------------------------------------------- writing


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
    _require_finite(tensors, "the delta")
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / DELTA_WEIGHTS))
    config = {"format": FORMAT, **metadata, "targets": targets, "dense": dense}
    (output / DELTA_CONFIG).write_text(json.dumps(config, indent=2))
    _readable_by_all(output / DELTA_WEIGHTS, output / DELTA_CONFIG)
    return output


def _require_finite(tensors: dict[str, Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"refusing to write {what}: {name} holds {bad} non-finite value(s) (NaN/Inf); "
                             "the run diverged: train again with a lower learning rate")


def _readable_by_all(*paths: Path) -> None:
    """The mode a plainly created file gets (0644 under the usual umask 022): safetensors and some writers use 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


# ------------------------------------------------------------------------------------------------- applying


@torch.no_grad()
def apply_delta(model: nn.Module, delta_dir: str | Path) -> nn.Module:
    """Add an exported delta onto a plain base model in place (the model then equals the merged one).

    The whole directory is checked first (format and version, every target weight and its shape, index range,
    uniqueness and count, values finite in fp32, the dtype they are added in, and base + delta finite in the weight's
    dtype, the dense parameters); any problem raises `DeltaFileError` naming the file, the tensor and the problem, and
    leaves the model untouched. Low-precision weights get the delta added in fp32 and rounded once. A delta trained
    from `init_delta` (recorded in its config) gets that delta applied first, as training did. A PEFT SHiRA or
    Super-Tuning adapter directory (`adapter_config.json`) is read the same way
    (`sparse_lightning.peft_interop.apply_peft_adapter`). A delta trained on a quantized base warns: on a
    full-precision base the result differs from the trained model by the quantization error.
    """
    chain = _init_chain(Path(delta_dir))
    undo: list[tuple[Tensor, int | None, Tensor | None, Tensor]] = []
    try:
        for directory in chain:
            for weight, dim, index, delta in _checked_any(model, directory):
                undo.append((weight, dim, index, _values_at(weight, dim, index).clone()))
                _write_update(weight, dim, index, delta)
    except BaseException:
        for weight, dim, index, saved in reversed(undo):  # an init_delta applied before a later directory failed
            _put_values(weight, dim, index, saved)
        raise
    return model


def _init_chain(delta_dir: Path) -> list[Path]:
    """The directories to apply, in order: the `init_delta` a delta records (and its own, ...), then the delta."""
    chain = [delta_dir]
    while True:
        config_path = chain[0] / DELTA_CONFIG
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return chain  # not ours, or unreadable: the checks report it
        init = config.get("init_delta") if isinstance(config, dict) else None
        if not init:
            return chain
        path = Path(str(init)).expanduser()
        if not path.is_dir():
            raise DeltaFileError(f"{config_path}: this delta was trained from init_delta {init} (base + that delta), "
                                 "which is not a directory here: put it there or fix init_delta in the config; the "
                                 "model was not changed")
        if any(path.resolve() == seen.resolve() for seen in chain) or len(chain) > 16:
            raise DeltaFileError(f"{config_path}: init_delta {init} leads back to a delta already in the chain; the "
                                 "model was not changed")
        chain.insert(0, path)


def _checked_any(model: nn.Module, directory: Path) -> list[tuple[Tensor, int | None, Tensor | None, Tensor]]:
    """`_checked_updates` for our delta directories, `_checked_peft_updates` for a PEFT adapter, in one form."""
    if (directory / "adapter_config.json").is_file():
        from sparse_lightning.peft_interop import _checked_peft_updates

        return [(weight, None if flat is None else -1, flat, values)
                for weight, flat, values in _checked_peft_updates(model, directory)]
    updates = _checked_updates(model, directory)
    _warn_if_quantized_run(directory)
    return updates


def _warn_if_quantized_run(directory: Path) -> None:
    quantize = json.loads((directory / DELTA_CONFIG).read_text(encoding="utf-8")).get("quantize")
    if quantize:
        warnings.warn(f"{directory} was trained on a {quantize}-quantized base: on another base (this one, unless you "
                      f"quantized it the same way) the result differs from the trained model by the quantization "
                      "error; the trained model itself is the merged export (--merged true)", stacklevel=3)


def _write_update(weight: Tensor, dim: int | None, index: Tensor | None, delta: Tensor) -> None:
    if dim is None:  # a dense parameter, replaced
        weight.copy_(delta)
    else:
        _add_rounding_once(weight, dim, index, delta)


def _values_at(weight: Tensor, dim: int | None, index: Tensor | None) -> Tensor:
    """The weight's values an update writes (the whole weight for a dense replacement)."""
    if dim is None:
        return weight.detach()
    target = weight.detach().view(-1) if dim == -1 else weight.detach()
    return target.index_select(0 if dim == -1 else dim, index.to(device=target.device, dtype=torch.long))


def _put_values(weight: Tensor, dim: int | None, index: Tensor | None, values: Tensor) -> None:
    if dim is None:
        weight.copy_(values)
    else:
        target = weight.view(-1) if dim == -1 else weight
        target.index_copy_(0 if dim == -1 else dim, index.to(device=target.device, dtype=torch.long), values)


def overflowing(weight: Tensor, dim: int | None, index: Tensor | None, delta: Tensor) -> int:
    """How many entries of `weight` an update would leave non-finite: base + delta summed in fp32 and rounded to the
    weight's dtype (a dense replacement: the value in that dtype). A float64 1e300 passes a float64 finite check and
    is inf in fp32; an fp16 weight overflows at 65504."""
    if dim is None:
        result = delta.to(weight.dtype)
    else:
        result = (_values_at(weight, dim, index).float() + delta.to(device=weight.device, dtype=torch.float32))
        result = result.to(weight.dtype)
    return int((~torch.isfinite(result)).sum())


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


def _add_rounding_once(weight: Tensor, dim: int, index: Tensor, delta: Tensor) -> None:
    """`weight[index along dim] += delta`, summed in fp32 and rounded to weight's dtype once (index is unique)."""
    target = weight.view(-1) if dim == -1 else weight
    along = 0 if dim == -1 else dim
    index = index.to(device=target.device, dtype=torch.long)
    summed = target.index_select(along, index).float() + delta.to(device=target.device, dtype=torch.float32)
    target.index_copy_(along, index, summed.to(target.dtype))


def _checked_updates(model: nn.Module, delta_dir: Path) -> list[tuple[Tensor, int | None, Tensor | None, Tensor]]:
    """Everything `apply_delta` will do, as (weight, dim or None, index, delta), after checking all of it."""
    config_path, weights_path = delta_dir / DELTA_CONFIG, delta_dir / DELTA_WEIGHTS

    def fail(where: Path, problem: str) -> DeltaFileError:
        return DeltaFileError(f"{where}: {problem}; the model was not changed")

    for path in (config_path, weights_path):
        if not path.is_file():
            raise fail(path, "no such file (a delta directory holds delta_config.json and delta.safetensors)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(config_path, f"not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise fail(config_path, f"expected a JSON object, got {type(config).__name__}")
    fmt = config.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_NAME + "/"):
        raise fail(config_path, f"format {fmt!r} is not a sparse-lightning delta (expected {FORMAT!r})")
    if fmt != FORMAT:
        raise fail(config_path, f"format version {fmt.rpartition('/')[2]!r} is not supported (this version reads "
                                f"{FORMAT!r})")
    targets, dense = config.get("targets"), config.get("dense", [])
    if not isinstance(targets, dict):
        raise fail(config_path, "'targets' must be an object of target weights")
    if not isinstance(dense, list) or not all(isinstance(name, str) for name in dense):
        raise fail(config_path, "'dense' must be a list of parameter names")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise fail(weights_path, f"not a readable safetensors file ({error})") from None

    params = dict(model.named_parameters())
    base = config.get("base_model")
    expected_keys: set[str] = set()
    updates: list[tuple[Tensor, int | None, Tensor | None, Tensor]] = []

    def tensor(key: str, *, integer: bool, ndim: int) -> Tensor:
        if key not in tensors:
            raise fail(weights_path, f"tensor {key!r} is missing")
        value = tensors[key]
        expected_keys.add(key)
        kind_ok = not value.is_floating_point() and value.dtype != torch.bool if integer else value.is_floating_point()
        if not kind_ok or value.dim() != ndim:
            want = "integer" if integer else "floating-point"
            raise fail(weights_path, f"tensor {key!r} must be a {ndim}-D {want} tensor, got {value.dim()}-D "
                                     f"{value.dtype}")
        if not integer and not bool(torch.isfinite(value.float()).all()):
            raise fail(weights_path, f"tensor {key!r} holds {int((~torch.isfinite(value.float())).sum())} non-finite "
                                     "value(s) in fp32, the dtype deltas are added in")
        return value

    def positions(key: str, size: int) -> Tensor:
        index = tensor(key, integer=True, ndim=1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise fail(weights_path, f"tensor {key!r} has an index outside [0, {size}) (min {int(index.min())}, "
                                     f"max {int(index.max())})")
        if index.unique().numel() != index.numel():
            raise fail(weights_path, f"tensor {key!r} repeats an index ({index.numel() - index.unique().numel()} "
                                     "duplicate(s))")
        return index

    for name, target in targets.items():
        if not isinstance(target, dict) or not isinstance(target.get("weight"), str):
            raise fail(config_path, f"target {name!r} must be an object with a 'weight' name")
        weight_name, shape, kind = target["weight"], target.get("shape"), target.get("kind", "entries")
        weight = params.get(weight_name)
        if weight is None:
            raise fail(config_path, f"target {name!r}: this model has no parameter {weight_name!r}; was the delta "
                                    f"trained on {base}?")
        if not isinstance(shape, list) or list(weight.shape) != shape:
            raise fail(config_path, f"target {name!r}: {weight_name} has shape {list(weight.shape)} in this model, "
                                    f"the delta says {shape}; was the delta trained on {base}?")
        if kind == "entries":
            index = positions(f"{name}.indices", weight.numel())
            values = tensor(f"{name}.values", integer=False, ndim=1)
            if values.numel() != index.numel():
                raise fail(weights_path, f"tensor {name + '.values'!r} holds {values.numel()} values for "
                                         f"{index.numel()} indices")
            if "k" in target and target["k"] != index.numel():
                raise fail(weights_path, f"target {name!r}: {index.numel()} indices, the config says k={target['k']}")
            updates.append((weight, -1, index, values))
        elif kind in ("columns", "rows"):
            dim = 1 if kind == "columns" else 0
            index = positions(f"{name}.{kind}", weight.shape[dim])
            block = tensor(f"{name}.block", integer=False, ndim=2)
            expected = list(weight.shape)
            expected[dim] = index.numel()
            if list(block.shape) != expected:
                raise fail(weights_path, f"tensor {name + '.block'!r} has shape {list(block.shape)}, expected "
                                         f"{expected} for {index.numel()} {kind}")
            updates.append((weight, dim, index, block))
        else:
            raise fail(config_path, f"target {name!r}: unknown kind {kind!r} (entries, columns or rows)")
    for name in dense:
        if name not in params:
            raise fail(config_path, f"dense parameter {name!r} does not exist in this model; was the delta trained "
                                    f"on {base}?")
        value = tensor(name, integer=False, ndim=params[name].dim())
        if value.shape != params[name].shape:
            raise fail(weights_path, f"tensor {name!r} has shape {list(value.shape)}, the model's parameter "
                                     f"{list(params[name].shape)}")
        updates.append((params[name], None, None, value))
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise fail(weights_path, f"tensor {unexpected[0]!r} is not described by {DELTA_CONFIG} "
                                 f"({len(unexpected)} such tensor(s))")
    touched = [id(weight) for weight, *_ in updates]
    if len(set(touched)) != len(touched):
        raise fail(config_path, "two entries change the same parameter")
    require_finite_results(model, updates, lambda problem: fail(weights_path, problem))
    return updates


def require_finite_results(model: nn.Module, updates: list[tuple[Tensor, int | None, Tensor | None, Tensor]],
                           fail) -> None:
    """Refuse updates that would leave a weight non-finite in its own dtype (`overflowing`); `fail(problem)` makes the
    error."""
    names = {id(param): name for name, param in model.named_parameters()}
    for weight, dim, index, delta in updates:
        bad = overflowing(weight, dim, index, delta)
        if bad:
            raise fail(f"adding it would make {bad} entries of {names.get(id(weight), 'a parameter')} non-finite in "
                       f"{str(weight.dtype).removeprefix('torch.')} (values too large for that dtype)")


# ------------------------------------------------------------------------------------------------- checkpoints


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents via `torch.load(weights_only=True)`: tensors and plain containers, never code."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointError(f"{path}: refused: loading it would run code (it asks for {found.group(1)}); "
                                  "sparse-lightning reads checkpoints with torch.load(weights_only=True) only") from None
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dictionary, got {type(checkpoint).__name__}")
    return checkpoint


def sparse_lightning_info(checkpoint: dict[str, Any], ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint's `sparse_lightning` entry (what export needs to describe the delta)."""
    info = checkpoint.get("sparse_lightning")
    if not isinstance(info, dict):
        raise CheckpointError(f"{ckpt_path} was not written by a sparse-lightning module (no 'sparse_lightning' entry)")
    return info


def module_class_for(ckpt_path: str | Path, named: Any, trusted: str | None = None) -> type:
    """The LightningModule class to rebuild: `trusted` when the caller names one, else the checkpoint's `named`
    class, which is imported only from this package."""
    from sparse_lightning.modules import SparseFineTuningModule

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


def export_checkpoint(ckpt_path: str | Path, output: str | Path, merged: bool = False,
                      module_class: str | None = None, replace: bool = False) -> dict[str, Path]:
    """Export a checkpoint's delta to `output` (sparse methods) and, if `merged`, a plain HF model to
    `output/merged` that vanilla transformers loads. `output` must be new or empty unless `replace` (then it is
    replaced whole); it appears complete or not at all (`sparse_lightning.export_target`)."""
    from sparse_lightning.model_card import run_facts

    target = check_export_target(output, replace, keep=[ckpt_path])
    module, info = load_trained_module(ckpt_path, module_class)
    hf_trainable = [name.removeprefix("model.") for name in info["trainable"]]
    metadata = {key: info[key] for key in ("method", "base_model", "callbacks")}
    metadata.update(run_start(module.hparams))
    facts = run_facts(module.model, hf_trainable, checkpoint=ckpt_path)  # before the in-place merge
    return _export_with_cards(module.model, target, replace, merged, metadata, hf_trainable, facts, in_place=True)


def export_model(model: nn.Module, output: str | Path, merged: bool = False, base_model: str | None = None,
                 replace: bool = False) -> dict[str, Path]:
    """Export a trained model without a checkpoint: `model` is a `SparseFineTuningModule` or an HF model with
    deltas attached. Writes the delta (densely trained parameters included) and, if `merged`, a plain HF model to
    `output/merged`; the model passed in is left as it was (the merge happens on a copy). `output` as in
    `export_checkpoint`."""
    from sparse_lightning.model_card import run_facts

    target = check_export_target(output, replace)
    module = model if isinstance(model, LightningModule) else None
    hf_model = module.model if module is not None else model
    if module is not None:
        callbacks = [cb.describe() for cb in module.sparse_callbacks()]
        metadata = {"method": module.method, "base_model": module.hparams.model_name_or_path, "callbacks": callbacks,
                    **run_start(module.hparams)}
    else:
        methods = sorted({type(layer).__name__ for layer in delta_layers(hf_model).values()})
        metadata = {"method": "+".join(methods) or "full", "callbacks": [],
                    "base_model": base_model or getattr(getattr(hf_model, "config", None), "_name_or_path", None)}
    trainable = [name for name, param in hf_model.named_parameters() if param.requires_grad]
    facts = run_facts(hf_model, trainable, module=module)
    return _export_with_cards(hf_model, target, replace, merged, metadata, trainable, facts, in_place=False)


def _export_with_cards(model: nn.Module, target: Path, replace: bool, merged: bool, metadata: dict[str, Any],
                       trainable: list[str], facts: dict[str, Any], in_place: bool) -> dict[str, Path]:
    """`_export` and a README.md model card in every directory, written aside and moved to `target` whole."""
    from sparse_lightning.model_card import write_model_cards

    with staged_export(target, replace) as staging:
        written = _export(model, staging, merged, metadata, trainable, in_place)
        write_model_cards(written, metadata, facts, staged=(staging, target))
    return published(written, staging, target)


def run_start(hparams: Any) -> dict[str, Any]:
    """What the trained model is besides base + delta, recorded with the delta: `init_delta` (trained from base + that
    delta: `apply_delta` applies it first) and `quantize` (trained on a quantized base: `apply_delta` warns on a
    full-precision one)."""
    return {key: hparams.get(key) for key in ("init_delta", "quantize") if hparams.get(key)}


def _require_finite_model(model: nn.Module, what: str) -> None:
    """Every floating tensor about to be written, frozen base included, is finite."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"refusing to write {what}: {name} holds {bad} non-finite value(s) (NaN/Inf); a frozen "
                             "weight holding them came from the base model or checkpoint: check those files")


def _export(model: nn.Module, output: str | Path, merged: bool, metadata: dict[str, Any], trainable: list[str],
            in_place: bool) -> dict[str, Path]:
    written: dict[str, Path] = {}
    if delta_layers(model):
        dense = [name for name in trainable if not is_delta_parameter(name)]
        written["delta"] = export_delta(model, output, metadata, dense)
    elif not merged:
        raise ValueError(f"the model is a {metadata['method']} model, not a sparse delta: export it merged "
                         "(--merged true / merged=True)")
    if merged:
        model = model if in_place else copy.deepcopy(model)
        if hasattr(model, "merge_and_unload"):  # the PEFT LoRA baseline; QLoRA's base de-quantized first, as PEFT
            model = dequantize_model(model).merge_and_unload()  # adds into base_layer.weight (never re-quantized)
        merged_dir = Path(output) / "merged"
        model = restore_original_layout(dequantize_model(merge_and_unwrap(model)))
        _require_finite_model(model, "the merged model")
        model.save_pretrained(merged_dir)
        if metadata.get("base_model"):
            _save_tokenizer(metadata["base_model"], merged_dir)
        _readable_by_all(*(path for path in merged_dir.rglob("*") if path.is_file()))
        written["merged"] = merged_dir
    return written


def _save_tokenizer(base_model: str, output: Path) -> None:
    from transformers import AutoTokenizer

    from sparse_lightning.models import resolve_model_path

    AutoTokenizer.from_pretrained(resolve_model_path(base_model)).save_pretrained(output)
