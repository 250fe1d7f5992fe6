"""Frozen bases stored in 4 or 8 bits (bitsandbytes), for QLoRA-style memory savings with every method.

`QuantizedLinear` keeps the packed weight and its scales as plain buffers (checkpoints hold tensors only and load
with `weights_only=True`), de-quantizes on the fly in forward and again in backward (no full-precision copy lives
between them), and is never trained. Delta layers wrap it like any Linear: the delta and its optimizer state stay
fp32. Merging never re-quantizes: `dequantized()` turns it back into an `nn.Linear`, to which a delta is added.
bitsandbytes is imported only when a model is quantized (`pip install 'sparse-lightning[quant]'`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lightning.sparse.submodules import replace_submodule

Quantize = Literal["nf4", "fp4", "int8"]
QUANTIZE = ("nf4", "fp4", "int8")
BLOCKSIZE = 64
#: Where a PEFT model keeps the HF model's modules (`PeftModel.base_model.model`).
PEFT_PREFIX = "base_model.model."


def _bnb():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:
        raise ImportError("a quantized base needs bitsandbytes: pip install 'sparse-lightning[quant]'") from error
    return bnb_functional


class FrozenWeightLinear(torch.autograd.Function):
    """`x W^T + b` where W is rebuilt by `weight_fn` in forward and again in backward: nothing weight-sized is kept."""

    @staticmethod
    def forward(ctx, x: Tensor, weight_fn: Callable[[], Tensor], bias: Tensor | None) -> Tensor:
        ctx.weight_fn = weight_fn
        ctx.has_bias = bias is not None
        return F.linear(x, weight_fn().to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x = grad_out @ ctx.weight_fn().to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class QuantizedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight is stored as nf4 / fp4 (blockwise, bitsandbytes) or int8 (per row)."""

    def __init__(self, in_features: int, out_features: int, kind: Quantize, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        if kind not in QUANTIZE:
            raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {kind!r}")
        self.in_features, self.out_features, self.kind, self.compute_dtype = in_features, out_features, kind, dtype
        numel = in_features * out_features
        if kind == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("qweight", torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.zeros(-(-numel // BLOCKSIZE), dtype=torch.float32, device=device))
            self.register_buffer("code", torch.zeros(16, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: Quantize) -> QuantizedLinear:
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, kind, linear.bias is not None, weight.dtype, weight.device)
        bnb = _bnb()
        with torch.no_grad():
            if kind == "int8":
                qweight, scales, _ = bnb.int8_vectorwise_quant(weight.to(torch.float16))
                layer.qweight.copy_(qweight)
                layer.scales.copy_(scales.float())
            else:
                qweight, state = bnb.quantize_4bit(weight.float(), blocksize=BLOCKSIZE, quant_type=kind)
                layer.qweight.copy_(qweight)
                layer.scales.copy_(state.absmax)
                layer.code.copy_(state.code)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def weight(self) -> Tensor:
        """The de-quantized weight (a fresh tensor: writing into it changes nothing)."""
        return self.dense_weight()

    def dense_weight(self) -> Tensor:
        bnb = _bnb()
        if self.kind == "int8":
            weight = bnb.int8_vectorwise_dequant(self.qweight, self.scales)
        else:
            state = bnb.QuantState(absmax=self.scales, shape=torch.Size((self.out_features, self.in_features)),
                                   code=self.code, blocksize=BLOCKSIZE, quant_type=self.kind, dtype=torch.float32)
            weight = bnb.dequantize_4bit(self.qweight, state, quant_type=self.kind)
        return weight.to(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return FrozenWeightLinear.apply(x, self.dense_weight, self.bias)

    @torch.no_grad()
    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain `nn.Linear` with the de-quantized weight (for merging and export; never re-quantized)."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                           device=self.qweight.device)
        linear.weight.copy_(self.dense_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def quantize_frozen_linears(model: nn.Module, kind: Quantize, keep: Iterable[str] = ()) -> list[str]:
    """Replace every frozen `nn.Linear` (the bases inside delta layers and PEFT LoRA layers included) by a
    `QuantizedLinear`; modules named in `keep` (HF names: under a PEFT model they are matched below its
    `base_model.model.` prefix too, so a LoRA run's heads and their saved originals stay) and anything holding
    trainable parameters stay as they are. Returns the names replaced."""
    keep = tuple(keep)

    def kept(name: str) -> bool:
        names = (name, name.removeprefix(PEFT_PREFIX)) if name.startswith(PEFT_PREFIX) else (name,)
        return any(n == k or n.startswith(k + ".") for n in names for k in keep)

    chosen = [name for name, module in model.named_modules()
              if type(module) is nn.Linear and not module.weight.requires_grad and not kept(name)]
    quantize_linears(model, chosen, kind)
    return chosen


def quantize_linears(model: nn.Module, names: Iterable[str], kind: Quantize) -> None:
    """Replace the named `nn.Linear`s by `QuantizedLinear`s (a delta checkpoint's list: its base is rebuilt and
    quantized again, the same way training did); names already quantized are kept."""

    for name in names:
        module = model.get_submodule(name)
        if type(module) is nn.Linear:
            replace_submodule(model, name, QuantizedLinear.from_linear(module, kind))
        elif not isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is a {type(module).__name__}, not a Linear to quantize: the checkpoint was saved "
                             "from another model")
    release_checkpoint_mapping(model)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Where `model` holds quantized weights (what a delta checkpoint records instead of the packed weights)."""
    return [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]


@torch.no_grad()
def release_checkpoint_mapping(model: nn.Module) -> None:
    """Copy the frozen CPU parameters that stay full precision (embeddings, norms, heads) out of storage they may share
    with a memory-mapped checkpoint: while one of them maps the file, the replaced weights' pages stay resident and
    quantizing saves no RSS (SmolLM2: 1,088 -> 683 MiB after quantizing). Same tensor objects, so ties hold."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for param in module.parameters(recurse=False):
            if param.device.type == "cpu" and not param.requires_grad:
                param.data = param.data.clone()


def quantized_shells_from_state_dict(model: nn.Module, state_dict: dict[str, Tensor], kind: Quantize,
                                     prefix: str = "") -> None:
    """Put empty `QuantizedLinear`s where a checkpoint holds quantized weights, so its state dict loads."""

    for key in state_dict:
        if key.startswith(prefix) and key.endswith(".qweight"):
            name = key[len(prefix):-len(".qweight")]
            module = model.get_submodule(name)
            if type(module) is nn.Linear:
                shell = QuantizedLinear(module.in_features, module.out_features, kind, module.bias is not None,
                                        module.weight.dtype, module.weight.device)
                replace_submodule(model, name, shell)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Every remaining `QuantizedLinear` back to a plain `nn.Linear` (a merged export vanilla transformers loads)."""

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            replace_submodule(model, name, module.dequantized())
    return model
