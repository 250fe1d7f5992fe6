"""Run folders claimed atomically: two runs started at once with the same `default_root_dir` get different ones.

Lightning's CSV and TensorBoard loggers pick `version_N` by listing the folder and create it later, so two runs
started together both take `version_0` (one's checkpoint and config.yaml overwritten, metrics interleaved). Here the
folder is claimed with `mkdir`, which exactly one process wins, and the logger is rebuilt with that version.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

_VERSION = re.compile(r"version_(\d+)")


def claim_version(root: str | Path) -> int:
    """The lowest free `version_N` above the existing ones under `root`, created here (so no other process gets it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(found.group(1)) for entry in root.iterdir() if (found := _VERSION.fullmatch(entry.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def claim_run_folders(trainer: Trainer, logger_config: Any) -> None:
    """Give every CSV / TensorBoard logger of `trainer` whose version the config leaves open a claimed folder.
    `logger_config` is the parsed `trainer.logger` (None or True for Lightning's default logger, a class spec, or a
    list of them). Only global rank 0 claims (other ranks never write the run folder)."""
    if rank_zero_only.rank != 0 or not trainer.loggers:
        return
    specs = logger_config if isinstance(logger_config, list) else [logger_config]
    if logger_config in (None, True):
        specs = [None] * len(trainer.loggers)
    if len(specs) != len(trainer.loggers):
        return
    trainer.loggers = [_claimed(logger, spec) for logger, spec in zip(trainer.loggers, specs)]


def _claimed(logger: Logger, spec: Any) -> Logger:
    if type(logger) not in (CSVLogger, TensorBoardLogger):
        return logger
    init_args = _init_args(spec)
    if init_args is None or init_args.get("version") is not None:
        return logger
    version = claim_version(logger.root_dir)
    return type(logger)(**{"save_dir": logger.save_dir, "name": logger.name, **init_args, "version": version})


def _init_args(spec: Any) -> dict[str, Any] | None:
    """The logger's init arguments from its config (None: not known, leave the logger alone)."""
    if spec is None:  # Lightning's default logger: save_dir and name are all it is given
        return {}
    init_args = spec.get("init_args") if hasattr(spec, "get") else None
    if init_args is None:
        return None
    return dict(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args)
