"""Autograd Functions of the sparse substrate.

`SparseDeltaLinearFunction` computes `x (W + scatter(indices, values))^T + b` without keeping a
merged copy of W alive between forward and backward: it saves the frozen weight itself (no copy) and
rebuilds the merged weight transiently in backward. The gradient of the k values is a sampled
dense-dense product (only the k needed dot products); the dense weight gradient is formed only while
a method observes it (SIFT calibration, SpIEL candidate windows) and freed before backward returns.
Gradients are computed here, not through hooks on frozen weights, which never fire under FSDP.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# The CSR mask below is a transient index structure for one kernel, not a user-facing sparse tensor.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

#: Receives a layer's dense weight gradient (the weight's stored shape, compute dtype) during backward; must not
#: keep it.
WeightGradObserver = Callable[[Tensor], None]


def merged_weight(weight: Tensor, indices: Tensor, values: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh tensor equal to `weight + scatter(indices, values)` in `dtype` (weight's by default). Below fp32 the
    covered entries are summed in fp32 and rounded once, exactly as merging writes them (the indices are unique)."""
    merged = weight.to(dtype or weight.dtype, copy=True)
    flat = merged.view(-1)
    if merged.dtype in (torch.float32, torch.float64):
        flat.index_add_(0, indices, values.to(merged.dtype))
    else:
        flat[indices] = (weight.view(-1)[indices].float() + values.float()).to(merged.dtype)
    return merged


def sampled_weight_grad(grad_out: Tensor, x: Tensor, indices: Tensor, shape: torch.Size) -> Tensor:
    """`(grad_out^T @ x).view(-1)[indices]` without the dense product: k dot products through a CSR mask."""
    out_features, in_features = shape
    grad_out, x = grad_out.reshape(-1, out_features), x.reshape(-1, in_features)
    if grad_out.dtype not in (torch.float32, torch.float64):  # sampled_addmm's kernels are fp32/fp64
        grad_out, x = grad_out.float(), x.float()
    flat, order = indices.long().sort()
    rows = flat // in_features
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    mask = torch.sparse_csr_tensor(crow, flat % in_features, torch.zeros(flat.numel(), dtype=x.dtype, device=x.device),
                                   (out_features, in_features), check_invariants=False)
    sampled = torch.sparse.sampled_addmm(mask, grad_out.t(), x, beta=0.0).values()
    return torch.empty_like(sampled).scatter_(0, order, sampled)


#: A frozen weight, or a function rebuilding it (a quantized base de-quantizes in forward and again in backward).
FrozenWeight = Tensor | Callable[[], Tensor]


def frozen(weight: FrozenWeight) -> tuple[Callable[[], Tensor] | None, Tensor]:
    """(the rebuilding function or None, the weight now)."""
    return (weight, weight()) if callable(weight) else (None, weight)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a plain nn.Linear would compute in: autocast's when active, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class SparseDeltaLinearFunction(torch.autograd.Function):
    """Linear layer whose effective weight is a frozen dense weight plus k trainable entries.

    `observer`, when given, is called in backward with the dense weight gradient: SIFT accumulates
    |gradient| scores from it, SpIEL picks and measures regrowth candidates; training alone never forms it.
    `transposed` means the weight is stored [in, out] (GPT-2's `Conv1D`): indices, merging and the observed
    gradient all stay in that stored layout.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, values: Tensor,
                observer: WeightGradObserver | None, transposed: bool = False) -> Tensor:
        dtype = _compute_dtype(x)
        ctx.weight_fn, weight = frozen(weight)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            merged = merged_weight(weight, indices, values, dtype)
            out = F.linear(x, merged.t() if transposed else merged, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, None if ctx.weight_fn else weight, indices, values)
        ctx.observer = observer
        ctx.transposed = transposed
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, indices, values = ctx.saved_tensors
        weight = ctx.weight_fn() if ctx.weight_fn else weight
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_bias = grad_values = None
        # In the stored layout the weight gradient is left^T @ right: grad_out^T x, or x^T grad_out if transposed.
        left, right = (x, grad_out) if ctx.transposed else (grad_out, x)
        if ctx.needs_input_grad[0]:
            merged = merged_weight(weight, indices, values, x.dtype)
            grad_x = grad_out @ (merged.t() if ctx.transposed else merged)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.observer is not None:
            dense_grad = left.reshape(-1, left.shape[-1]).t() @ right.reshape(-1, right.shape[-1])  # freed on return
            ctx.observer(dense_grad)
            if ctx.needs_input_grad[4]:
                grad_values = dense_grad.view(-1)[indices].to(values.dtype)
        elif ctx.needs_input_grad[4]:
            grad_values = sampled_weight_grad(left, right, indices, weight.shape).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, grad_values, None, None


def sparse_delta_linear(x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, values: Tensor,
                        observer: WeightGradObserver | None = None, transposed: bool = False) -> Tensor:
    """Functional form of `SparseDeltaLinearFunction` (see its docstring)."""
    return SparseDeltaLinearFunction.apply(x, weight, bias, indices, values, observer, transposed)
