"""Gradient checkpointing works with every method: the recomputed forward gives the same deltas as the plain run
(the Functions' observers fire once per backward, so selection and SpIEL statistics are unchanged)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch

from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.registry import names

METHODS = names(sparse=True)  # every sparse method of the registry


def trained(contract: ModuleType, model_dir: Path, method: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    callback, optimizer = contract.build_method(method)
    module = SequenceClassificationModule(str(model_dir), optimizer=optimizer, gradient_checkpointing=checkpointing)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, limit_val_batches=0, logger=False,
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(module, contract.make_datamodule(model_dir, batch_size=8))
    assert module.model.is_gradient_checkpointing == checkpointing
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_trains_what_the_plain_run_trains(method: str, contract: ModuleType,
                                                                 tiny_bert_cls_dir: Path) -> None:
    plain = trained(contract, tiny_bert_cls_dir, method, checkpointing=False)
    recomputed = trained(contract, tiny_bert_cls_dir, method, checkpointing=True)
    assert plain.keys() == recomputed.keys() and plain
    for name, tensor in plain.items():
        torch.testing.assert_close(recomputed[name], tensor, rtol=0, atol=1e-6, msg=name)
