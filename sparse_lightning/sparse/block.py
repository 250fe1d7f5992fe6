"""S2FT's delta layers: a frozen Linear plus one fp32 dense block on its first s input columns or output rows.

The base weight is stored co-permuted (the selected units first); `delta_columns` / `delta_rows` record where
the block's columns/rows sit in the *original* layout, so export can write the delta un-permuted. The block's
shape is fixed when the layer is made, before any optimizer exists.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_lightning.sparse.block_functional import column_block_linear, row_block_linear
from sparse_lightning.sparse.frozen_delta import FrozenLinearWithDelta
from sparse_lightning.sparse.submodules import replace_submodule


#: Buffer holding a row block's first row when it is not row 0.
START_BUFFER = "delta_row_start"


class BlockDeltaLinear(FrozenLinearWithDelta):
    """Base of the two block layers; `dim` is the weight dimension the block spans a prefix of."""

    dim: int
    index_name: str

    def __init__(self, base: nn.Linear, index: Tensor, start: int = 0) -> None:
        super().__init__(base)
        shape = list(self.weight_shape)
        size = shape[self.dim]
        if not 1 <= index.numel() <= size - start or start < 0:
            raise ValueError(f"a block needs 1 to {size - start} positions from {start} along dim {self.dim} of a "
                             f"{tuple(shape)} weight, got {index.numel()}")
        # On a meta base (loaded by shards after FSDP2 wraps it: modules/sharded_loading.py) the block is real from
        # the start, on the default device, like the element deltas (sparse/delta.py).
        device = base.weight.device if not base.weight.is_meta else torch.get_default_device()
        self.register_buffer(self.index_name, index.to(device=device, dtype=torch.long))
        self.start = start
        if start:  # inside a fused weight (Phi-3's v rows in qkv_proj): recorded, so a checkpoint rebuilds it
            self.register_buffer(START_BUFFER, torch.tensor(start, dtype=torch.long, device=device))
        shape[self.dim] = index.numel()
        self.delta_block = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))

    @property
    def index(self) -> Tensor:
        """Original-layout positions of the block's columns/rows (the block covers the first `size` ones now)."""
        return getattr(self, self.index_name)

    @property
    def size(self) -> int:
        return self.delta_block.shape[self.dim]

    def export_tensors(self, name: str) -> tuple[dict[str, Tensor], dict]:
        """Original-layout positions: export writes the block un-permuted."""
        kind = "columns" if self.dim == 1 else "rows"
        tensors = {f"{name}.{kind}": self.index.detach().cpu().contiguous(),
                   f"{name}.block": self.delta_block.detach().float().cpu().contiguous()}
        return tensors, {"shape": list(self.weight_shape), "kind": kind, "size": self.size, "weight": f"{name}.weight"}

    def covered_region(self) -> Tensor:
        """The block's rows/columns of the (permuted) base weight: `size` of them from `start`."""
        return self.base.weight.narrow(self.dim, self.start, self.size)

    def add_delta_to_base(self) -> None:
        """Summed in fp32 and rounded to the base weight's dtype once."""
        region = self.covered_region()
        region.copy_(region.float() + self.delta_block.float())

    def restore_region(self, originals: Tensor) -> None:
        self.covered_region().copy_(originals)

    def extra_repr(self) -> str:
        out, inp = self.weight_shape
        kind = "columns" if self.dim == 1 else "rows"
        share = self.delta_block.numel() / (out * inp)
        return f"in_features={inp}, out_features={out}, block {kind}={self.size} ({share:.2%})"


class ColumnBlockLinear(BlockDeltaLinear):
    """Trains W[:, :s] (o_proj / down_proj after co-permutation); backward keeps only x[..., :s]."""

    dim = 1
    index_name = "delta_columns"

    def delta_forward(self, x: Tensor) -> Tensor:
        return column_block_linear(x, self.frozen_weight(), self.base.bias, self.delta_block)


class RowBlockLinear(BlockDeltaLinear):
    """Trains W[:s, :] (v_proj / up_proj / gate_proj after co-permutation)."""

    dim = 0
    index_name = "delta_rows"

    def delta_forward(self, x: Tensor) -> Tensor:
        return row_block_linear(x, self.frozen_weight(), self.base.bias, self.delta_block, self.start)


BLOCK_LAYERS: tuple[type[BlockDeltaLinear], ...] = (ColumnBlockLinear, RowBlockLinear)


def block_delta_layers(model: nn.Module) -> dict[str, BlockDeltaLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BlockDeltaLinear)}


def attach_blocks_from_state_dict(model: nn.Module, state_dict: dict[str, Tensor], prefix: str = "") -> None:
    """Recreate a checkpoint's block layers (sizes from its index buffers) around the model's Linears; existing
    block layers are kept. The permuted base weights and order buffers then load like any other tensor."""
    for cls in BLOCK_LAYERS:
        suffix = "." + cls.index_name
        for key, index in state_dict.items():
            if not (key.startswith(prefix) and key.endswith(suffix)):
                continue
            name = key[len(prefix):-len(suffix)]
            module = model.get_submodule(name)
            if not isinstance(module, BlockDeltaLinear):
                start = state_dict.get(f"{prefix}{name}.{START_BUFFER}")
                replace_submodule(model, name, cls(module, index, 0 if start is None else int(start)))
