"""Autograd Functions for S2FT's dense blocks on a frozen weight (partial back-propagation).

After co-permutation the trained units are the first s input columns (o/down) or output rows (v/up/gate)
of a weight, so the trainable part is one dense block. These Functions add it without merging, compute its
gradient from what it needs only, and never form the frozen weight's dense gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_lightning.sparse.functional import FrozenWeight, _compute_dtype, frozen


class ColumnBlockLinearFunction(torch.autograd.Function):
    """`x W^T + b + x[..., :s] B^T`: a trainable dense block B [out, s] on the first s input columns of a frozen W.

    S2FT's partial back-propagation: B's gradient is `grad_out^T x[..., :s]`, so backward keeps only those s
    columns of the input (a compact copy, not a view that would pin the whole input), and W's gradient is never
    formed; `grad_x = grad_out W_eff` needs no saved activation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: FrozenWeight, bias: Tensor | None, block: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        ctx.weight_fn, weight = frozen(weight)
        s = block.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            out = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
            x_selected = x[..., :s].contiguous()
            out += F.linear(x_selected, block.to(dtype))
        ctx.save_for_backward(x_selected, None if ctx.weight_fn else weight, block)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_selected, weight, block = ctx.saved_tensors
        weight = ctx.weight_fn() if ctx.weight_fn else weight
        grad_out = grad_out.to(x_selected.dtype)
        s = block.shape[1]
        grad_x = grad_bias = grad_block = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
            grad_x[..., :s] += grad_out @ block.to(grad_out.dtype)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_block = (flat_grad.t() @ x_selected.reshape(-1, s)).to(block.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_block


class RowBlockLinearFunction(torch.autograd.Function):
    """`x W^T + b` with a trainable dense block B [s, in] added to s output rows of a frozen W from row `start`
    (0 after co-permutation; a fused weight's role starts later).

    B's gradient `grad_out[..., :s]^T x` needs the whole input (as LoRA does); W's gradient is never formed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: FrozenWeight, bias: Tensor | None, block: Tensor, start: int = 0) -> Tensor:
        dtype = _compute_dtype(x)
        ctx.weight_fn, weight = frozen(weight)
        s = block.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            out = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
            out[..., start:start + s] += F.linear(x, block.to(dtype))
        ctx.save_for_backward(x, None if ctx.weight_fn else weight, block)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.start = start
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, block = ctx.saved_tensors
        weight = ctx.weight_fn() if ctx.weight_fn else weight
        grad_out = grad_out.to(x.dtype)
        grad_selected = grad_out[..., ctx.start:ctx.start + block.shape[0]]
        grad_x = grad_bias = grad_block = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype) + grad_selected @ block.to(grad_out.dtype)
        if ctx.needs_input_grad[3]:
            flat_selected = grad_selected.reshape(-1, grad_selected.shape[-1])
            grad_block = (flat_selected.t() @ x.reshape(-1, x.shape[-1])).to(block.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_block, None


def column_block_linear(x: Tensor, weight: Tensor, bias: Tensor | None, block: Tensor) -> Tensor:
    """Functional form of `ColumnBlockLinearFunction` (see its docstring)."""
    return ColumnBlockLinearFunction.apply(x, weight, bias, block)


def row_block_linear(x: Tensor, weight: Tensor, bias: Tensor | None, block: Tensor, start: int = 0) -> Tensor:
    """Functional form of `RowBlockLinearFunction` (see its docstring)."""
    return RowBlockLinearFunction.apply(x, weight, bias, block, start)
