"""What SIFT's selection looks like across seeds (issue 28): overlap of the index sets and where the budget goes.

For each run config given (the quality benchmark's `quality_config.yaml`, one per seed: the seed changes the
calibration batches), the script scores every target weight as SIFT does (`gradient_magnitudes`: |gradient| summed
over the run's calibration batches, the same first training batches `fit` draws), then reports:

- per-weight top-k (the paper's budget: `int(density * numel) + 1` per weight): the overlap of the chosen index
  sets between seeds (|A & B| / k, mean over weights, by module type; chance is k / numel);
- a global top-k of the same total over all targets: the share of the budget each module type and layer would get
  (the per-weight rule gives each its share of the entries), and its overlap between seeds;
- the share of the |gradient| mass each module type holds.

No training: model load and the calibration passes only. Prints a markdown report (and `--json` writes numbers).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/quality_selection.py \
        benchmarks/results/quality/runs/cola-sift-lr0.002-chosen-s4{2,3,4}/quality_config.yaml --density 0.005 0.02
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
import yaml

from sparse_lightning.cli import SparseLightningCLI
from sparse_lightning.plots.from_config import build_from_config, training_calibration
from sparse_lightning.plots.quasi_sparsity import gradient_magnitudes

from quality_diagnostics import groups_of


def scores_for(config: Path) -> tuple[dict[str, torch.Tensor], int]:
    """|summed calibration gradient| per target weight for one run config, and its seed."""
    text = yaml.safe_load(config.read_text())
    callback = text["trainer"]["callbacks"][0]["init_args"]
    module, datamodule, _ = build_from_config(["--config", str(config)], SparseLightningCLI)
    calibration = training_calibration(module, datamodule)
    magnitudes = gradient_magnitudes(module.model, calibration.batches(callback.get("calibration_batches", 1)),
                                     calibration.loss_fn, callback["target_modules"])
    return magnitudes, text["seed_everything"]


def per_weight(scores: dict[str, torch.Tensor], density: float) -> dict[str, set[int]]:
    return {name: set(torch.topk(s.view(-1), int(density * s.numel()) + 1).indices.tolist())
            for name, s in scores.items()}


def global_topk(scores: dict[str, torch.Tensor], density: float) -> dict[str, set[int]]:
    budget = sum(int(density * s.numel()) + 1 for s in scores.values())
    flat = torch.cat([s.view(-1) for s in scores.values()])
    threshold = torch.topk(flat, budget).values.min()
    return {name: set(torch.nonzero(s.view(-1) >= threshold).view(-1).tolist()) for name, s in scores.items()}


def by_group(values: dict[str, float], kind: str) -> dict[str, float]:
    """Sum `values` (per weight name) into module types ("type") or layers ("layer")."""
    out: dict[str, float] = {}
    for name, value in values.items():
        for group in groups_of(name):
            if group.startswith(kind + ":"):
                out[group.split(":")[1]] = out.get(group.split(":")[1], 0.0) + value
    return out


def pooled_overlap(sets: list[dict[str, set[int]]], names: list[str]) -> float:
    """Mean over seed pairs of |A & B| / mean(|A|, |B|) over the entries of `names` taken together: the global top-k
    gives some weights no entry, and an empty weight has no overlap of its own to average."""
    pairs = []
    for a, b in itertools.combinations(sets, 2):
        size = sum(len(a[n]) + len(b[n]) for n in names) / 2
        pairs.append(sum(len(a[n] & b[n]) for n in names) / size if size else float("nan"))
    return statistics.fmean(pairs)


def overlap(sets: list[dict[str, set[int]]]) -> dict[str, float]:
    """`pooled_overlap` of each weight on its own (the per-weight rule gives every weight at least one entry)."""
    return {name: pooled_overlap(sets, [name]) for name in sets[0]}


def report(all_scores: list[dict[str, torch.Tensor]], seeds: list[int], density: float) -> tuple[str, dict]:
    names = list(all_scores[0])
    numel = {n: all_scores[0][n].numel() for n in names}
    k = {n: int(density * numel[n]) + 1 for n in names}
    own = [per_weight(s, density) for s in all_scores]
    glob = [global_topk(s, density) for s in all_scores]
    own_overlap = overlap(own)
    total_k = sum(k.values())
    share_uniform = by_group({n: k[n] / total_k for n in names}, "type")
    share_global = by_group({n: statistics.fmean(len(g[n]) for g in glob) / total_k for n in names}, "type")
    mass = by_group({n: statistics.fmean(float(s[n].sum()) / sum(float(t.sum()) for t in s.values())
                                         for s in all_scores) for n in names}, "type")
    count = by_group({n: 1.0 for n in names}, "type")
    chance = by_group({n: k[n] / numel[n] for n in names}, "type")
    own_t = by_group(own_overlap, "type")
    of_type = {t: [n for n in names if f"type:{t}" in groups_of(n)] for t in count}
    glob_t = {t: pooled_overlap(glob, of_type[t]) for t in count}
    lines = [f"density {density} ({total_k:,} entries), seeds {', '.join(map(str, seeds))}", "",
             "| module type | budget share, per weight | budget share, global top-k | gradient mass share | "
             "overlap between seeds, per weight | overlap, global top-k | chance overlap |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for t in share_uniform:
        lines.append(f"| {t} | {share_uniform[t]:.3f} | {share_global.get(t, 0):.3f} | {mass[t]:.3f} | "
                     f"{own_t[t] / count[t]:.3f} | {glob_t[t]:.3f} | {chance[t] / count[t]:.4f} |")
    layers_uniform = by_group({n: k[n] / total_k for n in names}, "layer")
    layers_global = by_group({n: statistics.fmean(len(g[n]) for g in glob) / total_k for n in names}, "layer")
    layer_mass = by_group({n: statistics.fmean(float(s[n].sum()) / sum(float(t.sum()) for t in s.values())
                                               for s in all_scores) for n in names}, "layer")
    layer_overlap = by_group(own_overlap, "layer")
    layer_count = by_group({n: 1.0 for n in names}, "layer")
    lines += ["", "| encoder layer | budget share, per weight | budget share, global top-k | gradient mass share | "
              "overlap between seeds, per weight |", "|---|---:|---:|---:|---:|"]
    for layer in sorted(layers_uniform, key=int):
        lines.append(f"| {layer} | {layers_uniform[layer]:.3f} | {layers_global[layer]:.3f} | "
                     f"{layer_mass[layer]:.3f} | {layer_overlap[layer] / layer_count[layer]:.3f} |")
    mean_own = statistics.fmean(own_overlap.values())
    mean_glob = pooled_overlap(glob, names)
    lines += ["", f"mean overlap between seeds: per weight {mean_own:.3f}, global top-k {mean_glob:.3f} "
              f"(chance {statistics.fmean(k[n] / numel[n] for n in names):.4f})"]
    numbers = {"density": density, "seeds": seeds, "share_per_weight": share_uniform, "share_global": share_global,
               "mass_share": mass, "overlap_per_weight": mean_own, "overlap_global": mean_glob,
               "layer_share_global": layers_global, "layer_mass": layer_mass}
    return "\n".join(lines), numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="quality_config.yaml of runs that differ in seed")
    parser.add_argument("--density", type=float, nargs="+", default=[0.005])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    computed = [scores_for(c) for c in args.configs]
    all_scores, seeds = [c[0] for c in computed], [c[1] for c in computed]
    numbers = []
    for density in args.density:
        text, values = report(all_scores, seeds, density)
        print(text + "\n")
        numbers.append(values)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
