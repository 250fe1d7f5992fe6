"""What the element-sparse layer (SIFT, the random mask, SpIEL's plain steps) costs over the floor per SmolLM2 step,
and the candidates for each piece, timed on SmolLM2's 210 target shapes before any is adopted.

The floor's layer is a forward GEMM `x W^T` and an input-gradient GEMM `grad_out W`. The sparse layer adds the
effective weight `W + scatter(values)` (in forward and again in backward) and the k value gradients
`(grad_out^T x).view(-1)[indices]`. Candidates for the value gradient: the dense GEMM + gather (what full FT pays),
`torch.sparse.sampled_addmm` on a CSR mask rebuilt every call (the substrate before issue 15), k dot products over
gathered rows chunked over k, and sampled_addmm on a cached mask over the whole batch or in blocks of tokens. For the
effective weight: a merged copy, or W merged in place and its k entries restored. Every candidate is checked against
the dense reference first. Last, the library's `SparseDeltaLinearFunction` end to end (forward + backward) against
the floor's layer, and optionally against another version of `sparse/functional.py` (`--compare-functional`).

    python benchmarks/sift_backward_micro.py --threads 1
    git show <rev>:sparse_lightning/sparse/functional.py > /tmp/functional_before.py
    python benchmarks/sift_backward_micro.py --threads 1 --compare-functional /tmp/functional_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_lightning.sparse import functional
from sparse_lightning.sparse.functional import IndexLayout, merged_in_place, merged_weight, sampled_weight_grad

#: Target weights [out, in] of one decoder layer and the layer count (SmolLM2-135M: q, k, v, o, gate, up, down).
SMOLLM2_LAYER = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
SMOLLM2_LAYERS = 30


def dense_then_gather(g: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    return (g.t() @ x).view(-1)[idx]


def sampled_rebuilt(g: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    """The substrate before issue 15: sort, CSR row pointers and mask built every call, one call over all tokens."""
    out, inp = g.shape[1], x.shape[1]
    flat, order = idx.long().sort()
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(flat // inp, minlength=out).cumsum(0)
    mask = torch.sparse_csr_tensor(crow, flat % inp, torch.zeros(flat.numel()), (out, inp), check_invariants=False)
    sampled = torch.sparse.sampled_addmm(mask, g.t(), x, beta=0.0).values()
    return torch.empty_like(sampled).scatter_(0, order, sampled)


def gathered_rows(g: Tensor, x: Tensor, idx: Tensor, chunk: int = 2048) -> Tensor:
    """k dot products of gathered rows of grad_out^T and x^T (contiguous once per call), chunked over k."""
    inp = x.shape[1]
    gt, xt = g.t().contiguous(), x.t().contiguous()
    rows, cols = idx // inp, idx % inp
    return torch.cat([(gt[rows[i:i + chunk]] * xt[cols[i:i + chunk]]).sum(1) for i in range(0, idx.numel(), chunk)])


def sampled_cached(g: Tensor, x: Tensor, layout: IndexLayout, tokens_per_call: int) -> Tensor:
    mask = layout.mask(g.dtype)
    total = None
    for start in range(0, g.shape[0], tokens_per_call):
        part = torch.sparse.sampled_addmm(mask, g[start:start + tokens_per_call].t(), x[start:start + tokens_per_call],
                                          beta=0.0).values()
        total = part if total is None else total.add_(part)
    return layout.to_slots(total)


def merge_in_place_and_restore(w: Tensor, idx: Tensor, v: Tensor) -> Tensor:
    with merged_in_place(w, idx, v) as merged:
        return merged


def load_functional(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("functional_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer_step(fn: Callable[[Tensor], Tensor], x: Tensor, g: Tensor) -> Callable[[], None]:
    """One layer's forward and backward (the input gradient, and the values' when they train)."""
    def run() -> None:
        leaf = x.detach().requires_grad_(True)
        fn(leaf).backward(g)
    return run


def cpu_time(fn: Callable[[], object], repeats: int) -> float:
    """Median process CPU time (steadier than wall time on a shared machine; equal to it with one thread)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def operations(out: int, inp: int, tokens: int, density: float,
               compared: ModuleType | None) -> dict[str, Callable[[], object]]:
    k = int(density * out * inp) + 1
    g, x, w = torch.randn(tokens, out), torch.randn(tokens, inp), torch.randn(out, inp)
    idx = torch.randperm(out * inp)[:k].sort().values.int()
    v = torch.randn(k, requires_grad=True)
    layout = IndexLayout(idx, torch.Size((out, inp)))
    reference = dense_then_gather(g, x, idx.long())
    value_grads = {
        "dense weight-grad GEMM + gather (full FT's GEMM)": lambda: dense_then_gather(g, x, idx.long()),
        "sampled_addmm, mask rebuilt per call, all tokens at once (before)": lambda: sampled_rebuilt(g, x, idx),
        "k dot products of gathered rows, chunked over k (candidate)": lambda: gathered_rows(g, x, idx.long()),
        "sampled_addmm, cached mask, all tokens at once": lambda: sampled_cached(g, x, layout, tokens),
        **{f"sampled_addmm, cached mask, {n} tokens per call": (lambda n: lambda: sampled_cached(g, x, layout, n))(n)
           for n in (32, 64, 128, 256)},
        "`sampled_weight_grad` with the cached layout (the library now)":
            lambda: sampled_weight_grad(g, x, idx, torch.Size((out, inp)), layout),
    }
    for name, fn in value_grads.items():
        error = (fn() - reference).abs().max().item()
        assert error < 1e-4 * reference.abs().max().item(), f"{name} disagrees with the dense reference: {error}"
    before = w.clone()
    with merged_in_place(w, idx, v.detach()) as in_place:
        assert torch.equal(in_place, merged_weight(before, idx, v.detach()))
    assert torch.equal(w, before)
    xs = x.view(4, tokens // 4, inp) if tokens % 4 == 0 else x
    gs = g.view(*xs.shape[:-1], out)
    ops = {
        "floor layer: forward GEMM + input-grad GEMM": layer_step(lambda a: F.linear(a, w), xs, gs),
        "merged copy W + scatter, x2 (forward and backward; before)":
            lambda: (merged_weight(w, idx, v.detach()), merged_weight(w, idx, v.detach())),
        "W merged in place and restored, x2 (the library now)":
            lambda: (merge_in_place_and_restore(w, idx, v.detach()), merge_in_place_and_restore(w, idx, v.detach())),
        **{f"value gradient: {name}": fn for name, fn in value_grads.items()},
        "sparse layer (the library now): forward + backward":
            layer_step(lambda a: functional.sparse_delta_linear(a, w, None, idx, v, layout=layout), xs, gs),
    }
    if compared is not None:
        ops["sparse layer (--compare-functional): forward + backward"] = layer_step(
            lambda a: compared.sparse_delta_linear(a, w, None, idx, v), xs, gs)
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="batch x sequence (SmolLM2 benchmark: 4 x 256)")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compare-functional", default=None,
                        help="another sparse/functional.py (e.g. from git show) to time end to end beside this one")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*(Sparse invariant checks|Sparse CSR tensor support).*")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compared = load_functional(args.compare_functional) if args.compare_functional else None
    totals: dict[str, float] = {}
    for out, inp in SMOLLM2_LAYER:
        for name, fn in operations(out, inp, args.tokens, args.density, compared).items():
            totals[name] = totals.get(name, 0.0) + SMOLLM2_LAYERS * cpu_time(fn, args.repeats)
    print(f"SmolLM2-135M target weights (7 per layer x {SMOLLM2_LAYERS} layers), {args.tokens} tokens, "
          f"density {args.density:.2%}, {args.threads} thread(s); CPU seconds per training step (median of "
          f"{args.repeats})\n")
    print("| piece, summed over the 210 target weights | CPU s/step |\n|---|---:|")
    for name, seconds in totals.items():
        print(f"| {name} | {seconds:.3f} |")
    floor = totals["floor layer: forward GEMM + input-grad GEMM"]
    for name in [n for n in totals if n.startswith("sparse layer")]:
        print(f"\n{name}: {totals[name] - floor:+.3f} s/step over the floor layer ({totals[name] / floor:.2f}x)")


if __name__ == "__main__":
    main()
