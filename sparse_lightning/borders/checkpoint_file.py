"""Reading a checkpoint file without running code: `torch.load(weights_only=True)`, one line for each way it fails.
Apart from `borders/checkpoint.py` (which rebuilds the module a checkpoint names), so the modules can read one too."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that is refused: unreadable, needing code to load, foreign, or holding non-finite deltas."""


def read_checkpoint(ckpt_path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents via `torch.load(weights_only=True)`: tensors and plain containers, never code.
    `mmap`: the tensors stay on disk until read (for a caller that needs only names)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointError(f"{path}: refused: loading it would run code (it asks for {found.group(1)}); "
                                  "sparse-lightning reads checkpoints with torch.load(weights_only=True) only") from None
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dictionary, got {type(checkpoint).__name__}")
    return checkpoint
