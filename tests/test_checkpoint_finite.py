"""A step can make deltas non-finite after a finite loss: no checkpoint is written with them."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.glue import GLUEDataModule
from sparse_lightning import GradientTopKCallback, SequenceClassificationModule

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"


class PoisonAfterStep(pl.Callback):
    """Writes a NaN into one delta right after an optimizer step, as a diverging update would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            name, param = next((n, p) for n, p in pl_module.named_parameters() if n.endswith("delta_values"))
            with torch.no_grad():
                param[0] = float("nan")


def test_no_checkpoint_is_saved_with_non_finite_deltas(tiny_bert_dir: Path, tmp_path: Path) -> None:
    module = SequenceClassificationModule(str(tiny_bert_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(tiny_bert_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=8, max_length=32)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, limit_val_batches=0, logger=False,
                         callbacks=[GradientTopKCallback(density=0.05), PoisonAfterStep(),
                                    ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=2)],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"not saving a checkpoint at step 2: deltas are not finite \(model\."):
        trainer.fit(module, data)
    assert not (tmp_path / "last.ckpt").exists()
