"""Coupled structures per architecture family: which rows and columns move together.

Attention: query head h owns rows [h*d, (h+1)*d) of q and input columns [h*d, (h+1)*d) of o; its KV head
h // G (G query heads per KV head, 1 without grouped-query attention) owns the same rows of k and v.
FFN: channel c owns row c of up (and gate) and input column c of down. Permuting heads (q/k/v rows and o
columns together, never moving a query head away from its KV head) or channels (up/gate rows and down
columns) leaves the block's output unchanged; rotary embeddings act within a head, so they do not care.
A role may be part of a fused weight (`architectures.Role`): its rows are then found by `CoupledGroup.positions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from sparse_lightning.architectures import ARCHITECTURES, BERT_LIKE, LLAMA_LIKE, GroupLayout, Role

#: Roles whose *input columns* hold the units; every other role holds them in its output rows.
COLUMN_ROLES = ("o", "down")
#: Roles indexed by KV head rather than by query head.
KV_ROLES = ("k", "v")


#: The layouts of `sparse_lightning.architectures`, per model type (those with a coupled structure).
FAMILIES: dict[str, tuple[GroupLayout, ...]] = {name: arch.layouts for name, arch in ARCHITECTURES.items() if arch.layouts}
DECODER, ENCODER = LLAMA_LIKE.layouts, BERT_LIKE.layouts


@dataclass(frozen=True)
class CoupledGroup:
    """One layer's heads or channels: full module paths of its Linears and its unit geometry.

    Units are query heads (`unit_size` = head_dim, `group_size` = query heads per KV head) or FFN channels
    (`unit_size` = `group_size` = 1). `layer` numbers the transformer blocks in model order.
    """

    kind: Literal["heads", "channels"]
    layer: int
    owner: str
    roles: dict[str, str]
    num_units: int
    unit_size: int = 1
    group_size: int = 1

    fused: dict[str, Role] = field(default_factory=dict)  # roles that are part of a fused weight

    def units_of(self, role: str) -> int:
        """How many units the role holds (KV heads for k/v)."""
        return self.num_units // self.group_size if role in KV_ROLES else self.num_units

    def positions(self, role: str, units: Tensor) -> Tensor:
        """Rows (or columns, for o/down) of the role's weight that the given units own, unit by unit."""
        span = torch.arange(self.unit_size, device=units.device)
        spec = self.fused.get(role)
        if spec is None:
            return (units[:, None] * self.unit_size + span).flatten()
        before = spec.fused[: spec.fused.index(role)]
        if spec.interleaved:  # each unit holds one slice per fused role, in order
            stride = len(spec.fused) * self.unit_size
            return (units[:, None] * stride + len(before) * self.unit_size + span).flatten()
        offset = sum(self.units_of(r) * self.unit_size for r in before)
        return (offset + units[:, None] * self.unit_size + span).flatten()

    def all_positions(self, role: str) -> Tensor:
        return self.positions(role, torch.arange(self.units_of(role)))

    def weight_size(self, role: str) -> int:
        """Rows (columns for o/down) the role's whole weight has: all of its fused roles' together."""
        spec = self.fused.get(role)
        roles = spec.fused if spec is not None else (role,)
        return sum(self.units_of(r) * self.unit_size for r in roles)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def base_linear(model: nn.Module, path: str) -> nn.Linear:
    """The Linear at `path`, looking through a delta layer (which wraps it as `.base`)."""
    module = model.get_submodule(path)
    return getattr(module, "base", module)


def _looked_for(layouts: tuple[GroupLayout, ...]) -> str:
    return ", ".join(dict.fromkeys(spec.path for layout in layouts for spec in layout.roles.values()))


def _in_features(linear: nn.Module) -> int:
    return linear.weight.shape[1]


def find_groups(model: nn.Module) -> list[CoupledGroup]:
    """Every layer's head group and channel group, in model order; a clear error for unknown architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"S2FT has no coupled structure for model_type {model_type!r} (known: {', '.join(sorted(FAMILIES))}); "
            f"it looks for LLaMA-style blocks ({_looked_for(DECODER)}) or BERT-style blocks ({_looked_for(ENCODER)}). "
            "Use a supported model or add its layouts to sparse_lightning.architectures.ARCHITECTURES"
        )
    layouts = FAMILIES[model_type]
    blocks = [name for name, module in model.named_modules()
              if name and all(_has(module, spec.path) for layout in layouts for spec in layout.roles.values())]
    if not blocks:
        raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) has no transformer block with the "
                         f"modules S2FT looks for: {_looked_for(layouts)}")
    architecture = ARCHITECTURES[model_type]
    heads = getattr(config, architecture.heads_key)
    kv_heads = getattr(config, architecture.kv_heads_key, None) or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}: "
                         "grouped-query attention cannot be honoured for this config")
    groups = []
    for layer, block in enumerate(blocks):
        for layout in layouts:
            roles = {role: _join(block, spec.path) for role, spec in layout.roles.items()}
            fused = {role: spec for role, spec in layout.roles.items() if spec.fused}
            if layout.kind == "heads":
                in_features = _in_features(base_linear(model, roles["o"]))
                group = CoupledGroup("heads", layer, _join(block, layout.owner), roles, heads,
                                     in_features // heads, heads // kv_heads, fused)
                if group.group_size > 1 and any(spec.interleaved for spec in fused.values()):
                    raise ValueError(f"{roles['q']}: per-head interleaved q/k/v with grouped-query attention is not a "
                                     "layout S2FT knows")
            else:
                group = CoupledGroup("channels", layer, _join(block, layout.owner), roles,
                                     _in_features(base_linear(model, roles["down"])), fused=fused)
            _check_shapes(model, group)
            groups.append(group)
    return groups


def _check_shapes(model: nn.Module, group: CoupledGroup) -> None:
    for role, path in group.roles.items():
        weight = base_linear(model, path).weight
        size = weight.shape[1 if role in COLUMN_ROLES else 0]
        expected = group.weight_size(role)
        if size != expected:
            raise ValueError(f"{path}: expected {expected} {'input columns' if role in COLUMN_ROLES else 'rows'} "
                             f"({group.units_of(role)} units of {group.unit_size} for {role}), found {size}")
