"""matplotlib on demand (the `plot` extra), drawing off-screen, and saving a figure where it was asked for."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any


class MissingMatplotlib(ImportError):
    """The `plot` extra is not installed."""


def pyplot(what: str) -> ModuleType:
    """`matplotlib.pyplot` with the Agg backend, or a one-line error naming the pip command."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingMatplotlib(f"plotting {what} needs matplotlib: pip install 'sparse-lightning[plot]'") from error
    return plt


def save(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write the figure as PNG at `path` (parents created) and release it from pyplot's registry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
