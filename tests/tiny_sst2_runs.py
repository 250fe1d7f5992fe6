"""A `sparse-lightning fit` config on the tiny SST-2 files, and the one-line error the command line prints: what the
command-line tests share (each passes only what its cases change)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparse_lightning import cli

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"


def tiny_sst2_config(tmp_path: Path, model_dir: Path, trainer: dict[str, Any], model: dict[str, Any] | None = None,
                     data: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
    """Write a one-device CPU fit of `model_dir` on the tiny SST-2 files; `trainer`, `model` and `data` add to (or
    replace) the trainer's, the module's and the datamodule's arguments."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    **trainer},
        "model": {"class_path": "sparse_lightning.modules.SequenceClassificationModule",
                  "init_args": {"model_name_or_path": str(model_dir), **(model or {})}},
        "data": {"class_path": "datamodules.glue.GLUEDataModule",
                 "init_args": {"task": "sst2", "train_file": str(DATA / "train.tsv"),
                               "validation_files": [str(DATA / "dev.tsv")], "batch_size": 8, "max_length": 32,
                               **(data or {})}},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def command_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """`sparse-lightning ARGS` as typed (no traceback switch): its exit status and what it wrote on stderr."""
    monkeypatch.setattr(sys, "argv", ["sparse-lightning", *args])
    monkeypatch.delenv("SPARSE_LIGHTNING_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err
