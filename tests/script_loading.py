"""Load a script that is not a package module (benchmarks/*.py, tests/distributed_scripts/*.py) by its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, register: bool = False) -> ModuleType:
    """The script at `path` as a module named by its stem; `register` puts it in `sys.modules` (a script whose
    dataclasses resolve their annotations through it; the caller removes it)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
