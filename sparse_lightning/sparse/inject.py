"""Find target weights by module-name patterns, wrap them with deltas, and fold deltas back in."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sparse_lightning.architectures import architecture_of
from sparse_lightning.borders.name_pattern import NamePattern
from sparse_lightning.sparse.block import attach_blocks_from_state_dict
from sparse_lightning.sparse.delta import SparseDeltaLinear
from sparse_lightning.sparse.frozen_delta import delta_layers, is_delta_parameter, is_linear
from sparse_lightning.sparse.submodules import replace_submodule
from sparse_lightning.structure.records import attach_orders_from_state_dict

def name_matches(name: str, pattern: str) -> bool:
    """PEFT-style matching: the full name, a dotted suffix of it, or a regular expression on the full name (matched in
    linear time: a pattern from a config or checkpoint cannot hang us)."""
    return name == pattern or name.endswith("." + pattern) or _compiled(pattern).fullmatch(name)


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> NamePattern:
    return NamePattern(pattern)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The architecture's default target projections (`sparse_lightning.architectures`)."""
    return architecture_of(model, "default target modules").targets


def _linear_suffixes(model: nn.Module) -> list[str]:
    """Distinct layer-independent names of Linear modules, for error messages."""
    suffixes = {re.sub(r"(^|\.)\d+\.", r"\1", name) for name, m in model.named_modules() if is_linear(m)}
    return sorted(suffixes)


def find_linear_targets(model: nn.Module, patterns: Sequence[str], exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """All `nn.Linear` (or GPT-2 `Conv1D`) modules whose name matches a pattern; an unmatched pattern is an error."""
    found: dict[str, nn.Linear] = {}
    unmatched = set(patterns)
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear):
            module = module.base
        elif not is_linear(module) or name.endswith(".base"):
            continue
        hits = [p for p in patterns if name_matches(name, p)]
        if hits and not any(name_matches(name, e) for e in exclude):
            found[name] = module
            unmatched.difference_update(hits)
    if unmatched:
        raise ValueError(
            f"target pattern(s) {sorted(unmatched)} matched no nn.Linear (or Conv1D) module; "
            f"the Linear modules in this model are: {', '.join(_linear_suffixes(model))}"
        )
    return found


def attach_sparse_deltas(model: nn.Module, ks: dict[str, int]) -> dict[str, SparseDeltaLinear]:
    """Wrap each named Linear with a `SparseDeltaLinear` of k slots; already wrapped ones are kept."""
    layers = {}
    for name, k in ks.items():
        module = model.get_submodule(name)
        if not isinstance(module, SparseDeltaLinear):
            module = SparseDeltaLinear(module, k)
            replace_submodule(model, name, module)
        layers[name] = module
    return layers


def sparse_delta_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def freeze_except(model: nn.Module, trainable_patterns: Iterable[str] = ()) -> None:
    """Freeze every parameter but the deltas and the parameters of modules matching a pattern."""
    patterns = list(trainable_patterns)
    dense = {name for name, _ in model.named_modules() if any(name_matches(name, p) for p in patterns)}
    unmatched = [p for p in patterns if not any(name_matches(name, p) for name in dense)]
    if unmatched:
        names = sorted({re.sub(r"(^|\.)\d+\.", r"\1", n) for n, _ in model.named_modules() if n})
        raise ValueError(f"dense module pattern(s) {unmatched} matched no module; modules are: {', '.join(names)}")
    inside = [(layer, d) for layer in delta_layers(model) for d in dense if layer == d or layer.startswith(d + ".")]
    if inside:
        layer, module = inside[0]
        raise ValueError(f"{layer} has a sparse delta but sits inside the densely trained module {module!r}: take it "
                         f"out of target_modules (exclude_modules) or {module!r} out of dense_modules")
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        in_dense = any(owner == d or owner.startswith(d + ".") for d in dense)
        param.requires_grad_(is_delta_parameter(name) or in_dense)


def merge(model: nn.Module) -> nn.Module:
    """Add every delta into its base weight in place (evaluation or export); `unmerge` restores the bases bit for
    bit. While merged, each layer runs its plain base forward."""
    for layer in delta_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: every base weight exactly as before, deltas separate again (training resumes)."""
    for layer in delta_layers(model).values():
        layer.unmerge()
    return model


@torch.no_grad()
def merge_and_unwrap(model: nn.Module) -> nn.Module:
    """Fold every delta into its base weight and put the plain Linear back: a plain HF model again (S2FT's
    weights stay co-permuted: `sparse_lightning.structure.restore_original_layout` undoes that)."""
    for name, layer in delta_layers(model).items():
        replace_submodule(model, name, layer.fold())
    return model


def recorded_ks(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, int]:
    """Each sparse delta layer a checkpoint holds -> its k (from its value shape)."""
    suffix = ".delta_values"
    return {key[len(prefix):-len(suffix)]: value.shape[0] for key, value in state_dict.items()
            if key.startswith(prefix) and key.endswith(suffix)}


def resize_deltas_as_recorded(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Make the model's sparse delta layers the checkpoint's: a layer of another k is rebuilt at the recorded k, one
    the checkpoint has none for goes back to its plain Linear (missing ones `attach_deltas_from_state_dict` adds).
    For deltas sized from data (SIFT's global allocation), before the optimizer exists."""
    ks = recorded_ks(state_dict, prefix)
    for name, layer in sparse_delta_layers(model).items():
        if name not in ks:
            replace_submodule(model, name, layer.base)
        elif layer.k != ks[name]:
            replace_submodule(model, name, SparseDeltaLinear(layer.base, ks[name]))


def attach_deltas_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Recreate the delta layers a checkpoint holds (k from its value shapes; S2FT blocks and co-permutation
    records from their buffers), so it loads into a fresh model."""
    attach_sparse_deltas(model, recorded_ks(state_dict, prefix))
    attach_blocks_from_state_dict(model, state_dict, prefix)
    attach_orders_from_state_dict(model, state_dict, prefix)
