"""The checks every export format and every reader share: one list, so the formats cannot drift apart.

Writing: nothing non-finite is written (`require_finite`, `require_finite_model`) and written files get the mode a
plainly created file gets (`readable_by_all`). Reading: a config is a JSON object (`read_json_object`), tensors have
the kind, shape and range the format says and are finite (`TensorFile`), an update is added in fp32 and rounded to
the weight's dtype once (`add_rounding_once`), and no update may leave a weight non-finite in its own dtype
(`require_finite_results`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn


class DeltaFileError(ValueError):
    """A delta directory that fails validation; nothing was changed."""


def unchanged_model_error(where: Path, problem: str) -> DeltaFileError:
    """A refusal of a delta or adapter file, raised before anything was applied: it says the model is as it was."""
    return DeltaFileError(f"{where}: {problem}; the model was not changed")


def read_json_object(path: Path) -> dict:
    """A delta's or adapter's JSON config as a dict, or one line naming the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise unchanged_model_error(path, f"not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise unchanged_model_error(path, f"expected a JSON object, got {type(config).__name__}")
    return config


class TensorFile:
    """A delta's or adapter's safetensors file, read whole, with the tensor checks every reader makes: each failure
    names the file and the tensor and says the model was not changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tensors: dict[str, Tensor] = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise unchanged_model_error(path, f"not a readable safetensors file ({error})") from None

    def error(self, problem: str) -> DeltaFileError:
        return unchanged_model_error(self.path, problem)

    def floats(self, key: str, value: Tensor, ndim: int = 1, count: int | None = None) -> Tensor:
        """`value`, an `ndim`-D floating-point tensor (of `count` elements) that is finite in fp32."""
        if not value.is_floating_point() or value.dim() != ndim or (count is not None and value.numel() != count):
            of = f" of {count} values" if count is not None else ""
            raise self.error(f"tensor {key!r} must be a {ndim}-D floating-point tensor{of}, got {value.dim()}-D "
                             f"{value.dtype} {list(value.shape)}")
        bad = int((~torch.isfinite(value.float())).sum())
        if bad:
            raise self.error(f"tensor {key!r} holds {bad} non-finite value(s) in fp32, the dtype deltas are added in")
        return value

    def integers(self, key: str, value: Tensor, ndim: int = 1, shape: list[int] | None = None) -> Tensor:
        """`value`, an integer tensor with `ndim` dimensions (of exactly `shape` when given)."""
        wrong_shape = list(value.shape) != shape if shape is not None else value.dim() != ndim
        if value.is_floating_point() or value.dtype == torch.bool or wrong_shape:
            what = f"an integer tensor of shape {shape}" if shape is not None else f"a {ndim}-D integer tensor"
            raise self.error(f"tensor {key!r} must be {what}, got {value.dim()}-D {value.dtype} {list(value.shape)}")
        return value

    def positions(self, key: str, flat: Tensor, size: int) -> Tensor:
        """`flat`, distinct positions in [0, size)."""
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= size):
            raise self.error(f"tensor {key!r} has an index outside [0, {size}) (min {int(flat.min())}, max "
                             f"{int(flat.max())})")
        repeated = flat.numel() - flat.unique().numel()
        if repeated:
            raise self.error(f"tensor {key!r} repeats a position ({repeated} duplicate(s))")
        return flat


def require_finite(tensors: dict[str, Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"refusing to write {what}: {name} holds {bad} non-finite value(s) (NaN/Inf); "
                             "the run diverged: train again with a lower learning rate")



def require_finite_model(model: nn.Module, what: str) -> None:
    """Every floating tensor about to be written, frozen base included, is finite."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"refusing to write {what}: {name} holds {bad} non-finite value(s) (NaN/Inf); a frozen "
                             "weight holding them came from the base model or checkpoint: check those files")



def readable_by_all(*paths: Path) -> None:
    """The mode a plainly created file gets (0644 under the usual umask 022): safetensors and some writers use 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)



def add_rounding_once(weight: Tensor, dim: int, index: Tensor, delta: Tensor) -> None:
    """`weight[index along dim] += delta`, summed in fp32 and rounded to weight's dtype once (index is unique)."""
    target = weight.view(-1) if dim == -1 else weight
    along = 0 if dim == -1 else dim
    index = index.to(device=target.device, dtype=torch.long)
    summed = target.index_select(along, index).float() + delta.to(device=target.device, dtype=torch.float32)
    target.index_copy_(along, index, summed.to(target.dtype))



def values_at(weight: Tensor, dim: int | None, index: Tensor | None) -> Tensor:
    """The weight's values an update writes (the whole weight for a dense replacement)."""
    if dim is None:
        return weight.detach()
    target = weight.detach().view(-1) if dim == -1 else weight.detach()
    return target.index_select(0 if dim == -1 else dim, index.to(device=target.device, dtype=torch.long))



def overflowing(weight: Tensor, dim: int | None, index: Tensor | None, delta: Tensor) -> int:
    """How many entries of `weight` an update would leave non-finite: base + delta summed in fp32 and rounded to the
    weight's dtype (a dense replacement: the value in that dtype). A float64 1e300 passes a float64 finite check and
    is inf in fp32; an fp16 weight overflows at 65504."""
    if dim is None:
        result = delta.to(weight.dtype)
    else:
        result = (values_at(weight, dim, index).float() + delta.to(device=weight.device, dtype=torch.float32))
        result = result.to(weight.dtype)
    return int((~torch.isfinite(result)).sum())



def require_finite_results(model: nn.Module, updates: list[tuple[Tensor, int | None, Tensor | None, Tensor]],
                           fail) -> None:
    """Refuse updates that would leave a weight non-finite in its own dtype (`overflowing`); `fail(problem)` makes the
    error. A weight on the meta device (to be loaded by shards) has no values to add to yet: the shard loader checks
    each rank's rows as it adds them (`modules/row_updates.py`)."""
    names = {id(param): name for name, param in model.named_parameters()}
    for weight, dim, index, delta in updates:
        if weight.is_meta and dim is not None:
            continue
        bad = overflowing(weight, dim, index, delta)
        if bad:
            raise fail(f"adding it would make {bad} entries of {names.get(id(weight), 'a parameter')} non-finite in "
                       f"{str(weight.dtype).removeprefix('torch.')} (values too large for that dtype)")
