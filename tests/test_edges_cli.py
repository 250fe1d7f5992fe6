"""Issue 26 on the command line: runs sharing a folder get their own (case 5); errors keep the library's context
(13-16): one line naming the file and line, the key and its closest match, the task file that does not parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sparse_lightning import cli

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"


def write_config(tmp_path: Path, model_dir: Path, **trainer) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "limit_val_batches": 1, "val_check_interval": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, **trainer},
        "model": {"class_path": "sparse_lightning.modules.SequenceClassificationModule",
                  "init_args": {"model_name_or_path": str(model_dir)}},
        "data": {"class_path": "datamodules.glue.GLUEDataModule",
                 "init_args": {"task": "sst2", "train_file": str(DATA / "train.tsv"),
                               "validation_files": [str(DATA / "dev.tsv")], "batch_size": 8, "max_length": 32}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- case 5


@pytest.mark.parametrize("logger", [None, {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                           "init_args": {"save_dir": "SHARED", "name": "runs"}}])
def test_two_runs_started_together_in_one_folder_get_their_own_run_folders(tiny_bert_dir, tmp_path, monkeypatch,
                                                                            logger):
    """Run B starts after run A picked its run folder and before A wrote to it (the race of two runs started at
    once): each must end with its own config.yaml, checkpoint and metrics."""
    shared = tmp_path / "shared"
    trainer = {"default_root_dir": str(shared)}
    if logger is not None:
        trainer["logger"] = {**logger, "init_args": {**logger["init_args"], "save_dir": str(shared)}}
    config = write_config(tmp_path, tiny_bert_dir, **trainer)
    original = cli.SparseLightningCLI.before_fit
    started = []

    def before_fit(self) -> None:
        original(self)
        _ = self.trainer.logger.version  # run A has chosen its folder (Lightning: by listing the existing ones)
        if not started:
            started.append(True)
            cli.main(["fit", "--config", str(config)])  # run B, start to end

    monkeypatch.setattr(cli.SparseLightningCLI, "before_fit", before_fit)
    cli.main(["fit", "--config", str(config)])
    runs = sorted(path.parent for path in shared.rglob("config.yaml"))
    assert [run.name for run in runs] == ["version_0", "version_1"]
    for run in runs:
        assert len(list((run / "checkpoints").glob("*.ckpt"))) == 1
        assert (run / "metrics.csv").read_text().count("epoch") == 1  # one header: not two runs interleaved
