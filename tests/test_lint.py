"""Mistakes a merge or a rebase leaves behind that no other test sees: a function defined twice (the second silently
wins: a rebase once kept two `init_parser`s and lost the CLI's "did you mean"), imports and variables left unused.

ruff comes with the `dev` extra (the README's test command installs it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = "F811,F401,F841"  # redefined while unused, unused import, unused local variable
CHECKED = ["sparse_lightning", "datamodules", "benchmarks", "tests", "scripts"]


def ruff() -> str:
    found = Path(sys.executable).with_name("ruff")
    if found.exists():
        return str(found)
    return shutil.which("ruff") or pytest.skip("ruff is not installed (pip install -e '.[dev]')")


def test_no_duplicate_definitions_or_unused_names():
    done = subprocess.run([ruff(), "check", "--no-cache", "--select", RULES, "--output-format", "concise", *CHECKED],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
