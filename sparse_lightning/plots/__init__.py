"""Figures a user looks at: training/validation curves of several runs, SIFT's gradient quasi-sparsity, and
S2FT's selection map (`sparse-lightning plot ...`). Needs the `plot` extra (matplotlib), imported only here."""

from sparse_lightning.plots.curves import RunLog, plot_curves, read_metrics
from sparse_lightning.plots.quasi_sparsity import (
    gradient_magnitudes,
    mass_shares,
    plot_quasi_sparsity,
    quasi_sparsity,
    weight_type,
)
from sparse_lightning.plots.selection_map import plot_selection_map, selection_from_file, selection_matrices

__all__ = [
    "RunLog",
    "gradient_magnitudes",
    "mass_shares",
    "plot_curves",
    "plot_quasi_sparsity",
    "plot_selection_map",
    "quasi_sparsity",
    "read_metrics",
    "selection_from_file",
    "selection_matrices",
    "weight_type",
]
