"""Autograd Functions of the sparse substrate.

`SparseDeltaLinearFunction` computes `x (W + scatter(indices, values))^T + b` without keeping a
merged copy of W alive between forward and backward: it saves the frozen weight itself (no copy). While
training, forward and backward add the k values into W in place and restore those k entries bit for bit
right after their one product (O(k), where a merged copy costs a weight-sized write); without gradients
the product runs on a merged copy, as the export's merged model does. The gradient of the k values is a
sampled dense-dense product (only the k needed dot products, through a CSR mask of the indices that the
layer caches until its indices change); the dense weight gradient is formed only while a method observes
it (SIFT calibration, SpIEL candidate windows) and freed before backward returns. Gradients are computed
here, not through hooks on frozen weights, which never fire under FSDP.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

# The CSR mask below is a transient index structure for one kernel, not a user-facing sparse tensor.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

#: Receives a layer's dense weight gradient (the weight's stored shape, compute dtype) during backward; must not
#: keep it.
WeightGradObserver = Callable[[Tensor], None]

#: Tokens per `sampled_addmm` call on CPU. Its CPU kernel first makes both operands contiguous along the token
#: axis (two transposed copies, [out, tokens] and [in, tokens]); in blocks of 64-256 tokens those copies stay in cache,
#: which on SmolLM2's shapes takes the value gradient from ~0.8-1.1 to ~0.5-0.6 s per step
#: (benchmarks/sift_backward_micro.py). GPUs take the whole batch in one call.
CPU_TOKEN_CHUNK = 128


def _merged_entries(originals: Tensor, values: Tensor, dtype: torch.dtype) -> Tensor:
    """W[indices] + values in `dtype`: added in W's precision from fp32 up, below it summed in fp32 and rounded once."""
    if dtype in (torch.float32, torch.float64):
        return originals.to(dtype) + values.to(dtype)
    return (originals.float() + values.float()).to(dtype)


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


@contextmanager
def merged_in_place(weight: Tensor, indices: Tensor, values: Tensor) -> Iterator[Tensor]:
    """`weight` itself holding `weight + scatter(indices, values)` (the same entries `merged_weight` computes) for
    the body of the block; the k entries are restored bit for bit on exit, even on error. Writes go through
    `.data` so W's autograd version does not move: a retained graph that saved W can still run backward again."""
    flat = weight.data.view(-1)
    originals = flat[indices]
    flat[indices] = _merged_entries(originals, values, flat.dtype)
    try:
        yield weight
    finally:
        flat[indices] = originals


class IndexLayout:
    """The k flat positions of a [out, in] weight as a CSR mask (row pointers, columns in row-major order) and
    where each entry of the mask belongs among the k slots. Built once per set of indices: a layer keeps it until
    its indices change (SIFT and the random mask never after selection, SpIEL at each reselection)."""

    def __init__(self, indices: Tensor, shape: torch.Size) -> None:
        out_features, in_features = shape
        flat = indices.long()
        in_order = flat.numel() < 2 or bool((flat[1:] > flat[:-1]).all())
        #: Positions of the sorted entries among the k slots; None when the indices are already sorted.
        self.order: Tensor | None = None
        if not in_order:
            flat, self.order = flat.sort()
        rows = flat // in_features
        self.crow = torch.zeros(out_features + 1, dtype=torch.int64, device=flat.device)
        self.crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        self.col = flat % in_features
        self.shape = torch.Size(shape)

    def mask(self, dtype: torch.dtype) -> Tensor:
        """The CSR mask with zero values of `dtype` (sampled_addmm's `input`; with beta=0 only its pattern counts).
        Made per call, not kept: a sparse tensor would stop the layer from being deep-copied or pickled."""
        zeros = torch.zeros(self.col.numel(), dtype=dtype, device=self.col.device)
        return torch.sparse_csr_tensor(self.crow, self.col, zeros, self.shape, check_invariants=False)

    def to_slots(self, sampled: Tensor) -> Tensor:
        """Values in mask order -> values in slot order."""
        return sampled if self.order is None else torch.empty_like(sampled).scatter_(0, self.order, sampled)


def sampled_weight_grad(grad_out: Tensor, x: Tensor, indices: Tensor, shape: torch.Size,
                        layout: IndexLayout | None = None) -> Tensor:
    """`(grad_out^T @ x).view(-1)[indices]` without the dense product: k dot products through a CSR mask (`layout`,
    built here when not given), over blocks of tokens on CPU."""
    out_features, in_features = shape
    grad_out, x = grad_out.reshape(-1, out_features), x.reshape(-1, in_features)
    dtype = grad_out.dtype if grad_out.dtype in (torch.float32, torch.float64) else torch.float32  # the kernels' dtypes
    layout = layout or IndexLayout(indices, shape)
    mask = layout.mask(dtype)
    chunk = CPU_TOKEN_CHUNK if grad_out.device.type == "cpu" else grad_out.shape[0]
    sampled = None
    for start in range(0, grad_out.shape[0], max(chunk, 1)):
        g, xs = grad_out[start:start + chunk].to(dtype), x[start:start + chunk].to(dtype)
        part = torch.sparse.sampled_addmm(mask, g.t(), xs, beta=0.0).values()
        sampled = part if sampled is None else sampled.add_(part)
    if sampled is None:  # no tokens at all
        return torch.zeros(indices.numel(), dtype=dtype, device=grad_out.device)
    return layout.to_slots(sampled)


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


@contextmanager
def _effective_weight(weight: Tensor, indices: Tensor, values: Tensor, dtype: torch.dtype,
                      in_place: bool) -> Iterator[Tensor]:
    """W + scatter(values) in `dtype` for one product: W itself merged in place when allowed and already in `dtype`
    (under autocast the cast is a copy anyway), else a merged copy."""
    if in_place and weight.dtype == dtype:
        with merged_in_place(weight, indices, values) as merged:
            yield merged
    else:
        yield merged_weight(weight, indices, values, dtype)


class SparseDeltaLinearFunction(torch.autograd.Function):
    """Linear layer whose effective weight is a frozen dense weight plus k trainable entries.

    `observer`, when given, is called in backward with the dense weight gradient: SIFT accumulates
    |gradient| scores from it, SpIEL picks and measures regrowth candidates; training alone never forms it.
    `transposed` means the weight is stored [in, out] (GPT-2's `Conv1D`): indices, merging and the observed
    gradient all stay in that stored layout. `layout` is the indices' cached `IndexLayout` (built in backward when
    not given). `in_place` (set when gradients are being recorded) lets forward and backward merge into W in place
    for their one product; off, forward runs on a merged copy, bit for bit what it always computed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: FrozenWeight, bias: Tensor | None, indices: Tensor, values: Tensor,
                observer: WeightGradObserver | None, transposed: bool = False, layout: IndexLayout | None = None,
                in_place: bool = False) -> Tensor:
        dtype = _compute_dtype(x)
        ctx.weight_fn, weight = frozen(weight)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            with _effective_weight(weight, indices, values, dtype, in_place) as merged:
                out = F.linear(x, merged.t() if transposed else merged, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, None if ctx.weight_fn else weight, indices, values)
        ctx.observer = observer
        ctx.transposed = transposed
        ctx.layout = layout
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
            with _effective_weight(weight, indices, values, x.dtype, in_place=True) as merged:
                grad_x = grad_out @ (merged.t() if ctx.transposed else merged)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.observer is not None:
            dense_grad = left.reshape(-1, left.shape[-1]).t() @ right.reshape(-1, right.shape[-1])  # freed on return
            ctx.observer(dense_grad)
            if ctx.needs_input_grad[4]:
                grad_values = dense_grad.view(-1)[indices].to(values.dtype)
        elif ctx.needs_input_grad[4]:
            grad_values = sampled_weight_grad(left, right, indices, weight.shape, ctx.layout).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, grad_values, None, None, None, None


def sparse_delta_linear(x: Tensor, weight: FrozenWeight, bias: Tensor | None, indices: Tensor, values: Tensor,
                        observer: WeightGradObserver | None = None, transposed: bool = False,
                        layout: IndexLayout | None = None) -> Tensor:
    """Functional form of `SparseDeltaLinearFunction` (see its docstring); merges in place only while gradients are
    being recorded, so inference computes exactly the merged-copy product."""
    in_place = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, values))
    return SparseDeltaLinearFunction.apply(x, weight, bias, indices, values, observer, transposed, layout, in_place)
