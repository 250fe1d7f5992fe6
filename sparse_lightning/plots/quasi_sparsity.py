"""SIFT's motivating picture (Song et al., 2024, Fig. 1): the gradient of a pre-trained model on a task is
quasi-sparse, a small share of the entries holds most of its mass. Measured here with the library's own
calibration path: each target weight is wrapped in a `SparseDeltaLinear` whose `weight_grad_observer` sums the
dense weight gradient over the calibration batches (what `select_by_gradient` ranks), in eval mode, updating
nothing and leaving no `.grad` behind."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparse_lightning.methods.calibration import Batch, LossFn
from sparse_lightning.methods.sift import summed_weight_gradients
from sparse_lightning.plots.pyplot import pyplot, save
from sparse_lightning.sparse import SparseDeltaLinear, attach_sparse_deltas, find_linear_targets
from sparse_lightning.sparse.submodules import replace_submodule

#: Every Linear inside a numbered transformer block (attention and MLP projections alike; heads excluded).
BLOCK_LINEARS = r".*\.\d+\..*"
#: 0.1% .. 100% of the entries, 31 points evenly spaced on a log axis.
DEFAULT_FRACTIONS = tuple(10.0 ** (-3 + 3 * i / 30) for i in range(31))
#: Where the printed table quotes the share.
QUOTED_FRACTIONS = (0.001, 0.01, 0.05, 0.1)


def weight_type(name: str) -> str:
    """The layer-independent part of a module name: `bert.encoder.layer.3.attention.self.query` ->
    `attention.self.query`, `model.layers.0.mlp.down_proj` -> `mlp.down_proj`."""
    return re.split(r"(?:^|\.)\d+\.", name)[-1]


def gradient_magnitudes(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn,
                        target_modules: Sequence[str] | None = None) -> dict[str, Tensor]:
    """|sum of the loss gradient over `batches`| of every target weight (default: every Linear in the
    transformer blocks), as SIFT scores it. The model comes back as it was: wrappers removed, flags restored."""
    targets = find_linear_targets(model, list(target_modules or [BLOCK_LINEARS]))
    added = [name for name in targets if not isinstance(model.get_submodule(name), SparseDeltaLinear)]
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)  # only the observed layers' (unused) values need a gradient
    layers = attach_sparse_deltas(model, {name: 1 for name in targets})
    try:
        for layer in layers.values():
            layer.delta_values.requires_grad_(True)
        scores = summed_weight_gradients(model, layers, list(batches), loss_fn)
    finally:
        for name in added:
            replace_submodule(model, name, layers[name].base)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
    return {name: score.abs_() for name, score in scores.items()}


def mass_shares(magnitudes: Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Tensor:
    """Share of the total held by the largest ceil(f * n) entries, for each fraction f in (0, 1]."""
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1], got {list(fractions)}")
    flat = magnitudes.detach().flatten().double().abs().sort(descending=True).values
    cumulative = flat.cumsum(0)
    if cumulative.numel() == 0 or cumulative[-1] <= 0:
        raise ValueError("the gradient is zero everywhere: no mass to share (do the batches reach these weights?)")
    counts = torch.tensor([min(flat.numel(), max(1, math.ceil(f * flat.numel()))) for f in fractions])
    return cumulative[counts - 1] / cumulative[-1]


def quasi_sparsity(magnitudes: dict[str, Tensor],
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, Tensor]:
    """Per weight type (all layers' entries pooled), `mass_shares` at `fractions`; types in model order."""
    pooled: dict[str, list[Tensor]] = {}
    for name, values in magnitudes.items():
        pooled.setdefault(weight_type(name), []).append(values.flatten())
    return {kind: mass_shares(torch.cat(parts), fractions) for kind, parts in pooled.items()}


def share_table(magnitudes: dict[str, Tensor], fractions: Sequence[float] = QUOTED_FRACTIONS) -> str:
    """A markdown table: the share of gradient mass in the top x% of entries, one row per weight type."""
    shares = quasi_sparsity(magnitudes, fractions)
    header = "| weight type | entries | " + " | ".join(f"top {100 * f:g}%" for f in fractions) + " |"
    counts: dict[str, int] = {}
    for name, values in magnitudes.items():
        counts[weight_type(name)] = counts.get(weight_type(name), 0) + values.numel()
    rows = [f"| {kind} | {counts[kind]:,} | " + " | ".join(f"{float(s):.3f}" for s in values) + " |"
            for kind, values in shares.items()]
    return "\n".join([header, "|---|---:|" + "---:|" * len(fractions), *rows])


def plot_quasi_sparsity(shares: dict[str, Tensor], path: str | Path,
                        fractions: Sequence[float] = DEFAULT_FRACTIONS, title: str | None = None) -> Any:
    """One curve per weight type (share of gradient mass vs top x% of entries, log x axis) and the dashed
    uniform reference (share = x). Writes a PNG at `path` and returns the (closed) figure."""
    plt = pyplot("the gradient quasi-sparsity")
    percent = [100 * f for f in fractions]
    figure, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    for kind, values in shares.items():
        ax.plot(percent, values.tolist(), label=kind, linewidth=1.6)
    ax.plot(percent, list(fractions), linestyle="--", color="grey", linewidth=1, label="uniform (share = x)")
    ax.set_xscale("log")
    ax.set(xlabel="top x% of entries by |gradient| (log scale)", ylabel="share of total |gradient| mass",
           ylim=(0, 1.02), title=title or "Gradient quasi-sparsity per weight type")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    save(figure, path)
    return figure
