"""Invariant 7: a checkpoint holds indices, values and method state; resuming reproduces the uninterrupted run.

Also a weights-only checkpoint (no optimizer, no callback state) reloads with `load_from_checkpoint` into a module
that predicts what the trained one predicts: `on_load_checkpoint` recreates the delta layers.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.glue import GLUEDataModule
from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.methods import Calibration
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.sparse import sparse_delta_layers

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"
EPOCHS = 2
STEPS_PER_EPOCH = 4  # 64 rows, batch 16


def make_datamodule(model_dir: Path) -> GLUEDataModule:
    return GLUEDataModule(task="sst2", tokenizer_name_or_path=str(model_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=16, shuffle=False, max_length=32)


def fit(model_dir: Path, root: Path, ckpt_path: Path | None = None) -> tuple[SequenceClassificationModule, pl.Trainer]:
    """A fresh module, callback, datamodule and trainer every time, as a new process would build them."""
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(model_dir), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    every_epoch = ModelCheckpoint(dirpath=root / "full", filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    weights_only = ModelCheckpoint(dirpath=root / "weights", filename="{epoch}", every_n_epochs=EPOCHS,
                                   save_weights_only=True)
    sift = GradientTopKCallback(density=0.05, calibration_batches=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, limit_val_batches=0, logger=False,
                         callbacks=[sift, every_epoch, weights_only],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, make_datamodule(model_dir), ckpt_path=ckpt_path)
    return module, trainer


def delta_state(module: SequenceClassificationModule) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()
            if "delta_" in name or "classifier" in name}


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert_dir: Path, tmp_path_factory) -> tuple[SequenceClassificationModule, Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    module, trainer = fit(tiny_bert_dir, root)
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    return module, root


def test_checkpoint_holds_indices_values_selection_and_optimizer_state(uninterrupted) -> None:
    module, root = uninterrupted
    checkpoint = torch.load(root / "full" / "epoch=0.ckpt", map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    layers = sparse_delta_layers(module.model)
    assert len(layers) == 8
    for name, layer in layers.items():
        indices = state[f"model.{name}.delta_indices"]
        assert torch.equal(indices, layer.delta_indices)  # SIFT selects once: epoch 0 already has the final indices
        assert indices.dtype == torch.int32 and bool(state[f"model.{name}.delta_selected"])
        values = state[f"model.{name}.delta_values"]
        assert values.dtype == torch.float32 and values.shape == (layer.k,) and values.abs().max() > 0
    optimizer = checkpoint["optimizer_states"][0]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(optimizer["state"]) == len(trainable) == 10  # 8 deltas + classifier weight and bias
    for slot, param in zip(optimizer["state"].values(), trainable):
        assert slot["exp_avg"].shape == slot["exp_avg_sq"].shape == param.shape  # scales with k, not the model
        assert int(slot["step"]) == STEPS_PER_EPOCH
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == STEPS_PER_EPOCH
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, STEPS_PER_EPOCH)
    assert checkpoint["sparse_lightning"]["method"] == "sift"


def test_resuming_reproduces_the_uninterrupted_run(uninterrupted, tiny_bert_dir: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    full_run, root = uninterrupted

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run must not select again")

    monkeypatch.setattr(Calibration, "batches", no_calibration)
    resumed, trainer = fit(tiny_bert_dir, tmp_path, ckpt_path=root / "full" / "epoch=0.ckpt")
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH

    expected, got = delta_state(full_run), delta_state(resumed)
    assert got.keys() == expected.keys() and len(got) == 3 * 8 + 2
    for name, tensor in expected.items():
        if "delta_values" in name or "classifier" in name:
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-7, msg=name)
        else:
            assert torch.equal(got[name], tensor), name
    # and the second epoch did train: the resumed values moved away from the checkpoint's
    start = torch.load(root / "full" / "epoch=0.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(not torch.equal(start[name], got[name]) for name in got if "delta_values" in name)


def test_weights_only_checkpoint_reloads_and_predicts_the_same(uninterrupted, tiny_bert_dir: Path) -> None:
    trained, root = uninterrupted
    path = root / "weights" / "epoch=1.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert "optimizer_states" not in checkpoint and checkpoint["sparse_lightning"]["method"] == "sift"

    reloaded = SequenceClassificationModule.load_from_checkpoint(path, map_location="cpu")
    assert sorted(sparse_delta_layers(reloaded.model)) == sorted(sparse_delta_layers(trained.model))
    for name, tensor in delta_state(trained).items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name

    datamodule = make_datamodule(tiny_bert_dir)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    trained.eval(), reloaded.eval()
    with torch.no_grad():
        expected, got = trained(batch).logits, reloaded(batch).logits
    assert torch.equal(got, expected)
    assert torch.equal(reloaded.predict_step(batch, 0), trained.predict_step(batch, 0))
