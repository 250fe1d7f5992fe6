"""Adding a delta directory onto a plain base model: this library's delta format or a PEFT SHiRA / Super-Tuning
adapter, read into one form of update and checked completely before anything changes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from sparse_lightning.borders.checks import DeltaFileError, add_rounding_once, values_at
from sparse_lightning.borders.delta import DELTA_CONFIG, DELTA_WEIGHTS, warn_if_quantized_run, checked_delta_updates
from sparse_lightning.borders.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, checked_peft_updates


#: `defer(weight, dim, index, delta, file)`: takes an update of a weight still on the meta device.
Defer = Callable[[Tensor, "int | None", "Tensor | None", Tensor, Path], None]


@torch.no_grad()
def apply_delta(model: nn.Module, delta_dir: str | Path, defer: Defer | None = None) -> nn.Module:
    """Add an exported delta onto a plain base model in place (the model then equals the merged one).

    The whole directory is checked first (format and version, every target weight and its shape, index range,
    uniqueness and count, values finite in fp32, the dtype they are added in, and base + delta finite in the weight's
    dtype, the dense parameters); any problem raises `DeltaFileError` naming the file, the tensor and the problem, and
    leaves the model untouched. Low-precision weights get the delta added in fp32 and rounded once. A delta trained
    from `init_delta` (recorded in its config) gets that delta applied first, as training did. A PEFT SHiRA or
    Super-Tuning adapter directory (`adapter_config.json`) is read the same way
    (`sparse_lightning.borders.peft.apply_peft_adapter`). A delta trained on a quantized base warns: on a
    full-precision base the result differs from the trained model by the quantization error.

    A base built on the meta device to be loaded by shards (`modules/sharded_loading.py`) is checked the same way
    except base + delta, whose base values are not read yet; each update of a meta weight goes to `defer`, whose
    owner adds it to each rank's rows as it reads them (and checks base + delta there), and drops what it took if
    this raises.
    """
    chain = init_chain(Path(delta_dir))
    undo: list[tuple[Tensor, int | None, Tensor | None, Tensor]] = []
    try:
        for directory in chain:
            for weight, dim, index, delta in checked_updates_any(model, directory):
                if weight.is_meta:
                    if defer is None:
                        raise ValueError(f"{directory}: the model's weights are on the meta device (built to be "
                                         "loaded by shards): pass defer, or load the model first")
                    defer(weight, dim, index, delta, weights_file(directory))
                    continue
                undo.append((weight, dim, index, values_at(weight, dim, index).clone()))
                _write_update(weight, dim, index, delta)
    except BaseException:
        for weight, dim, index, saved in reversed(undo):  # an init_delta applied before a later directory failed
            _put_values(weight, dim, index, saved)
        raise
    return model



def init_chain(delta_dir: Path) -> list[Path]:
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



def weights_file(directory: Path) -> Path:
    """The tensor file of a delta or PEFT adapter directory (named by errors found while loading by shards)."""
    return directory / (ADAPTER_WEIGHTS if (directory / ADAPTER_CONFIG).is_file() else DELTA_WEIGHTS)



def checked_updates_any(model: nn.Module, directory: Path) -> list[tuple[Tensor, int | None, Tensor | None, Tensor]]:
    """`checked_delta_updates` for our delta directories, `checked_peft_updates` for a PEFT adapter, in one form."""
    if (directory / ADAPTER_CONFIG).is_file():
        return [(weight, None if flat is None else -1, flat, values)
                for weight, flat, values in checked_peft_updates(model, directory)]
    updates = checked_delta_updates(model, directory)
    warn_if_quantized_run(directory)
    return updates



def _write_update(weight: Tensor, dim: int | None, index: Tensor | None, delta: Tensor) -> None:
    if dim is None:  # a dense parameter, replaced
        weight.copy_(delta)
    else:
        add_rounding_once(weight, dim, index, delta)



def _put_values(weight: Tensor, dim: int | None, index: Tensor | None, values: Tensor) -> None:
    if dim is None:
        weight.copy_(values)
    else:
        target = weight.view(-1) if dim == -1 else weight
        target.index_copy_(0 if dim == -1 else dim, index.to(device=target.device, dtype=torch.long), values)
