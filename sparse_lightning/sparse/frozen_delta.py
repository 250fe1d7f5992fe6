"""A frozen `nn.Linear` plus a trainable fp32 delta on part of its weight: the protocol both delta shapes share.

Merging writes the delta into the base weight in place and keeps a copy of the region it overwrote, so
`unmerge` restores the base bit for bit (evaluation and export merge, training unmerges); `fold` merges for
good. Subclasses say which region the delta covers and how the unmerged forward runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sparse_lightning.sparse.quantized import QUANTIZE
from sparse_lightning.sparse.sharding import set_parameter_data_
from sparse_lightning.sparse.submodules import replace_submodule  # noqa: F401  (importable from here, as before)


#: The trainable tensors of every delta layer: what freezing keeps trainable and export writes as the delta.
DELTA_PARAMETERS = ("delta_values", "delta_block")


def is_delta_parameter(name: str) -> bool:
    return name.rpartition(".")[2] in DELTA_PARAMETERS


def is_transposed_linear(module: nn.Module) -> bool:
    """A Linear that stores its weight [in, out] (GPT-2's `transformers.pytorch_utils.Conv1D`)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear(module: nn.Module) -> bool:
    """What a delta can wrap: `nn.Linear`, or a transposed linear such as GPT-2's `Conv1D`."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


class FrozenLinearWithDelta(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self._merged_originals: Tensor | None = None
        #: GPT-2's `Conv1D` stores its weight [in, out]; deltas address that stored layout (what HF saves).
        self.transposed = is_transposed_linear(base)

    def _apply(self, fn, recurse: bool = True):
        # `.to(torch.bfloat16)`, `.half()` and Trainer(precision="bf16-true") cast every floating tensor; the delta
        # (and so its optimizer state) stays fp32 whatever the base's dtype: it only follows the device.
        fp32 = {name: p.data for name, p in self._parameters.items() if name.startswith("delta_") and p is not None
                and p.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in fp32.items():
            param = self._parameters[name]
            if param.dtype != torch.float32:
                set_parameter_data_(param, before.to(param.device) if not before.is_meta else param.data.float())
        return self

    @property
    def weight_shape(self) -> torch.Size:
        if getattr(self.base, "kind", None) in QUANTIZE:  # de-quantizing just to read a shape would be a waste
            return torch.Size((self.base.out_features, self.base.in_features))
        return self.base.weight.shape

    def frozen_weight(self) -> Tensor | Callable[[], Tensor]:
        """What the autograd Functions read W from: the weight, or for a quantized base the function that
        de-quantizes it (called in forward and again in backward, so no full copy is kept in between)."""
        return self.base.dense_weight if getattr(self.base, "kind", None) in QUANTIZE else self.base.weight

    @property
    def merged(self) -> bool:
        return self._merged_originals is not None

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) if self.merged else self.delta_forward(x)

    def delta_forward(self, x: Tensor) -> Tensor:
        """`x @ (W + delta).T + b` without forming W + delta."""
        raise NotImplementedError

    def export_tensors(self, name: str) -> tuple[dict[str, Tensor], dict]:
        """The layer's delta as named CPU tensors (in the base weight's original layout) and its metadata entry."""
        raise NotImplementedError

    def covered_region(self) -> Tensor:
        """The part of the base weight the delta adds into (read for the copy `unmerge` restores)."""
        raise NotImplementedError

    def add_delta_to_base(self) -> None:
        raise NotImplementedError

    def restore_region(self, originals: Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta into the base weight in place; `unmerge` restores the base bit for bit."""
        if self.merged:
            return
        if getattr(self.base, "kind", None) in QUANTIZE:
            raise ValueError("a quantized base cannot take a delta in place (it would be re-quantized and small "
                             "deltas would vanish): export it merged, which de-quantizes first")
        self._merged_originals = self.covered_region().clone()
        self.add_delta_to_base()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.restore_region(self._merged_originals)
        self._merged_originals = None

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """Merge for good and hand back the plain Linear: inference then costs what the base model costs. A quantized
        base is de-quantized first and never re-quantized."""
        if getattr(self.base, "kind", None) in QUANTIZE:
            self.base = self.base.dequantized()
        self.merge()
        self._merged_originals = None
        return self.base


def delta_layers(model: nn.Module) -> dict[str, FrozenLinearWithDelta]:
    """Every delta layer of the model, whatever its shape, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FrozenLinearWithDelta)}
