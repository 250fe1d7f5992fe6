"""Several deltas on one base model: load N, make one active in place, switch in time proportional to its k, fuse.

A sparse delta touches k entries (element-sparse: flat positions; S2FT: dense blocks on a few original-layout rows or
columns), so switching which one is merged need not cost a pass over the model. `MultiDelta` keeps each loaded delta
as positions plus fp32 values; activating one saves the base's own values at its positions (O(k) memory, the
weight's dtype) and writes base + delta there, summed in fp32 and rounded once, exactly as `apply_delta` does;
deactivating writes the saved values back. Nothing is ever subtracted: `(W + d) - d` is not `W` bit for bit in fp32
and even less in bf16, while a restore is exact in every dtype, so switching A -> B -> A -> none gives weights
bit-identical to base + A, base + B and base. Densely trained parameters (a classifier in `modules_to_save`) are
replaced whole and their originals kept while active.

Reading and validation are `apply_delta`'s (this library's delta directories and PEFT SHiRA / Super-Tuning adapter
directories): a bad directory raises `DeltaFileError` naming the file, tensor and problem, and nothing changes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from sparse_lightning.borders.apply import checked_updates_any, init_chain
from sparse_lightning.borders.checks import overflowing
from sparse_lightning.sparse import delta_layers

#: The largest finite fp32 value: a fusion weight beyond it is inf once it scales the fp32 values.
FP32_MAX = float(torch.finfo(torch.float32).max)
#: Positions along which a part writes: -1 flat row-major entries, 0 rows, 1 columns, None a whole parameter.
Dim = int | None


class UnknownDeltaError(LookupError):
    """A delta name that was never loaded (or was unloaded)."""


@dataclass(frozen=True)
class _Part:
    """One parameter's change: `delta` (fp32) at `index` along `dim`, or, for dim None, the parameter's new value."""

    name: str
    weight: nn.Parameter
    dim: Dim
    index: Tensor | None
    delta: Tensor

    @property
    def entries(self) -> int:
        return self.delta.numel()

    def nbytes(self) -> int:
        return self.delta.nbytes + (self.index.nbytes if self.index is not None else 0)


@dataclass
class FusionReport:
    """What `MultiDelta.fuse` made: per weight, the entries the fused delta changes and how many of them more than one
    source delta changed (their values were added there)."""

    name: str
    sources: list[str]
    entries: dict[str, int] = field(default_factory=dict)
    overlaps: dict[str, int] = field(default_factory=dict)

    @property
    def overlapping(self) -> int:
        """Entries changed by more than one source, over all weights (0: the sources are disjoint)."""
        return sum(self.overlaps.values())


class MultiDelta:
    """A base model holding several loaded deltas, at most one of them merged (active) at a time.

    >>> deltas = MultiDelta(model).load("math", "out/math").load("chat", "out/chat-peft")
    >>> deltas.activate("math")   # model now equals base + math
    >>> deltas.activate("chat")   # O(k): restore math's entries, merge chat's
    >>> deltas.activate(None)     # the base, bit for bit

    Cast or move the model only while no delta is active (the saved base values keep the dtype and device they had).
    """

    def __init__(self, model: nn.Module) -> None:
        if delta_layers(model):
            raise ValueError("MultiDelta holds deltas on a plain base model, and this one has delta layers attached: "
                             "fold them first (sparse_lightning.sparse.merge_and_unwrap, then "
                             "sparse_lightning.structure.restore_original_layout for S2FT) or load a fresh base")
        self.model = model
        self._deltas: dict[str, list[_Part]] = {}
        self._active: str | None = None
        self._saved: list[Tensor] = []

    # -------------------------------------------------------------------------------------------- inspecting

    @property
    def active(self) -> str | None:
        """The merged delta's name, or None when the model holds the base weights."""
        return self._active

    @property
    def names(self) -> list[str]:
        """Loaded deltas, in loading order."""
        return list(self._deltas)

    def entries(self, name: str) -> dict[str, int]:
        """Entries the delta `name` changes, per parameter."""
        return {part.name: part.entries for part in self._parts(name)}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held beside the model: the loaded deltas (positions + fp32 values) and the base values saved for the
        active one."""
        return {"loaded": sum(part.nbytes() for parts in self._deltas.values() for part in parts),
                "saved": sum(saved.nbytes for saved in self._saved)}

    # -------------------------------------------------------------------------------------------- loading

    def load(self, name: str, path: str | Path) -> MultiDelta:
        """Read and validate a delta directory (this library's or a PEFT SHiRA / Super-Tuning adapter) under `name`;
        the model is not changed (the active delta stays active). Returns self, so loads chain."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a delta name must be a non-empty string, got {name!r}")
        if name in self._deltas:
            raise ValueError(f"a delta named {name!r} is loaded already: unload({name!r}) first or pick another name")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such delta directory")
        init = init_chain(path)[:-1]
        if init:  # its values add onto base + init_delta: alone it is not the trained model
            raise ValueError(f"{path} was trained from init_delta {init[-1]}: load that too and fuse them "
                             f"(load('start', {str(init[-1])!r}), then fuse(['start', {name!r}], as_name=...)); the "
                             "model was not changed")
        names = {id(param): param_name for param_name, param in self.model.named_parameters()}
        with self._base():  # read against the base (Super-Tuning may pick positions from its weights)
            updates = checked_updates_any(self.model, path)
        parts = []
        for weight, dim, index, delta in updates:
            if not weight.is_floating_point():
                raise ValueError(f"{path}: {names[id(weight)]} is {weight.dtype} (a quantized base?); MultiDelta "
                                 "merges into floating-point weights only; the model was not changed")
            parts.append(_part(names[id(weight)], weight, dim, index, delta))
        self._deltas[name] = parts
        return self

    def unload(self, name: str) -> None:
        """Forget the delta `name` (deactivating it first if it is active)."""
        self._parts(name)
        if self._active == name:
            self.activate(None)
        del self._deltas[name]

    # -------------------------------------------------------------------------------------------- switching

    @torch.no_grad()
    def activate(self, name: str | None) -> None:
        """Make `name` the merged delta (None: the base), in place. Costs O(k of the old + k of the new delta): the
        old one's entries get their saved base values back, then the new one's are saved and merged."""
        if name is not None:
            self._parts(name)
        if name == self._active:
            return
        self._restore()
        if name is not None:
            parts = self._deltas[name]
            try:
                for part in parts:
                    self._saved.append(_merge(part))
            except BaseException:
                self._restore(parts)
                raise
            self._active = name

    def _restore(self, parts: list[_Part] | None = None) -> None:
        """Give the active delta's (or the partly merged `parts`') entries their saved base values back."""
        if parts is None and self._active is None:
            return
        parts = self._deltas[self._active] if parts is None else parts
        for part, saved in reversed(list(zip(parts, self._saved))):
            _write(part, saved)
        self._saved = []
        self._active = None

    @contextmanager
    def _base(self) -> Iterator[None]:
        """The base weights for the duration (O(k)), then the active delta again."""
        active = self._active
        self.activate(None)
        try:
            yield
        finally:
            self.activate(active)

    def _require_finite(self, parts: list[_Part], names: Sequence[str], scales: list[float]) -> None:
        """A fused delta whose values, or base + values in the weight's dtype, are not finite is refused."""
        with self._base():
            for part in parts:
                bad = overflowing(part.weight, part.dim, part.index, part.delta)
                if bad:
                    raise ValueError(f"fusing {', '.join(names)} with weights {scales} would make {bad} entries of "
                                     f"{part.name} non-finite in {str(part.weight.dtype).removeprefix('torch.')}: use "
                                     "smaller weights; nothing was loaded")

    def _parts(self, name: str) -> list[_Part]:
        if name not in self._deltas:
            loaded = ", ".join(map(repr, self._deltas)) or "none"
            raise UnknownDeltaError(f"no delta named {name!r} is loaded (loaded: {loaded}); load(name, path) it first")
        return self._deltas[name]

    # -------------------------------------------------------------------------------------------- fusing

    def fuse(self, names: Sequence[str], as_name: str, weights: Sequence[float] | None = None) -> FusionReport:
        """Load the sum of the deltas `names` as `as_name` (not activated), each scaled by its entry of `weights`
        (default all 1; e.g. 0.5 each averages them, task-arithmetic style). Where they change the same entry their
        fp32 values are added (counted per weight in the report, and warned about); S2FT blocks on disjoint channels
        of one weight stay blocks, each untouched. Two deltas replacing the same dense parameter cannot be summed and
        are refused, and a replaced dense parameter cannot be scaled."""
        if isinstance(names, str) or len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"fuse needs a list of at least two different loaded delta names, got {names!r}")
        if as_name in self._deltas or not isinstance(as_name, str) or not as_name:
            raise ValueError(f"as_name must be a new, non-empty name, got {as_name!r} (loaded: {self.names})")
        scales = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if len(scales) != len(names) or not all(math.isfinite(w) and abs(w) <= FP32_MAX for w in scales):
            raise ValueError(f"weights must be {len(names)} finite numbers, one per delta in {list(names)}, each within "
                             f"fp32's range (|w| <= {FP32_MAX:.3g}: deltas are added in fp32), got {weights!r}")
        by_weight: dict[str, list[_Part]] = {}
        for name, scale in zip(names, scales):
            for part in self._parts(name):
                if scale != 1.0:
                    if part.dim is None:
                        raise ValueError(f"{name} replaces the dense parameter {part.name} (e.g. a trained "
                                         f"classifier): it cannot be scaled by {scale}; give it weight 1")
                    part = replace(part, delta=part.delta * scale)
                by_weight.setdefault(part.name, []).append(part)
        report = FusionReport(as_name, list(names))
        fused = []
        for weight_name, parts in by_weight.items():
            part, overlap = _fuse(parts, names)
            fused.append(part)
            report.entries[weight_name], report.overlaps[weight_name] = part.entries, overlap
        self._require_finite(fused, names, scales)
        self._deltas[as_name] = fused
        if report.overlapping:
            weights = sum(1 for count in report.overlaps.values() if count)
            warnings.warn(f"fused deltas {', '.join(names)} overlap at {report.overlapping} entries in {weights} "
                          f"weight(s); their values were added there (FusionReport.overlaps has the counts)",
                          stacklevel=2)
        return report


# ------------------------------------------------------------------------------------------------- parts


def _part(name: str, weight: nn.Parameter, dim: Dim, index: Tensor | None, delta: Tensor) -> _Part:
    """A validated update as stored: positions in the smallest index dtype, values fp32, both on the weight's device."""
    device = weight.device
    if dim is None:
        return _Part(name, weight, None, None, delta.to(device=device, dtype=weight.dtype).clone())
    size = weight.numel() if dim == -1 else weight.shape[dim]
    index_dtype = torch.int32 if size < 2**31 else torch.long
    return _Part(name, weight, dim, index.to(device=device, dtype=index_dtype).contiguous(),
                 delta.to(device=device, dtype=torch.float32).contiguous())


def _target(part: _Part) -> tuple[Tensor, int, tuple]:
    """The tensor written (the flat weight for entries), the dimension indexed, and the `__setitem__` key."""
    weight = part.weight.data
    index = part.index.to(weight.device)  # a no-op unless the model moved since loading
    if part.dim == -1:
        return weight.view(-1), 0, (index,)
    return weight, part.dim, (index,) if part.dim == 0 else (slice(None), index)


def _merge(part: _Part) -> Tensor:
    """Write base + delta at the part's positions (fp32 sum, rounded once, as `apply_delta`); returns the base values
    it overwrote."""
    if part.dim is None:
        saved = part.weight.data.clone()
        part.weight.data.copy_(part.delta.to(part.weight.device))
        return saved
    target, along, key = _target(part)
    saved = target.index_select(along, key[-1])
    summed = saved.float() + part.delta.to(target.device)
    target[key] = summed.to(target.dtype)
    return saved


def _write(part: _Part, values: Tensor) -> None:
    """Put `values` (saved by `_merge`) back at the part's positions."""
    if part.dim is None:
        part.weight.data.copy_(values)
        return
    target, _, key = _target(part)
    target[key] = values


def _fuse(parts: list[_Part], names: Sequence[str]) -> tuple[_Part, int]:
    """One weight's parts summed into one, and the number of its entries more than one part changes."""
    first = parts[0]
    if first.dim is None or any(part.dim is None for part in parts):
        if len(parts) > 1:
            raise ValueError(f"{', '.join(names)} each replace the dense parameter {first.name} (e.g. a trained "
                             "classifier); replacements cannot be summed: fuse deltas that train it in at most one")
        return first, 0
    if len(parts) == 1:
        return first, 0
    weight = first.weight
    if all(part.dim == first.dim for part in parts) and first.dim in (0, 1):  # S2FT blocks along one dimension
        index = torch.cat([part.index.long() for part in parts])
        positions, inverse, counts = torch.unique(index, return_inverse=True, return_counts=True)
        shape = list(weight.shape)
        shape[first.dim] = positions.numel()
        block = torch.zeros(shape, dtype=torch.float32, device=first.delta.device)
        block.index_add_(first.dim, inverse, torch.cat([part.delta for part in parts], dim=first.dim))
        overlap = int((counts > 1).sum()) * weight.shape[1 - first.dim]
        return _part(first.name, weight, first.dim, positions, block), overlap
    flats, values = zip(*(_entries(part) for part in parts))
    positions, inverse, counts = torch.unique(torch.cat(flats), return_inverse=True, return_counts=True)
    summed = torch.zeros(positions.numel(), dtype=torch.float32, device=first.delta.device)
    summed.index_add_(0, inverse, torch.cat(values))
    return _part(first.name, weight, -1, positions, summed), int((counts > 1).sum())


def _entries(part: _Part) -> tuple[Tensor, Tensor]:
    """A part as flat row-major positions (int64) and fp32 values; blocks expanded entry by entry."""
    if part.dim == -1:
        return part.index.long(), part.delta
    out, inp = part.weight.shape
    index = part.index.long()
    if part.dim == 1:  # block [out, s] on columns
        flat = torch.arange(out, device=index.device).unsqueeze(1) * inp + index.unsqueeze(0)
    else:  # block [s, in] on rows
        flat = index.unsqueeze(1) * inp + torch.arange(inp, device=index.device).unsqueeze(0)
    return flat.reshape(-1), part.delta.reshape(-1)
