"""Invariant 7 for SpIEL: a checkpoint taken inside a statistics window (indices, values, optimizer state and
the window's statistics) resumes into exactly the run that was never interrupted, across the next reselection."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sparse_lightning.callbacks import PruneRegrowCallback
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.sparse.optim import SM3
from tests.test_resume import make_datamodule

STEPS_PER_EPOCH, EPOCHS = 4, 2  # reselections at steps 1, 4, 7; the window of step 4's is step 3, before the checkpoint
OPTIMIZERS = {"gradient": lambda params: torch.optim.AdamW(params, lr=1e-2), "momentum": lambda params: SM3(params, lr=1e-2)}


def fit(model_dir: Path, root: Path, regrowth: str, ckpt_path: Path | None = None):
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(model_dir), optimizer=OPTIMIZERS[regrowth])
    spiel = PruneRegrowCallback(density=0.002, regrowth=regrowth, reselection_interval=3, accumulation_steps=1,
                                regrow_fraction=0.5)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, limit_val_batches=0, logger=False,
                         callbacks=[spiel, ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, make_datamodule(model_dir), ckpt_path=ckpt_path)
    return module, spiel


@pytest.mark.parametrize("regrowth", ["gradient", "momentum"])
def test_resume_inside_a_window_is_exact(tiny_bert_dir: Path, tmp_path: Path, regrowth: str) -> None:
    full_run, full_spiel = fit(tiny_bert_dir, tmp_path / "full", regrowth)
    checkpoint = torch.load(tmp_path / "full" / "epoch=0.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STEPS_PER_EPOCH
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("PruneRegrowCallback")]
    assert [record["step"] for record in state["history"]] == [1]
    if regrowth == "gradient":  # the window's statistics travel with the checkpoint
        assert state["stats"] and all(int(s["count"]) == 1 for s in state["stats"].values())

    resumed, resumed_spiel = fit(tiny_bert_dir, tmp_path / "resumed", regrowth, ckpt_path=tmp_path / "full" / "epoch=0.ckpt")
    assert [r["step"] for r in resumed_spiel.history] == [r["step"] for r in full_spiel.history] == [1, 4, 7]
    expected, got = full_run.state_dict(), resumed.state_dict()
    for name, tensor in expected.items():
        if "delta_indices" in name:
            assert torch.equal(got[name], tensor), name
        elif "delta_values" in name or "classifier" in name:
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-7, msg=name)
