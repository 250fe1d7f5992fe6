"""Issue 11, item 11 (invariants 8 and 9): deltas and their optimizer state stay fp32 under `model.to(bfloat16)` and
`Trainer(precision="bf16-true")`; merging into a bf16 weight adds in fp32 and rounds once, as PEFT's merge of the same
delta does, and the unmerged bf16 forward already computes with that once-rounded weight.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from datamodules.glue import GLUEDataModule
from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.sparse import SparseDeltaLinear, sparse_delta_layers
from sparse_lightning.sparse.block import ColumnBlockLinear, RowBlockLinear

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"


def trained_sparse_layer() -> tuple[SparseDeltaLinear, torch.Tensor]:
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(64, 48), 300, torch.randperm(64 * 48)[:300].sort().values)
    with torch.no_grad():
        layer.delta_values.normal_(0, 3e-3)  # small against the weights: bf16 rounding of the delta alone shows
    return layer, layer.delta_values.detach().clone()


def test_to_bf16_keeps_the_delta_fp32_and_unchanged() -> None:
    layer, values = trained_sparse_layer()
    layer.to(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16
    assert layer.delta_values.dtype == torch.float32 and torch.equal(layer.delta_values, values)
    assert layer.delta_indices.dtype == torch.int32
    layer.half().float()  # whatever the base goes through
    assert torch.equal(layer.delta_values, values)


@pytest.mark.parametrize("cls", [ColumnBlockLinear, RowBlockLinear])
def test_to_bf16_keeps_an_s2ft_block_fp32(cls) -> None:
    torch.manual_seed(0)
    layer = cls(nn.Linear(16, 12), torch.tensor([0, 1, 2]))
    with torch.no_grad():
        layer.delta_block.normal_(0, 1e-3)
    block = layer.delta_block.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16 and layer.delta_block.dtype == torch.float32
    assert torch.equal(layer.delta_block, block)


def test_merging_into_bf16_adds_in_fp32_and_rounds_once() -> None:
    layer, values = trained_sparse_layer()
    layer.to(torch.bfloat16)
    weight = layer.base.weight.detach().clone()
    dense = torch.zeros(weight.numel()).index_add(0, layer.delta_indices.long(), values).view_as(weight)
    peft_style = (weight.float() + dense).to(torch.bfloat16)  # PEFT: delta weight in fp32 added, rounded once
    twice = weight + dense.to(torch.bfloat16)  # the old merge: round the delta, then the sum
    assert not torch.equal(twice, peft_style)  # the case matters for these values

    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert torch.equal(layer.base.weight, peft_style)
        assert torch.equal(layer(x), unmerged)  # training forward and merged model agree exactly
        layer.unmerge()
    assert torch.equal(layer.base.weight, weight)


def test_block_merge_into_bf16_rounds_once() -> None:
    torch.manual_seed(0)
    layer = ColumnBlockLinear(nn.Linear(64, 48), torch.arange(40))
    with torch.no_grad():
        layer.delta_block.normal_(0, 3e-3)
    layer.to(torch.bfloat16)
    weight, block = layer.base.weight.detach().clone(), layer.delta_block.detach()
    expected = weight.clone()
    expected[:, :40] = (weight[:, :40].float() + block).to(torch.bfloat16)
    assert not torch.equal(weight[:, :40] + block.to(torch.bfloat16), expected[:, :40])  # rounding twice differs
    layer.merge()
    assert torch.equal(layer.base.weight, expected)


def test_bf16_true_training_keeps_deltas_and_optimizer_state_fp32(tiny_bert_dir: Path, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(tiny_bert_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    datamodule = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(tiny_bert_dir), train_file=str(DATA / "train.tsv"),
                                validation_files=[str(DATA / "dev.tsv")], batch_size=16, max_length=32)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-true", max_steps=2, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[GradientTopKCallback(density=0.05, calibration_batches=1)])
    trainer.fit(module, datamodule)
    layers = sparse_delta_layers(module.model)
    assert layers and all(layer.base.weight.dtype == torch.bfloat16 for layer in layers.values())
    assert all(layer.delta_values.dtype == torch.float32 for layer in layers.values())
    assert all(layer.delta_values.abs().max() > 0 for layer in layers.values())
    deltas = {id(layer.delta_values) for layer in layers.values()}
    optimizer = trainer.optimizers[0]
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"] if id(p) in deltas]
    assert len(states) == len(layers)
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
