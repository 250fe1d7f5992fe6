"""A picture of how SpIEL's index set moved: fraction replaced per reselection, overlap with the first
data-driven set, and entries replaced per layer (needs the `plot` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_index_history(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the three panels as one PNG at `path` and return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting the index history needs matplotlib: pip install 'sparse-lightning[plot]'") from error
    steps = [record["step"] for record in history]
    layers = sorted(history[0]["k"])
    total_k = sum(history[0]["k"].values())
    replaced = [sum(record["replaced"].values()) / total_k for record in history]
    overlap = [sum(record["overlap_with_first"][n] * record["k"][n] for n in layers) / total_k for record in history]
    per_layer = [sum(record["replaced"][n] for record in history[1:]) for n in layers]

    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 10), constrained_layout=True)
    later = slice(1, None) if len(history) > 1 else slice(None)  # the first replaces everything by design
    top.plot(steps[later], replaced[later], marker="o")
    top.set(title="Fraction of entries replaced per reselection (after the first)", xlabel="optimizer step",
            ylabel="fraction")
    middle.plot(steps, overlap, marker="o", color="tab:green")
    middle.set(title="Overlap with the first data-driven index set", xlabel="optimizer step", ylabel="fraction",
               ylim=(0, 1.05))
    bottom.bar(range(len(layers)), per_layer)
    bottom.set(title="Entries replaced per weight after the first reselection", ylabel="entries")
    bottom.set_xticks(range(len(layers)), [n.replace("model.", "") for n in layers], rotation=90, fontsize=6)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
