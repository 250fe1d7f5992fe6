"""Where SIFT's extra step time goes, per SmolLM2 step: the GEMMs, the merged-weight copies, and the
gradient of the k values computed three ways.

`SparseDeltaLinearFunction.backward` forms the dense weight gradient `grad_out^T @ x` ([out, in], the
same GEMM full fine-tuning does) and gathers k entries from it. The k entries alone are a sampled
dense-dense product (SDDMM): value j needs only row `r_j` of grad_out^T and column `c_j` of x. This
times the dense GEMM + gather against two SDDMM forms, with LoRA's adapter backward and the
GEMMs every method runs beside them, each summed over SmolLM2's 210 target weights.

    python benchmarks/sift_backward_micro.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor


def dense_then_gather(g: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    """What the substrate does today."""
    return (g.t() @ x).view(-1)[idx]


def gathered_rows(g: Tensor, x: Tensor, idx: Tensor, chunk: int = 2048) -> Tensor:
    """SDDMM by gathering token-major rows: O(T * k) work, transient O(T * chunk)."""
    inp = x.shape[1]
    gt, xt = g.t().contiguous(), x.t().contiguous()
    rows, cols = idx // inp, idx % inp
    return torch.cat([(gt[rows[i:i + chunk]] * xt[cols[i:i + chunk]]).sum(1) for i in range(0, idx.numel(), chunk)])


def sampled_addmm(g: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    """torch.sparse.sampled_addmm on a CSR mask with the k positions."""
    out, inp = g.shape[1], x.shape[1]
    rows, cols = idx // inp, idx % inp
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    mask = torch.sparse_csr_tensor(crow, cols, torch.zeros(idx.numel()), (out, inp))
    return torch.sparse.sampled_addmm(mask, g.t(), x, beta=0.0).values()


def lora_backward_extra(g: Tensor, x: Tensor, rank: int) -> Tensor:
    """LoRA's adapter backward for comparison: grads of A [r, in] and B [out, r], and the input-grad term."""
    out, inp = g.shape[1], x.shape[1]
    a, b = torch.randn(rank, inp), torch.randn(out, rank)
    h = x @ a.t()  # recomputed here; PEFT keeps it from the forward
    grad_b = g.t() @ h
    grad_h = g @ b
    return grad_b.sum() + (grad_h.t() @ x).sum() + (grad_h @ a).sum()


def cpu_time(fn: Callable[[], Tensor], repeats: int) -> float:
    """Median process CPU time (steadier than wall time on a shared machine; equal to it with one thread)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


#: Target weights [out, in] of one decoder layer and the layer count (SmolLM2-135M: q, k, v, o, gate, up, down).
SMOLLM2_LAYER = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
SMOLLM2_LAYERS = 30


def operations(out: int, inp: int, tokens: int, density: float, rank: int) -> dict[str, Callable[[], Tensor]]:
    k = int(density * out * inp) + 1
    g, x, w = torch.randn(tokens, out), torch.randn(tokens, inp), torch.randn(out, inp)
    idx = torch.randperm(out * inp)[:k].sort().values
    reference = dense_then_gather(g, x, idx)
    for name, fn in (("gathered rows", gathered_rows), ("sampled_addmm", sampled_addmm)):
        error = (fn(g, x, idx) - reference).abs().max().item()
        assert error < 1e-3 * reference.abs().max().item(), f"{name} disagrees with the dense reference: {error}"
    return {
        "forward GEMM x @ W^T (every method)": lambda: x @ w.t(),
        "input-grad GEMM grad_out @ W (every method)": lambda: g @ w,
        "merged-weight copy W + scatter (SIFT: once in forward, once in backward)":
            lambda: w.clone().view(-1).index_add_(0, idx, torch.ones(k)),
        "dense weight-grad GEMM + gather (SIFT today)": lambda: dense_then_gather(g, x, idx),
        "SDDMM by gathered rows, chunked (proposed)": lambda: gathered_rows(g, x, idx),
        "SDDMM by torch.sparse.sampled_addmm (proposed)": lambda: sampled_addmm(g, x, idx),
        f"LoRA r={rank} adapter backward": lambda: lora_backward_extra(g, x, rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="batch x sequence (SmolLM2 benchmark: 4 x 256)")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--lora-rank", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*(Sparse invariant checks|Sparse CSR tensor support).*")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    totals: dict[str, float] = {}
    for out, inp in SMOLLM2_LAYER:
        for name, fn in operations(out, inp, args.tokens, args.density, args.lora_rank).items():
            totals[name] = totals.get(name, 0.0) + SMOLLM2_LAYERS * cpu_time(fn, args.repeats)
    print(f"SmolLM2-135M target weights (7 per layer x {SMOLLM2_LAYERS} layers), {args.tokens} tokens, "
          f"density {args.density:.2%}, {args.threads} thread(s); CPU seconds per training step\n")
    print("| operation, summed over the 210 target weights | s/step |\n|---|---:|")
    for name, seconds in totals.items():
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
