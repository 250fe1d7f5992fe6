"""Autograd Functions of the sparse substrate.

`SparseDeltaLinearFunction` computes `x (W + scatter(indices, values))^T + b` without keeping a
merged copy of W alive between forward and backward: it saves the frozen weight itself (no copy),
rebuilds the merged weight transiently in backward, and reduces the dense weight gradient to the
k trained entries before returning, so no dense gradient of W outlives this layer's backward.
Gradients are computed here, not through hooks on frozen weights, which never fire under FSDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def merged_weight(weight: Tensor, indices: Tensor, values: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh tensor equal to `weight + scatter(indices, values)` in `dtype` (weight's by default)."""
    merged = weight.to(dtype or weight.dtype, copy=True)
    merged.view(-1).index_add_(0, indices, values.to(merged.dtype))
    return merged


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a plain nn.Linear would compute in: autocast's when active, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class SparseDeltaLinearFunction(torch.autograd.Function):
    """Linear layer whose effective weight is a frozen dense weight plus k trainable entries.

    `score_sink`, when given, is a dense fp32 tensor of the weight's shape into which backward adds
    the dense weight gradient: calibration (SIFT's top-k of |gradient|) reads it, training does not.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, values: Tensor,
                score_sink: Tensor | None) -> Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            out = F.linear(x, merged_weight(weight, indices, values, dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, weight, indices, values)
        ctx.score_sink = score_sink
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, indices, values = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ merged_weight(weight, indices, values, x.dtype)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[4] or ctx.score_sink is not None:
            dense_grad = flat_grad.t() @ x.reshape(-1, x.shape[-1])  # [out, in], freed on return
            if ctx.score_sink is not None:
                ctx.score_sink.add_(dense_grad.float())
            if ctx.needs_input_grad[4]:
                grad_values = dense_grad.view(-1)[indices].to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, grad_values, None


def sparse_delta_linear(x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, values: Tensor,
                        score_sink: Tensor | None = None) -> Tensor:
    """Functional form of `SparseDeltaLinearFunction` (see its docstring)."""
    return SparseDeltaLinearFunction.apply(x, weight, bias, indices, values, score_sink)
