"""Loading by shards under FSDP2: no rank ever holds the whole pretrained model.

`from_pretrained` on every rank would put the whole model in each rank's host memory before `fully_shard` keeps
1/N of it. Instead the model is built on the meta device (`build_on_meta`), the method attaches its delta layers
(their shapes come from the weight shapes; their own tensors are real from the start), FSDP2 shards the still-empty
model, and `load_shards` gives every parameter its rank's rows, read from the checkpoint's safetensors files as
slices (`safe_open(...).get_slice(key)[start:stop]`, a block of rows per memory map, so no page of the other
ranks' rows is read and at most one block's file pages are resident); S2FT's co-permutation, recorded on the meta
model, is applied by reading the permuted rows and columns. What the checkpoint does not hold (buffers such as rotary `inv_freq` or
`position_ids`, and new task heads) is created for real before sharding and initialised by the model's own
`initialize_weights`, exactly as `from_pretrained` initialises it. `init_delta`'s updates of checkpoint weights wait in
the plan (`ShardedLoad.defer`) and each rank adds the entries in its own rows as it reads them (`row_updates.py`).

Only safetensors directories load this way (one `model.safetensors` or an index); anything else (a `.bin`
checkpoint, a hub id) falls back to `from_pretrained` on every rank, said once in the log.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from sparse_lightning.meta_weights import register_reader
from sparse_lightning.modules.row_updates import RowUpdate, add_to_rows, add_whole, agree_on_overflow, as_entries
from sparse_lightning.structure.permute import recorded_gathers

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
READ_BYTES = 4 * 2**20  # rows read per memory map: bounds what the checkpoint file adds to a rank's memory


def checkpoint_files(model_dir: str | Path) -> dict[str, Path] | None:
    """Checkpoint key -> the safetensors file holding it, or None when the directory has no safetensors weights
    (sharded loading then falls back to a full load)."""
    root = Path(model_dir)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return {key: root / name for key, name in weight_map.items()}
    if (root / SINGLE_FILE).is_file():

        with safe_open(str(root / SINGLE_FILE), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), root / SINGLE_FILE)
    return None


@dataclass
class ShardedLoad:
    """A model built on the meta device and where each of its parameters' values lives in the checkpoint.

    `sources` maps (id of the owning module, parameter name) to the checkpoint key: modules keep their identity
    through the method's wrapping and FSDP2's sharding, while parameter names and objects do not. `holders` maps each
    meta parameter as built to its `sources` entry, and `updates` holds, by the same entry, `init_delta`'s updates
    of that weight in the order `apply_delta` handed them over (`defer`).
    """

    files: dict[str, Path]
    sources: dict[tuple[int, str], str] = field(default_factory=dict)
    holders: dict[int, tuple[int, str]] = field(default_factory=dict)
    updates: dict[tuple[int, str], list[RowUpdate]] = field(default_factory=dict)

    def follow_copies(self, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
        """Each copy's parameters read what its original's read (LoRA's `modules_to_save` copies of a meta module),
        `init_delta` included."""
        for original, copy in pairs:
            for name, _ in copy.named_parameters(recurse=False):
                key = self.sources.get((id(original), name))
                if key is not None:
                    self.sources[(id(copy), name)] = key
                if (id(original), name) in self.updates:
                    self.updates[(id(copy), name)] = self.updates[(id(original), name)]

    def defer(self, weight: torch.Tensor, dim: int | None, index: torch.Tensor | None, delta: torch.Tensor,
              file: Path) -> None:
        """Keep `apply_delta`'s checked update of a meta weight (as its entries) for `load_shards` to add to each
        rank's rows."""
        holder = self.holders.get(id(weight))
        if holder is None:
            raise RuntimeError(f"{file}: an update of a meta-device weight that is not one of the checkpoint's as "
                               "built: merge init_delta right after build_on_meta")
        self.updates.setdefault(holder, []).append(as_entries(weight, dim, index, delta, file))

    def drop_updates(self) -> None:
        """Forget the deferred updates (`apply_delta` refused a later directory of the init_delta chain)."""
        self.updates.clear()


def read_whole(plan: ShardedLoad, module: nn.Module, name: str) -> torch.Tensor | None:
    """The whole checkpoint tensor of a meta parameter (`meta_weights.whole_weights` reads through this)."""
    key = plan.sources.get((id(module), name))
    if key is None:
        return None
    with safe_open(str(plan.files[key]), framework="pt", device="cpu") as handle:
        tensor = handle.get_tensor(key).to(getattr(module, name).dtype)
    add_whole(tensor, plan.updates.get((id(module), name), []))  # base + init_delta, as a whole load holds it
    return tensor


def checkpoint_key(name: str, model: nn.Module, files: dict[str, Path]) -> str | None:
    """The checkpoint's key for a model parameter: the same name, or with / without the base model's prefix (a
    `BertModel` checkpoint under `BertForSequenceClassification`, and the reverse), as `from_pretrained` maps them."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    return next((key for key in candidates if key in files), None)


def default_dtype(config: Any, dtype: Any, files: dict[str, Path]) -> torch.dtype:
    """What `from_pretrained`'s default `dtype="auto"` resolves to: the config's dtype, else the checkpoint's."""
    if dtype not in (None, "auto"):
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured

    first_key, first_file = next(iter(files.items()))
    with safe_open(str(first_file), framework="pt") as handle:
        stored = handle.get_slice(first_key).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def build_on_meta(auto_class: Any, model_dir: str | Path, files: dict[str, Path], new_modules: tuple[str, ...],
                  **kwargs: Any) -> tuple[nn.Module, ShardedLoad] | None:
    """`auto_class.from_pretrained(model_dir, **kwargs)`'s model with every checkpoint parameter on the meta device
    and everything else real and initialised as `from_pretrained` would. None when the checkpoint lacks a
    parameter outside `new_modules` (a renamed or converted key: the caller then loads in full)."""
    from transformers import AutoConfig
    from transformers import initialization

    config, model_kwargs = AutoConfig.from_pretrained(model_dir, return_unused_kwargs=True, **kwargs)
    model_kwargs["dtype"] = default_dtype(config, model_kwargs.get("dtype"), files)
    safe_ops = getattr(initialization, "meta_device_safe_creation_ops", nullcontext)
    with torch.device("meta"), safe_ops():
        model = auto_class.from_config(config, **model_kwargs)
    plan = ShardedLoad(files)
    owners = {id(p): module for module in model.modules() for p in module.parameters(recurse=False)}
    missing = []
    for name, param in model.named_parameters():  # a tied weight once
        key = checkpoint_key(name, model, files)
        if key is None:
            missing.append(name)
            continue
        param._is_hf_initialized = True  # initialize_weights leaves it alone: its values come from the checkpoint
        plan.sources[(id(owners[id(param)]), name.rpartition(".")[2])] = key
        plan.holders[id(param)] = (id(owners[id(param)]), name.rpartition(".")[2])
    unexpected = [n for n in missing if not any(n == m or n.startswith(m + ".") for m in new_modules)]
    if unexpected:
        return None
    _materialize(model, set(missing), files)
    model.initialize_weights()  # the new heads and the non-persistent buffers, as from_pretrained does
    register_reader(model, partial(read_whole, plan))
    return model, plan


def _materialize(model: nn.Module, missing: set[str], files: dict[str, Path]) -> None:
    """Give the parameters the checkpoint lacks and every buffer real (CPU) storage; buffers the checkpoint holds
    are read in full (they are small), the rest are left for `initialize_weights`."""

    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for module_name, module in model.named_modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if f"{module_name}.{name}".lstrip(".") in missing:
                    setattr(module, name, nn.Parameter(torch.empty_like(param, device="cpu"),
                                                       requires_grad=param.requires_grad))
            for name, buffer in list(module.named_buffers(recurse=False)):
                real = torch.empty_like(buffer, device="cpu")
                key = checkpoint_key(f"{module_name}.{name}".lstrip("."), model, files)
                if key is not None and name not in module._non_persistent_buffers_set:
                    path = files[key]
                    if path not in handles:
                        handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                    real.copy_(handles[path].get_tensor(key))
                    real._is_hf_initialized = True
                setattr(module, name, real)  # stays persistent or not, as registered


@torch.no_grad()
def load_shards(model: nn.Module, plan: ShardedLoad, device: torch.device) -> None:
    """After `fully_shard`: give every meta parameter its local shard on `device` and fill it with its rows of the
    checkpoint tensor (FSDP2 shards dim 0 as `torch.chunk` does). A weight S2FT co-permuted on the meta model (its
    order record is all it holds) gets the permuted rows: the rows or columns the record gathers, read from the
    file. Tensors that were real already (deltas, buffers, new heads) are left as they are. `init_delta`'s entries
    in a rank's rows are added to them (`row_updates.add_to_rows`), mapped through the same order; if any rank's
    base + delta overflows, every rank raises."""
    gathers = recorded_gathers(model)
    holders = [(f"{module_name}.{name}".lstrip("."), id(param), (id(module), name) in plan.sources)
               for module_name, module in model.named_modules()
               for name, param in module.named_parameters(recurse=False) if param.is_meta]
    read = {param for _, param, sourced in holders if sourced}  # a tied weight is read once, through one holder
    unread = [name for name, param, _ in holders if param not in read]
    if unread:
        raise RuntimeError(f"sharded loading has no checkpoint tensor for {unread[0]} (and {len(unread) - 1} more), "
                           "still on the meta device: whatever put it there must create it for real")
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # in place: tied weights stay one parameter
    try:
        model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    seen: set[int] = set()
    named: list[tuple[str, RowUpdate]] = []  # every rank's same list: positions in it name an overflow to all ranks
    first: dict[tuple[int, str], int] = {}
    for holder, updates in plan.updates.items():
        first[holder] = len(named)
        named += [(plan.sources[holder], update) for update in updates]
    failure = None
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            key = plan.sources.get((id(module), name))
            if key is None or id(param) in seen:
                continue
            seen.add(id(param))
            path = plan.files[key]
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                shape = torch.Size(handle.get_slice(key).get_shape())
            local, start = _local_rows(param, shape, key)
            rows = torch.arange(start, start + local.shape[0]) if local.dim() else None
            columns = None
            dim, index = gathers.get((id(module), name), (None, None))
            if dim == 0:
                rows = index[start:start + local.shape[0]]
            elif dim == 1:
                columns = index
            _copy_rows(path, key, local, rows, columns)
            updates = plan.updates.get((id(module), name))
            if updates and failure is None:
                found = add_to_rows(local, updates, rows, columns, shape)
                failure = None if found is None else (first[(id(module), name)] + found[0], found[1])
    if plan.updates:
        agree_on_overflow(failure, named, device)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"sharded loading left {left[0]} (and {len(left) - 1} more) on the meta device")


def _local_rows(param: torch.Tensor, shape: torch.Size, key: str) -> tuple[torch.Tensor, int]:
    """The tensor this rank holds of `param` (a Shard(0) DTensor, or a plain tensor: all of it) and the checkpoint
    row it starts at; FSDP2 splits rows as `torch.chunk` does."""
    if shape != param.shape:
        raise ValueError(f"checkpoint tensor {key} has shape {tuple(shape)}, the model expects {tuple(param.shape)}: "
                         "model_name_or_path's config.json and weights disagree")
    if not hasattr(param, "to_local"):
        return param.data, 0
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"sharded loading reads row shards (Shard(0)); {key} is placed as {placements}")
    local = param.to_local()
    rows = shape[0]
    chunk = -(-rows // param.device_mesh.size())
    start = min(rows, param.device_mesh.get_local_rank() * chunk)
    if local.shape[0] != min(rows, start + chunk) - start:
        raise RuntimeError(f"{key}: local shard of {local.shape[0]} rows does not match torch.chunk's split")
    return local, start


def _runs(rows: list[int], most: int) -> list[tuple[int, int]]:
    """(first, last) local positions whose checkpoint rows are consecutive, at most `most` rows each."""
    runs, first = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1 or i - first == most:
            runs.append((first, i))
            first = i
    return runs


def _copy_rows(path: Path, key: str, local: torch.Tensor, rows: torch.Tensor | None,
               columns: torch.Tensor | None = None) -> None:
    """local[i] = checkpoint[key][rows[i]] (with only `columns`, in that order, when given), about READ_BYTES of
    consecutive rows at a time, each read through its own memory map: the file pages a read touches leave the
    process when its map closes, so the file adds at most one block."""

    if local.dim() == 0:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            local.copy_(handle.get_tensor(key))
        return
    row_bytes = max(1, local[0].numel() * local.element_size()) if local.shape[0] else 1
    for first, last in _runs(rows.tolist(), max(1, READ_BYTES // row_bytes)):
        source = int(rows[first])
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            block = handle.get_slice(key)[source:source + last - first]
            local[first:last].copy_(block if columns is None else block.index_select(1, columns))
