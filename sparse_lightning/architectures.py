"""One table of architecture knowledge, per `config.model_type`: what every method needs to know of a model.

- `targets`: the projections the element-sparse methods and LoRA train by default (SIFT's choice: every
  attention and FFN projection);
- `layouts`: S2FT's coupled structures in one transformer block (heads: q/k/v rows with o columns; channels:
  up/gate rows with down columns), by role. A role may address part of a fused weight: Phi-3 stacks q, k, v
  in `qkv_proj` (and gate, up in `gate_up_proj`) one after another; GPT-NeoX interleaves them per head;
- `heads_key` / `kv_heads_key`: the config fields holding the attention head counts.

Adding an architecture is one entry here. GPT-2's `Conv1D` (a transposed Linear) is wrapped like a Linear by
every element-sparse method; S2FT needs `layouts`, so a family without them gets a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class Role:
    """Where a role's units live, relative to a block: a module path and, for a fused projection, the roles
    stacked in it (`fused`, in storage order) and whether they repeat per unit (`interleaved`)."""

    path: str
    fused: tuple[str, ...] = ()
    interleaved: bool = False


@dataclass(frozen=True)
class GroupLayout:
    """One coupled group inside a transformer block: the module owning it and its projections by role."""

    kind: Literal["heads", "channels"]
    owner: str
    roles: dict[str, Role]


@dataclass(frozen=True)
class Architecture:
    targets: tuple[str, ...]
    layouts: tuple[GroupLayout, ...] = ()
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    notes: str = field(default="", compare=False)


def _plain(**paths: str) -> dict[str, Role]:
    return {role: Role(path) for role, path in paths.items()}


def _fused(path: str, roles: tuple[str, ...], interleaved: bool = False) -> dict[str, Role]:
    return {role: Role(path, roles, interleaved) for role in roles}


LLAMA_LIKE = Architecture(
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    layouts=(
        GroupLayout("heads", "self_attn", _plain(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                                                 o="self_attn.o_proj")),
        GroupLayout("channels", "mlp", _plain(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")),
    ),
)
BERT_LIKE = Architecture(
    targets=("query", "key", "value", "attention.output.dense"),
    layouts=(
        GroupLayout("heads", "attention", _plain(q="attention.self.query", k="attention.self.key",
                                                 v="attention.self.value", o="attention.output.dense")),
        GroupLayout("channels", "", _plain(up="intermediate.dense", down="output.dense")),
    ),
)
PHI3 = Architecture(
    targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    layouts=(
        GroupLayout("heads", "self_attn", {**_fused("self_attn.qkv_proj", ("q", "k", "v")),
                                           "o": Role("self_attn.o_proj")}),
        GroupLayout("channels", "mlp", {**_fused("mlp.gate_up_proj", ("gate", "up")), "down": Role("mlp.down_proj")}),
    ),
)
GPT_NEOX = Architecture(
    targets=("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"),
    layouts=(
        GroupLayout("heads", "attention", {**_fused("attention.query_key_value", ("q", "k", "v"), interleaved=True),
                                           "o": Role("attention.dense")}),
        GroupLayout("channels", "mlp", _plain(up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h")),
    ),
)
GPT2 = Architecture(targets=("c_attn", "c_proj", "c_fc"), heads_key="n_head",
                    notes="Conv1D projections (transposed weights); no S2FT layout")

#: `config.model_type` -> what the methods know of it.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE,
    "bert": BERT_LIKE, "roberta": BERT_LIKE,
    "phi3": PHI3, "gpt_neox": GPT_NEOX, "gpt2": GPT2,
}


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture_of(model: nn.Module, needs: str = "targets") -> Architecture:
    """The model's entry, or an error naming the known families and what to pass instead."""
    model_type = model_type_of(model)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"no {needs} known for model_type {model_type!r} (known: {', '.join(sorted(ARCHITECTURES))}); "
                         "pass target_modules explicitly (e.g. ['q_proj', 'v_proj']) or add the family to "
                         "sparse_lightning.architectures.ARCHITECTURES")
    return ARCHITECTURES[model_type]
