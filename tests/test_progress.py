"""What `sparse-lightning fit` prints: plain progress lines in a log file, a bar without `Epoch 0/-2` or `v_num` in a
terminal, no third-party tips; and the one adapter that reads what Lightning keeps private."""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from sparse_lightning import cli
from sparse_lightning.lightning_adapter import saves_on_its_own
from sparse_lightning.modules import SequenceClassificationModule, SparseFineTuningModule
from sparse_lightning.notices import silence_third_party_notices
from sparse_lightning.progress import ProgressLines, StepProgressBar, progress_for

ROOT = Path(__file__).resolve().parents[1]


def test_a_log_file_gets_a_line_every_n_steps_and_after_validation(contract: ModuleType,
                                                                    tiny_bert_cls_dir: Path) -> None:
    stream = io.StringIO()
    callback, optimizer = contract.build_method("sift")
    module = SequenceClassificationModule(str(tiny_bert_cls_dir), optimizer=optimizer)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=4, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback, ProgressLines(every=2, stream=stream)])
    trainer.fit(module, contract.make_datamodule(tiny_bert_cls_dir))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "training: step 0 of 4, a line every 2 steps"
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" ", 2)[1] for line in steps] == ["2/4", "4/4"]
    assert re.fullmatch(r"step 2/4 \(50%\) \| train/loss \d+\.\d{4} \| \d+\.\d\d steps/s \| \d+:\d\d elapsed, "
                        r"\d+:\d\d left", steps[0]), steps[0]
    assert re.fullmatch(r"validation at step 4: val/accuracy=\d\.\d{4}, val/loss=\d+\.\d{4}", lines[-1]), lines[-1]


def test_the_terminal_bar_drops_the_loggers_version() -> None:
    class Trainer:
        progress_bar_metrics = {"train/loss": 0.5}
        loggers = []

    assert StepProgressBar().get_metrics(Trainer(), None) == {"train/loss": 0.5}


def test_a_file_gets_lines_and_a_terminal_a_bar() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_for(io.StringIO()), ProgressLines)
    assert isinstance(progress_for(Terminal()), StepProgressBar)


def built(tmp_path: Path, monkeypatch, *extra: str) -> pl.Trainer:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sparse-lightning"])
    configs = ["model/minilm.yaml", "task/sst2.yaml", "method/minilm/sift.yaml"]
    args = [a for c in configs for a in ("--config", str(ROOT / "configs" / c))]
    return cli.SparseLightningCLI(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True,
                                  run=False, args=[*args, "--trainer.accelerator", "cpu", *extra]).trainer


def test_the_cli_replaces_lightnings_default_bar_but_not_a_configured_one(tmp_path: Path, monkeypatch) -> None:
    assert isinstance(built(tmp_path, monkeypatch).progress_bar_callback, ProgressLines)  # pytest's stdout: no TTY
    configured = built(tmp_path, monkeypatch, "--trainer.callbacks+=RichProgressBar").progress_bar_callback
    assert type(configured).__name__ == "RichProgressBar"
    assert built(tmp_path, monkeypatch, "--trainer.enable_progress_bar", "false").progress_bar_callback is None


def test_third_party_tips_and_notices_are_silenced_and_nothing_else(caplog) -> None:
    silence_third_party_notices()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        logger.info("[sift] trainable params: 1")
    assert [r.getMessage() for r in caplog.records] == ["[sift] trainable params: 1"]
    with warnings.catch_warnings(record=True) as caught:
        silence_third_party_notices()  # catch_warnings reset the filters
        warnings.warn("Starting from v1.9.0, `tensorboardX` has been removed as a dependency of the ...")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use ...", FutureWarning)
        warnings.warn("max_steps=2 ends before the first validation")
    assert [str(w.message) for w in caught] == ["max_steps=2 ends before the first validation"]


@pytest.mark.parametrize(("checkpoint", "saves"), [
    (ModelCheckpoint(), False), (ModelCheckpoint(every_n_epochs=2), False),
    (ModelCheckpoint(every_n_train_steps=3), True), (ModelCheckpoint(train_time_interval=timedelta(minutes=1)), True),
])
def test_a_checkpoint_callbacks_own_trigger_is_read_through_public_api(checkpoint, saves: bool) -> None:
    assert saves_on_its_own(checkpoint) == saves
