"""Under FSDP2 Lightning loads a checkpoint itself, so the module checks what it holds before Lightning reads a tensor.

`ModelParallelStrategy.load_checkpoint` reads a distributed checkpoint directory (its default) or one gathered file
straight into the sharded model, and `on_load_checkpoint` then gets no "state_dict": the module's strict
`load_state_dict` (modules/base.py) never sees the tensors. And the strategy must load non-strictly (a delta
checkpoint leaves the rebuilt base out), which would let a checkpoint missing a trained tensor through, that tensor
keeping its fresh value. So `check_before_loading` puts a check in front of the strategy's `load_checkpoint`: it reads
only the names of the saved tensors (the directory's DCP metadata, or the file memory-mapped: no tensor data) and the
module refuses a missing or unknown one in one line, on every rank, before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import Strategy

from sparse_lightning.borders.checkpoint_file import read_checkpoint, read_distributed_metadata

#: Prefix of the model's tensors among a distributed checkpoint's keys (Lightning saves {"state_dict": ...,
#: "optimizer_0": ...}, which DCP flattens).
MODEL_PREFIX = "state_dict."


def saved_tensor_names(path: Path) -> set[str] | None:
    """The state-dict keys a checkpoint Lightning's FSDP2 loader accepts holds: a distributed checkpoint directory's
    (from its metadata) or one file's (its pickle read memory-mapped). None for a path that is neither (Lightning
    then says so itself)."""
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return None
        keys = read_distributed_metadata(path).state_dict_metadata  # refuses what would run code when DCP loads it
        return {key[len(MODEL_PREFIX):] for key in keys if key.startswith(MODEL_PREFIX)}
    if path.is_file():
        state = read_checkpoint(path, mmap=True).get("state_dict")
        return set(state) if isinstance(state, dict) else set()
    return None


def check_before_loading(strategy: Strategy, check: Callable[[Path], None]) -> None:
    """Make `strategy.load_checkpoint` call `check(path)` first, on every rank; if it raises on any rank, every rank
    raises before loading (one rank's error, and "on another rank" on the others), so none waits in the loader's
    collectives. The last module to call this owns the check (a strategy reused by another module)."""
    first = not hasattr(strategy, "_check_before_loading")
    strategy._check_before_loading = check
    if not first:
        return
    load = strategy.load_checkpoint

    def checked_load(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        path = Path(strategy.broadcast(checkpoint_path))  # every rank checks what rank 0 will load, as Lightning does
        error: Exception | None = None
        try:
            strategy._check_before_loading(path)
        except Exception as caught:  # re-raised below, once every rank has decided
            error = caught
        if not strategy.reduce_boolean_decision(error is None, all=True):
            if error is not None:
                raise error
            raise RuntimeError(f"{path}: refused on another rank (its error says why)")
        return load(checkpoint_path, *args, **kwargs)

    strategy.load_checkpoint = checked_load
