"""`head_lr`: the densely trained modules beside a delta get their own learning rate, the deltas keep the
optimizer's, and a Trainer steps both (tiny BERT, one optimizer step)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from datamodules.glue import GLUEDataModule
from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.modules.lora import LoRASettings
from sparse_lightning.modules.param_groups import parameter_groups

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"


def fit(model_dir: Path, root: Path, module: SequenceClassificationModule,
        callbacks: list[pl.Callback]) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root))
    data = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(model_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=8, shuffle=False, max_length=32)
    trainer.fit(module, data)
    return trainer


def group_names(module: SequenceClassificationModule, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]


def test_sift_deltas_at_the_optimizer_lr_and_head_at_head_lr(tiny_bert_dir: Path, tmp_path: Path) -> None:
    module = SequenceClassificationModule(str(tiny_bert_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                                          head_lr=1e-4)
    trainer = fit(tiny_bert_dir, tmp_path, module,
                  [GradientTopKCallback(density=0.05, dense_modules=["classifier", "pooler"])])
    optimizer = trainer.optimizers[0]
    deltas, dense = group_names(module, optimizer)
    assert deltas and all(n.endswith("delta_values") for n in deltas)
    assert dense == {n for n, p in module.named_parameters() if p.requires_grad} - deltas
    assert any("classifier" in n for n in dense) and any("pooler" in n for n in dense)
    assert optimizer.param_groups[0]["initial_lr"] == 1e-2 and optimizer.param_groups[1]["initial_lr"] == 1e-4
    assert all(optimizer.state[p]["step"] == 1 for group in optimizer.param_groups for p in group["params"])


def test_lora_factors_are_deltas_and_modules_to_save_the_head(tiny_bert_dir: Path, tmp_path: Path) -> None:
    module = SequenceClassificationModule(str(tiny_bert_dir), head_lr=1e-4,
                                          lora=LoRASettings(r=2, alpha=4, target_modules=["query", "value"],
                                                            modules_to_save=["classifier", "pooler"]))
    trainer = fit(tiny_bert_dir, tmp_path, module, [])
    deltas, dense = group_names(module, trainer.optimizers[0])
    assert deltas and all(".lora_" in n for n in deltas)
    assert dense and all("modules_to_save" in n for n in dense)


def test_without_head_lr_one_plain_list_and_full_ft_refuses_it() -> None:
    head, delta = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    named = [("model.classifier.weight", head), ("model.layer.0.query.delta_values", delta)]
    assert parameter_groups(named, None) == [head, delta]
    assert parameter_groups(named, 1e-3) == [{"params": [delta]}, {"params": [head], "lr": 1e-3}]
    with pytest.raises(ValueError, match="head_lr=0.001 needs deltas.*full fine-tuning"):
        parameter_groups([("model.classifier.weight", head)], 1e-3)
    with pytest.raises(ValueError, match="head_lr must be > 0"):
        SequenceClassificationModule("unused", head_lr=0.0)
