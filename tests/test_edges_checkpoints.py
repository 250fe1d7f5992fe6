"""Issue 11, items 1 and 3: checkpoints are read without running code, and non-finite deltas are never exported.

A genuine checkpoint loads with `torch.load(weights_only=True)`; a crafted one that needs code to load is refused with
one line (and its code never runs); the module class a checkpoint names is imported only from sparse_lightning unless
the user names a class; a run whose loss turns non-finite stops naming the step; export refuses NaN deltas.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.glue import GLUEDataModule
from sparse_lightning import cli
from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.export import DELTA_CONFIG, DELTA_WEIGHTS, CheckpointError, export_checkpoint
from sparse_lightning.modules import SequenceClassificationModule

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"


def datamodule(model_dir: Path) -> GLUEDataModule:
    return GLUEDataModule(task="sst2", tokenizer_name_or_path=str(model_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=16, max_length=32)


def fit_sift(model_dir: Path, root: Path, lr: float = 1e-2, max_steps: int = 2) -> Path:
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(model_dir), optimizer=lambda params: torch.optim.AdamW(params, lr=lr))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                         callbacks=[GradientTopKCallback(density=0.05, calibration_batches=1),
                                    ModelCheckpoint(dirpath=root, filename="last")],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, datamodule(model_dir))
    return root / "last.ckpt"


@pytest.fixture(scope="module")
def genuine(tiny_bert_dir: Path, tmp_path_factory) -> Path:
    return fit_sift(tiny_bert_dir, tmp_path_factory.mktemp("genuine"))


class WritesAMarker:
    """Unpickling this runs code: it writes a file (an attacker's payload would do worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the checkpoint ran code"))


def crafted_checkpoint(genuine: Path, tmp_path: Path) -> tuple[Path, Path]:
    checkpoint = torch.load(genuine, map_location="cpu", weights_only=True)
    marker = tmp_path / "pwned.txt"
    checkpoint["hyper_parameters"]["payload"] = WritesAMarker(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_a_genuine_checkpoint_loads_with_weights_only(genuine: Path) -> None:
    checkpoint = torch.load(genuine, map_location="cpu", weights_only=True)
    assert checkpoint["sparse_lightning"]["method"] == "sift"


def test_export_refuses_a_checkpoint_that_would_run_code(genuine: Path, tmp_path: Path) -> None:
    path, marker = crafted_checkpoint(genuine, tmp_path)
    with pytest.raises(CheckpointError, match=r"refused: loading it would run code \(it asks for ") as error:
        cli.main(["export", "--ckpt_path", str(path), "--output", str(tmp_path / "out")])
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_command_line_prints_one_line_and_exits_1(genuine: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    path, marker = crafted_checkpoint(genuine, tmp_path)
    monkeypatch.setattr(sys, "argv", ["sparse-lightning", "export", "--ckpt_path", str(path),
                                      "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparse-lightning: error: ") and "refused: loading it would run code" in err
    assert len(err.splitlines()) == 1 and not marker.exists()


def test_validate_refuses_a_checkpoint_that_would_run_code(genuine: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    path, marker = crafted_checkpoint(genuine, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
        "model": {"class_path": "sparse_lightning.modules.SequenceClassificationModule",
                  "init_args": {"model_name_or_path": str(tiny_bert_dir)}},
        "data": {"class_path": "datamodules.glue.GLUEDataModule",
                 "init_args": {"task": "sst2", "train_file": str(DATA / "train.tsv"),
                               "validation_files": [str(DATA / "dev.tsv")]}},
    }))
    with pytest.raises(CheckpointError, match="refused: loading it would run code"):
        cli.main(["validate", "--config", str(config), "--ckpt_path", str(path)])
    assert not marker.exists()


def foreign_module(tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    """A module on sys.path whose import has a side effect: importing it is running its code."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "foreign_module_11.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from sparse_lightning.modules import SequenceClassificationModule as Module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "foreign_module_11.Module", marker


def test_a_module_class_outside_the_package_is_not_imported(genuine: Path, tmp_path: Path, monkeypatch) -> None:
    name, marker = foreign_module(tmp_path, monkeypatch)
    checkpoint = torch.load(genuine, map_location="cpu", weights_only=True)
    checkpoint["sparse_lightning"]["module_class"] = name
    path = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=rf"outside sparse_lightning.*--module_class {name}"):
        export_checkpoint(path, tmp_path / "out")
    assert not marker.exists() and "foreign_module_11" not in sys.modules

    # the user names a class explicitly: that one is used
    written = export_checkpoint(path, tmp_path / "out", module_class="sparse_lightning.modules.SequenceClassificationModule")
    assert (written["delta"] / DELTA_WEIGHTS).is_file() and not marker.exists()


def test_validate_does_not_import_the_class_a_checkpoint_names(genuine: Path, tiny_bert_dir: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    name, marker = foreign_module(tmp_path, monkeypatch)
    checkpoint = torch.load(genuine, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = name
    path = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="outside sparse_lightning"):
        cli.main(["validate", "--model", "sparse_lightning.modules.SequenceClassificationModule",
                  "--model.model_name_or_path", str(tiny_bert_dir), "--data", "datamodules.glue.GLUEDataModule",
                  "--data.train_file", str(DATA / "train.tsv"), "--data.validation_files", f"[{DATA / 'dev.tsv'}]",
                  "--trainer.logger", "false", "--ckpt_path", str(path)])
    assert not marker.exists() and "foreign_module_11" not in sys.modules


def test_unreadable_and_missing_checkpoints_get_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a .*PyTorch checkpoint") as error:
        export_checkpoint(garbage, tmp_path / "out")
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out")


# ------------------------------------------------------------------------------------------------ item 3: NaN


def test_a_non_finite_loss_stops_training_naming_the_step(tiny_bert_dir: Path, tmp_path: Path, monkeypatch) -> None:
    real_loss = SequenceClassificationModule.compute_loss
    calls = {"n": 0}

    def diverges_at_the_third_step(self, batch):
        loss = real_loss(self, batch)
        calls["n"] += 1
        return loss * float("nan") if self.trainer.global_step == 2 and self.training else loss

    monkeypatch.setattr(SequenceClassificationModule, "compute_loss", diverges_at_the_third_step)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 2 .*lower the learning rate"):
        fit_sift(tiny_bert_dir, tmp_path, max_steps=4)
    assert calls["n"] >= 3


def test_export_refuses_non_finite_deltas(genuine: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(genuine, map_location="cpu", weights_only=True)
    name = next(key for key in checkpoint["state_dict"] if key.endswith("delta_values"))
    checkpoint["state_dict"][name][3] = float("inf")
    path = tmp_path / "diverged.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=rf"refusing to export: {name} holds 1 non-finite value.*learning rate"):
        export_checkpoint(path, tmp_path / "out", merged=True)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ item 14: file modes


def test_exported_files_are_readable_by_everyone(genuine: Path, tmp_path: Path) -> None:
    written = export_checkpoint(genuine, tmp_path / "out", merged=True)
    umask = os.umask(0)
    os.umask(umask)
    files = [written["delta"] / DELTA_WEIGHTS, written["delta"] / DELTA_CONFIG, written["merged"] / "model.safetensors",
             written["merged"] / "config.json"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
