"""What a checkpoint holds: what trains, never the frozen base, plus a fingerprint of the base it was trained on.

A delta checkpoint keeps the trained tensors (delta values and indices, `delta_selected`, S2FT's blocks, positions and
co-permutation records, densely trained heads, LoRA adapters), the optimizer, scheduler, RNG and data position;
whoever loads it rebuilds the base from `model_name_or_path` (then `init_delta`, S2FT's recorded permutation and
`quantize`, as training did) and checks the fingerprint first, so a delta never lands on another model (other weights, shapes, or config
values such as the RoPE base). The
fingerprint reads only a few small slices: it is computed once when the base is built, never from the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparse_lightning.sparse.quantized import QuantizedLinear

if TYPE_CHECKING:
    from sparse_lightning.modules.sharded_loading import ShardedLoad

#: Elements of each fingerprinted tensor read from its start and from its end.
FINGERPRINT_SLICE = 4096
#: Config fields that change what the same weights compute (shapes are in the architecture digest already). Only
#: these: dropout, dtype, cache or output settings may differ between a run and its resume.
FUNCTION_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "rms_norm_eps",
                   "layer_norm_eps", "layer_norm_epsilon", "hidden_act", "hidden_activation", "activation_function",
                   "tie_word_embeddings", "position_embedding_type", "sliding_window", "attn_logit_softcapping",
                   "final_logit_softcapping", "query_pre_attn_scalar", "scale_attn_weights")


class BaseMismatchError(ValueError):
    """A delta checkpoint refused because the base built now is not the one it was trained on."""


class CheckpointKeysError(RuntimeError):
    """A checkpoint refused because its tensors are not the ones this module saves: one it trains is missing, or one
    is unknown to it."""


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


def function_config(config: Any) -> dict[str, Any]:
    """The config fields in `FUNCTION_FIELDS` that the model's config has, as JSON-safe values."""
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    return {key: json.loads(json.dumps(values[key], default=str)) for key in FUNCTION_FIELDS if key in values}


def base_fingerprint(model: nn.Module, name: str, plan: ShardedLoad | None = None) -> dict[str, Any]:
    """The base as built: its name, an architecture digest (model type, every weight's name and shape), a weights
    digest (slices of the input embedding and of the middle weight matrix: loaded tensors, never a new head; read
    from the file through `plan` when the base waits on the meta device to be loaded by shards) and the config fields
    that change what those weights compute (RoPE base, norm epsilon, activation, ...)."""
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
    return {"model": name, "architecture": architecture, "weights": weights, "config": function_config(config)}


def check_same_base(recorded: dict[str, Any] | None, current: dict[str, Any] | None, checkpoint: str) -> None:
    """Refuse a delta checkpoint whose base differs from the one built now (a different name alone is fine: an alias
    and its directory, a moved copy)."""
    if not recorded or not current:
        return
    differs = [part for part in ("architecture", "weights")
               if recorded.get(part) and current.get(part) and recorded[part] != current[part]]
    configs = recorded.get("config"), current.get("config")  # absent from checkpoints written before it was kept
    fields = sorted(key for key in set(configs[0] or {}) | set(configs[1] or {})
                    if None not in configs and configs[0].get(key) != configs[1].get(key))
    if fields and not differs:
        shown = ", ".join(f"{key} {configs[0].get(key)!r} vs {configs[1].get(key)!r}" for key in fields[:3])
        raise BaseMismatchError(
            f"{checkpoint} holds a delta trained on base {recorded.get('model')!r} with other config values than "
            f"this run's {current.get('model')!r} ({shown}): the same weights would compute something else; set "
            "model_name_or_path to the checkpoint's base (its config.json as trained)")
    if differs:
        raise BaseMismatchError(
            f"{checkpoint} holds a delta trained on base {recorded.get('model')!r}, but this run built "
            f"{current.get('model')!r} and their {' and '.join(differs)} differ ({recorded[differs[0]]} vs "
            f"{current[differs[0]]}): set model_name_or_path to the checkpoint's base")


def check_checkpoint_keys(saved: Iterable[str], needed: set[str], known: set[str], owner: str,
                          checkpoint: str) -> None:
    """Refuse a checkpoint that lacks a tensor the module saves (`needed`: what trains, and its indices and records)
    or holds one the module does not have (`known`: every tensor of the module, frozen base included), before
    anything is loaded: a missing trained tensor would otherwise keep its fresh value without a word."""
    saved = set(saved)
    missing, unexpected = sorted(needed - saved), sorted(saved - known)
    if not missing and not unexpected:
        return
    problems = [f"{len(missing)} trained tensor(s) missing (e.g. {missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} unknown tensor(s) (e.g. {unexpected[0]})"] if unexpected else []
    raise CheckpointKeysError(f"{checkpoint} does not fit this {owner}: {'; '.join(problems)}: was it saved with "
                              "other method settings (targets, budget) or another model?")


def check_same_method(recorded: Any, current: str, checkpoint: str) -> None:
    """Resuming trains on with the method that wrote the checkpoint: another one would reinterpret its deltas. (`spiel`,
    the name before SpIEL's two regrowth rules were told apart, is either of them.)"""
    legacy = recorded == "spiel" and current.startswith("spiel")
    if isinstance(recorded, str) and recorded != current and not legacy:
        raise ValueError(f"{checkpoint} was saved by a {recorded} run, but this run trains {current}: resume with the "
                         f"same method (its config.yaml), or start a new {current} run from its export "
                         "(--model.init_delta)")
