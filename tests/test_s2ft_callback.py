"""S2FTStructureCallback in a real Trainer on tiny BERT: calibration from the datamodule, the blocks per projection,
export in original coordinates (invariant 5), validating a checkpoint. Merged export, apply_delta, resume, reload and
the trainable count are the contract matrix's (tests/test_contract.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from datamodules.glue import GLUEDataModule
from sparse_lightning.methods import Calibration
from sparse_lightning.callbacks import S2FTStructureCallback
from sparse_lightning.export import DELTA_CONFIG, DELTA_WEIGHTS, export_checkpoint
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.sparse.block import block_delta_layers

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"
EPOCHS, STEPS_PER_EPOCH = 2, 4  # 64 rows, batch 16
SETTINGS = {"num_heads": 1, "num_channels": 8, "train": ["o", "v", "down", "up"], "select_by": "activation",
            "calibration_batches": 2}


def make_datamodule(model_dir: Path) -> GLUEDataModule:
    return GLUEDataModule(task="sst2", tokenizer_name_or_path=str(model_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=16, shuffle=False, max_length=32)


def fit(model_dir: Path, root: Path, ckpt_path: Path | None = None, **settings) -> SequenceClassificationModule:
    """A fresh module, callback, datamodule and trainer every time, as a new process would build them."""
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(model_dir), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, limit_val_batches=0, logger=False,
                         callbacks=[S2FTStructureCallback(**{**SETTINGS, **settings}), checkpoints],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, make_datamodule(model_dir), ckpt_path=ckpt_path)
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    return module


def dev_batch(model_dir: Path) -> dict[str, torch.Tensor]:
    datamodule = make_datamodule(model_dir)
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


@pytest.fixture(scope="module")
def trained(tiny_bert_dir: Path, tmp_path_factory) -> tuple[SequenceClassificationModule, Path]:
    root = tmp_path_factory.mktemp("s2ft")
    return fit(tiny_bert_dir, root), root


def test_blocks_cover_the_selected_heads_and_channels(trained) -> None:
    """Which projection gets which block (the trainable set and its total are tests/test_contract.py's)."""
    module, _ = trained
    layers = block_delta_layers(module.model)
    assert len(layers) == 8  # o, v, down, up in 2 layers
    prefix = "bert.encoder.layer.0."
    shapes = {name.removeprefix(prefix): tuple(layer.delta_block.shape) for name, layer in layers.items()
              if name.startswith(prefix)}
    assert shapes == {"attention.self.value": (8, 32), "attention.output.dense": (32, 8),  # 1 head of 8
                      "intermediate.dense": (8, 32), "output.dense": (32, 8)}  # 8 channels
    assert all(layer.delta_block.abs().max() > 0 for layer in layers.values())  # every block trained


def test_selection_comes_from_the_first_training_batches(trained, tiny_bert_dir: Path) -> None:
    module, _ = trained
    datamodule = make_datamodule(tiny_bert_dir)
    datamodule.setup("fit")
    batches = [batch for _, batch in zip(range(2), datamodule.train_dataloader())]
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    S2FTStructureCallback(**SETTINGS).attach(reference, Calibration.from_batches(reference, batches))
    got, expected = dict(module.model.named_buffers()), dict(reference.named_buffers())
    orders = [name for name in expected if "s2ft" in name or "delta_" in name]
    assert len(orders) == 4 + 8
    for name in orders:
        assert torch.equal(got[name], expected[name]), name


def test_export_unpermutes_exactly(trained, tiny_bert_dir: Path, tmp_path: Path) -> None:
    module, root = trained
    written = export_checkpoint(root / "epoch=1.ckpt", tmp_path / "export", merged=True)
    config = json.loads((written["delta"] / DELTA_CONFIG).read_text())
    assert config["method"] == "s2ft" and config["dense"] == ["classifier.weight", "classifier.bias"]
    kinds = {name: target["kind"] for name, target in config["targets"].items()}
    assert sorted(set(kinds.values())) == ["columns", "rows"] and len(kinds) == 8

    # merged == trained and apply_delta == merged are tests/test_contract.py's; here: the original coordinates
    tensors = load_file(str(written["delta"] / DELTA_WEIGHTS))
    o_proj = "bert.encoder.layer.0.attention.output.dense"
    head = int(module.model.bert.encoder.layer[0].attention.s2ft_head_order[0])
    assert tensors[f"{o_proj}.columns"].tolist() == list(range(8 * head, 8 * head + 8))  # original head columns


def test_validate_with_the_callback_evaluates_the_checkpoint(trained, tiny_bert_dir: Path, monkeypatch) -> None:
    """Outside fit nothing is selected (no training data needed): the checkpoint brings blocks and permutation."""
    module, root = trained
    monkeypatch.setattr(S2FTStructureCallback, "select", lambda *a, **k: pytest.fail("selected outside fit"))
    fresh = SequenceClassificationModule(str(tiny_bert_dir))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[S2FTStructureCallback(**SETTINGS)],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    metrics = trainer.validate(fresh, make_datamodule(tiny_bert_dir), ckpt_path=root / "epoch=1.ckpt", verbose=False)
    module.eval()
    with torch.no_grad():
        loss = float(module(dev_batch(tiny_bert_dir)).loss)
    assert abs(metrics[0]["val/loss"] - loss) < 1e-6

