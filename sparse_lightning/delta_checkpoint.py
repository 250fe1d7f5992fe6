"""What a checkpoint holds: what trains, never the frozen base, plus a fingerprint of the base it was trained on.

A delta checkpoint keeps the trained tensors (delta values and indices, `delta_selected`, S2FT's blocks, positions and
co-permutation records, densely trained heads, LoRA adapters), the optimizer, scheduler, RNG and data position;
whoever loads it rebuilds the base from `model_name_or_path` (then `init_delta`, S2FT's recorded permutation and
`quantize`, as training did) and checks the fingerprint first, so a delta never lands on another model. The
fingerprint reads only a few small slices: it is computed once when the base is built, never from the file.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparse_lightning.sparse.quantized import QuantizedLinear

if TYPE_CHECKING:
    from sparse_lightning.modules.sharded_loading import ShardedLoad

#: Elements of each fingerprinted tensor read from its start and from its end.
FINGERPRINT_SLICE = 4096


class BaseMismatchError(ValueError):
    """A delta checkpoint refused because the base built now is not the one it was trained on."""


def frozen_base_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the frozen base: frozen parameters (tied names too) and quantized weights' buffers."""
    keys = {name for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad}
    for name, child in module.named_modules(remove_duplicate=False):
        if isinstance(child, QuantizedLinear):
            keys.update(f"{name}.{buffer}" for buffer, _ in child.named_buffers(recurse=False))
    return keys


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()[:16]


def _bytes(picked: Tensor) -> bytes:
    """Rounded to bf16, so a base built in fp32 or bf16 from one file agrees."""
    return picked.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()


def _slices(tensor: Tensor) -> bytes | None:
    """The first and last elements; None for a tensor not whole here (an FSDP2 shard)."""
    tensor = tensor.detach()
    if tensor.is_meta or hasattr(tensor, "full_tensor"):
        return None
    flat = tensor.reshape(-1)
    return _bytes(torch.cat([flat[:FINGERPRINT_SLICE], flat[-FINGERPRINT_SLICE:]]))


def _file_slices(plan: ShardedLoad | None, owner: nn.Module, name: str) -> bytes | None:
    """The same elements read from the checkpoint file, for a base built on the meta device to be loaded by shards
    (`modules/sharded_loading.py`): only the rows that hold them."""
    key = plan.sources.get((id(owner), name)) if plan is not None else None
    if key is None:
        return None
    from safetensors import safe_open

    with safe_open(str(plan.files[key]), framework="pt", device="cpu") as handle:
        part = handle.get_slice(key)
        shape = part.get_shape()
        rows = -(-FINGERPRINT_SLICE // max(1, math.prod(shape[1:])))
        head = part[:rows].reshape(-1)[:FINGERPRINT_SLICE]
        tail = part[max(0, shape[0] - rows):].reshape(-1)[-FINGERPRINT_SLICE:]
    return _bytes(torch.cat([head, tail]))


def base_fingerprint(model: nn.Module, name: str, plan: ShardedLoad | None = None) -> dict[str, Any]:
    """The base as built: its name, an architecture digest (model type, every weight's name and shape) and a weights
    digest (slices of the input embedding and of the middle weight matrix: loaded tensors, never a new head; read
    from the file through `plan` when the base waits on the meta device to be loaded by shards)."""
    params = list(model.named_parameters())
    shapes = ";".join(f"{key}:{list(p.shape)}" for key, p in params)
    config = getattr(model, "config", None)
    architecture = _digest(str(getattr(config, "model_type", type(model).__name__)).encode(), shapes.encode())
    matrices = [p for _, p in params if p.dim() == 2]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    chosen = [embedding.weight] if isinstance(embedding, nn.Embedding) else []
    chosen += matrices[len(matrices) // 2: len(matrices) // 2 + 1]
    owners = {id(p): (module, key) for module in model.modules() for key, p in module.named_parameters(recurse=False)}
    slices = [_file_slices(plan, *owners[id(t)]) if t.is_meta else _slices(t) for t in chosen]
    weights = _digest(*slices) if chosen and None not in slices else None
    return {"model": name, "architecture": architecture, "weights": weights}


def check_same_base(recorded: dict[str, Any] | None, current: dict[str, Any] | None, checkpoint: str) -> None:
    """Refuse a delta checkpoint whose base differs from the one built now (a different name alone is fine: an alias
    and its directory, a moved copy)."""
    if not recorded or not current:
        return
    differs = [part for part in ("architecture", "weights")
               if recorded.get(part) and current.get(part) and recorded[part] != current[part]]
    if differs:
        raise BaseMismatchError(
            f"{checkpoint} holds a delta trained on base {recorded.get('model')!r}, but this run built "
            f"{current.get('model')!r} and their {' and '.join(differs)} differ ({recorded[differs[0]]} vs "
            f"{current[differs[0]]}): set model_name_or_path to the checkpoint's base")


def check_same_method(recorded: Any, current: str, checkpoint: str) -> None:
    """Resuming trains on with the method that wrote the checkpoint: another one would reinterpret its deltas. (`spiel`,
    the name before SpIEL's two regrowth rules were told apart, is either of them.)"""
    legacy = recorded == "spiel" and current.startswith("spiel")
    if isinstance(recorded, str) and recorded != current and not legacy:
        raise ValueError(f"{checkpoint} was saved by a {recorded} run, but this run trains {current}: resume with the "
                         f"same method (its config.yaml), or start a new {current} run from its export "
                         "(--model.init_delta)")
