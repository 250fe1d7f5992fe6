"""Coupled structures per architecture family: which rows and columns move together.

Attention: query head h owns rows [h*d, (h+1)*d) of q and input columns [h*d, (h+1)*d) of o; its KV head
h // G (G query heads per KV head, 1 without grouped-query attention) owns the same rows of k and v.
FFN: channel c owns row c of up (and gate) and input column c of down. Permuting heads (q/k/v rows and o
columns together, never moving a query head away from its KV head) or channels (up/gate rows and down
columns) leaves the block's output unchanged; rotary embeddings act within a head, so they do not care.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

#: Roles whose *input columns* hold the units; every other role holds them in its output rows.
COLUMN_ROLES = ("o", "down")
#: Roles indexed by KV head rather than by query head.
KV_ROLES = ("k", "v")


@dataclass(frozen=True)
class GroupLayout:
    """One coupled group inside a transformer block: the module owning it and its Linears by role
    (paths relative to the block)."""

    kind: Literal["heads", "channels"]
    owner: str
    roles: dict[str, str]


DECODER = (
    GroupLayout("heads", "self_attn", {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                                       "o": "self_attn.o_proj"}),
    GroupLayout("channels", "mlp", {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}),
)
ENCODER = (
    GroupLayout("heads", "attention", {"q": "attention.self.query", "k": "attention.self.key",
                                       "v": "attention.self.value", "o": "attention.output.dense"}),
    GroupLayout("channels", "", {"up": "intermediate.dense", "down": "output.dense"}),
)
#: `config.model_type` -> the layouts of one transformer block.
FAMILIES: dict[str, tuple[GroupLayout, ...]] = {
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "bert": ENCODER, "roberta": ENCODER,
}


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

    def units_of(self, role: str) -> int:
        """How many units the role's weight holds (KV heads for k/v)."""
        return self.num_units // self.group_size if role in KV_ROLES else self.num_units


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
    return ", ".join(path for layout in layouts for path in layout.roles.values())


def find_groups(model: nn.Module) -> list[CoupledGroup]:
    """Every layer's head group and channel group, in model order; a clear error for unknown architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"S2FT has no coupled structure for model_type {model_type!r} (known: {', '.join(sorted(FAMILIES))}); "
            f"it looks for LLaMA-style blocks ({_looked_for(DECODER)}) or BERT-style blocks ({_looked_for(ENCODER)}). "
            "Use a supported model or add its layout to sparse_lightning.structure.families.FAMILIES"
        )
    layouts = FAMILIES[model_type]
    blocks = [name for name, module in model.named_modules()
              if name and all(_has(module, path) for layout in layouts for path in layout.roles.values())]
    if not blocks:
        raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) has no transformer block with the "
                         f"modules S2FT looks for: {_looked_for(layouts)}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}: "
                         "grouped-query attention cannot be honoured for this config")
    groups = []
    for layer, block in enumerate(blocks):
        for layout in layouts:
            roles = {role: _join(block, path) for role, path in layout.roles.items()}
            if layout.kind == "heads":
                in_features = base_linear(model, roles["o"]).in_features
                group = CoupledGroup("heads", layer, _join(block, layout.owner), roles, heads,
                                     in_features // heads, heads // kv_heads)
            else:
                group = CoupledGroup("channels", layer, _join(block, layout.owner), roles,
                                     base_linear(model, roles["down"]).in_features)
            _check_shapes(model, group)
            groups.append(group)
    return groups


def _check_shapes(model: nn.Module, group: CoupledGroup) -> None:
    for role, path in group.roles.items():
        weight = base_linear(model, path).weight
        size = weight.shape[1 if role in COLUMN_ROLES else 0]
        expected = group.units_of(role) * group.unit_size
        if size != expected:
            raise ValueError(f"{path}: expected {expected} {'input columns' if role in COLUMN_ROLES else 'rows'} "
                             f"({group.units_of(role)} units of {group.unit_size}), found {size}")
