"""The CoLA diagnosis figures of issue 28 (benchmarks/results/quality/README.md), from the quality runs' files.

- `cola_variants.png`: dev loss and Matthews at each validation, one colour per variant (method + override
  set), a thin line per seed and a thick one for the mean; the dev set's prior entropy as a reference.
- `cola_norms.png` (runs made with `quality.py --diagnose`): per module type, the gradient norm and the update
  norm per step over training, from `diagnostics.csv`.

    .venv/bin/python benchmarks/quality_diagnosis_plots.py
"""

from __future__ import annotations

import csv
import glob
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = Path(__file__).resolve().parent / "results" / "quality" / "runs"
OUT = Path(__file__).resolve().parent / "results" / "quality" / "diagnosis"
COLA_POSITIVE = 721 / 1043  # share of acceptable sentences in CoLA dev
PRIOR_ENTROPY = -(COLA_POSITIVE * math.log(COLA_POSITIVE) + (1 - COLA_POSITIVE) * math.log(1 - COLA_POSITIVE))

# label -> run-name pattern (the seed is the last part)
VARIANTS = {
    "LoRA r=5 (chosen)": "cola-lora-lr0.001-chosen-s*",
    "full FT (chosen)": "cola-full-lr0.0001-chosen-s*",
    "SIFT (issue 14 default)": "cola-sift-lr0.002-chosen-s*",
    "SpIEL-AG (issue 14 default)": "cola-spiel_ag-lr0.002-chosen-s*",
    "S2FT (issue 14 default)": "cola-s2ft-lr0.005-chosen-s*",
    "SIFT (issue 14 default) 600 steps": "cola-sift-lr0.002-steps600-chosen-s*",
    "LoRA r=5 600 steps": "cola-lora-lr0.001-steps600-chosen-s*",
    "SIFT head_lr 2e-4": "cola-sift-lr0.002-headlr2e-4-s*",
    "SIFT at LoRA's count": "cola-sift-lr0.002-lcount-s*",
    "SIFT default since issue 28 (LoRA's count, lr 1e-3), 600 steps": "cola-sift-lr0.001-steps600-lcount-s*",
    "SpIEL-AG default since issue 28, 600 steps": "cola-spiel_ag-lr0.001-steps600-lcount-s*",
}


def validations(run: Path) -> list[tuple[int, float, float]]:
    """(step, dev loss, Matthews) at each validation; steps as optimizer steps taken (Lightning logs step - 1)."""
    with (run / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/matthews")]
    return [(int(r["step"]) + 1, float(r["val/loss"]), float(r["val/matthews"])) for r in rows]


def plot_variants() -> Path:
    fig, (loss_ax, mcc_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]  # one per variant (up to 20)
    for colour, (label, pattern) in zip(colours, VARIANTS.items()):
        runs = [Path(p) for p in sorted(glob.glob(str(RUNS / pattern))) if (Path(p) / "result.json").exists()]
        if not runs:
            continue
        curves = [validations(r) for r in runs]
        for curve in curves:
            steps = [c[0] for c in curve]
            loss_ax.plot(steps, [c[1] for c in curve], color=colour, lw=0.6, alpha=0.5)
            mcc_ax.plot(steps, [c[2] for c in curve], color=colour, lw=0.6, alpha=0.5)
        length = min(len(c) for c in curves)
        steps = [curves[0][i][0] for i in range(length)]
        for ax, index in ((loss_ax, 1), (mcc_ax, 2)):
            ax.plot(steps, [statistics.fmean(c[i][index] for c in curves) for i in range(length)], color=colour,
                    lw=2.2, marker="o", label=f"{label} ({len(runs)} seeds)")
    loss_ax.axhline(PRIOR_ENTROPY, color="grey", ls="--", lw=1, label="predict the class prior")
    loss_ax.set(title="CoLA dev loss (lower is better)", xlabel="optimizer step (batch 32)", ylabel="cross-entropy")
    mcc_ax.set(title="CoLA dev Matthews correlation", xlabel="optimizer step (batch 32)")
    mcc_ax.axhline(0.0256, color="grey", ls=":", lw=1, label="the majority class (0.026)")
    for ax in (loss_ax, mcc_ax):
        ax.grid(alpha=0.3)
    mcc_ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("all-MiniLM-L6-v2 on CoLA: thin lines are seeds, thick the mean")
    fig.tight_layout()
    path = OUT / "cola_variants.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_diagnostics(run: Path) -> dict[str, list[tuple[int, float, float, float, int]]]:
    """group -> [(step, grad norm, update norm, value norm, numel)], the last row per step (a resumed run repeats)."""
    by_step: dict[tuple[str, int], tuple[float, float, float, int]] = {}
    with (run / "diagnostics.csv").open() as handle:
        for r in csv.DictReader(handle):
            by_step[(r["group"], int(r["step"]))] = (float(r["grad_norm"]), float(r["update_norm"]),
                                                     float(r["value_norm"]), int(r["numel"]))
    out: dict[str, list] = {}
    for (group, step), values in sorted(by_step.items(), key=lambda item: item[0][1]):
        out.setdefault(group, []).append((step, *values))
    return out


def plot_norms(runs: dict[str, Path]) -> Path | None:
    runs = {label: run for label, run in runs.items() if (run / "diagnostics.csv").exists()}
    if not runs:
        return None
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 8), squeeze=False)
    for column, (label, run) in enumerate(runs.items()):
        groups = read_diagnostics(run)
        for name, rows in sorted(groups.items()):
            if not name.startswith("type:"):
                continue
            steps = [r[0] for r in rows]
            # per entry: a sparse delta's update norm / sqrt(k) is the typical step of one trained entry
            axes[0][column].plot(steps, [r[1] for r in rows], label=name[5:])
            axes[1][column].plot(steps, [r[2] / math.sqrt(r[4]) for r in rows], label=name[5:])
        axes[0][column].set(title=f"{label}: gradient norm per module type", yscale="log", xlabel="optimizer step")
        axes[1][column].set(title=f"{label}: RMS update of one trained entry", yscale="log", xlabel="optimizer step")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = OUT / "cola_norms.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"wrote {plot_variants()}")
    norms = plot_norms({"SIFT head_lr 2e-4, seed 44": RUNS / "cola-sift-lr0.002-headlr2e-4-s44",
                        "SIFT at LoRA's count, seed 44": RUNS / "cola-sift-lr0.002-lcount-s44"})
    if norms:
        print(f"wrote {norms}")


if __name__ == "__main__":
    main()
