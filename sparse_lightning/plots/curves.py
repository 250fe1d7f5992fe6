"""Training and validation curves of several runs on one figure, read from their CSVLogger `metrics.csv` files
(train metrics per logged step, validation metrics per validation): the picture that says which method learns
faster and where each one ends."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_lightning.plots.pyplot import pyplot, save

#: Column prefixes drawn, in panel order; other columns (epoch, learning rates) are not curves of a run.
PREFIXES = ("train/", "val/")


@dataclass
class RunLog:
    """One run's logged metrics: per column, the (step, value) points where it was logged."""

    label: str
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def find_metrics_csv(path: str | Path) -> Path:
    """`path` itself, `path/metrics.csv`, or the one metrics.csv below `path` (a logger's version folder)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory or metrics.csv")
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    found = sorted(path.rglob("metrics.csv"))
    if len(found) != 1:
        what = "no metrics.csv" if not found else f"{len(found)} metrics.csv files ({', '.join(map(str, found[:3]))})"
        raise FileNotFoundError(f"{path} holds {what}: pass the metrics.csv of the run (a CSVLogger writes one)")
    return found[0]


def read_metrics(path: str | Path, label: str | None = None) -> RunLog:
    """A run's train/* and val/* columns from its metrics.csv; `label` defaults to the run directory's name."""
    csv_path = find_metrics_csv(path)
    run = RunLog(label or (Path(path).name if Path(path).is_dir() else csv_path.parent.name))
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for column, value in row.items():
                if column and column.startswith(PREFIXES) and value not in (None, ""):
                    run.metrics.setdefault(column, []).append((int(float(step)), float(value)))
    if not run.metrics:
        raise ValueError(f"{csv_path} logs no train/ or val/ metric with a step: is it a CSVLogger metrics.csv?")
    return run


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` logged points (1 = the raw values)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(runs: list[RunLog], path: str | Path, smooth: int = 1, title: str | None = None) -> Any:
    """One panel per metric (train/* first, then val/*), one line per run; train curves are averaged over the
    last `smooth` logged points. Writes a PNG at `path` and returns the (closed) matplotlib figure."""
    if not runs:
        raise ValueError("plot_curves needs at least one run")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (logged points averaged), got {smooth}")
    plt = pyplot("training curves")
    columns = sorted({c for run in runs for c in run.metrics}, key=lambda c: (PREFIXES.index(c.split("/")[0] + "/"), c))
    ncols = min(2, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.6 * nrows), constrained_layout=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, column in zip(axes.flat, columns):
        for i, run in enumerate(runs):
            points = run.metrics.get(column)
            if not points:
                continue
            steps, values = zip(*points)
            training = column.startswith("train/")
            ax.plot(steps, running_mean(list(values), smooth) if training else values, label=run.label,
                    color=colors[i % len(colors)], marker=None if training else "o", markersize=4,
                    linewidth=1.2 if training else 1.6)
        smoothed = f" (mean of {smooth} logged points)" if column.startswith("train/") and smooth > 1 else ""
        ax.set(title=column + smoothed, xlabel="optimizer step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    save(figure, path)
    return figure
