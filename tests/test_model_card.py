"""Model cards (sparse_lightning/model_card.py): every export directory gets a README.md that says the base model,
the method and budget, the trainable count, the data and metrics the run recorded, and how to load it with PEFT,
with transformers (merged) and with this library; the card's code blocks run as written."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForSequenceClassification

from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.export import export_checkpoint, export_model
from sparse_lightning.model_card import CARD, model_card, run_facts
from sparse_lightning.modules import SequenceClassificationModule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def run(glue_datamodule, tiny_bert_cls_dir: Path, tmp_path_factory) -> SimpleNamespace:
    """SIFT for 2 steps (one short epoch), validated once, with a checkpoint that monitors val/loss."""
    root = tmp_path_factory.mktemp("card-run")
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(tiny_bert_cls_dir),
                                          optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    checkpoint = ModelCheckpoint(dirpath=root, filename="best", monitor="val/loss", mode="min")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[GradientTopKCallback(density=0.05), checkpoint],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root))
    trainer.fit(module, glue_datamodule(tiny_bert_cls_dir))
    ids = torch.randint(1000, 2000, (4, 10), generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(module=module.eval(), trainer=trainer, ckpt=root / "best.ckpt", root=root, ids=ids,
                           base=tiny_bert_cls_dir, val_loss=float(trainer.callback_metrics["val/loss"]))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def code_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_every_export_directory_has_a_card(run, tmp_path: Path) -> None:
    from sparse_lightning.peft_interop import export_checkpoint_peft, export_peft

    written = [
        *export_checkpoint(run.ckpt, tmp_path / "delta", merged=True).values(),
        *export_checkpoint_peft(run.ckpt, tmp_path / "shira", merged=True).values(),
        *export_checkpoint_peft(run.ckpt, tmp_path / "supertuning", format="peft-supertuning").values(),
        *export_model(run.module, tmp_path / "in-memory", merged=True).values(),
        *export_peft(run.module, tmp_path / "in-memory-peft").values(),
    ]
    assert len(written) == 8
    for directory in written:
        card = (directory / CARD).read_text()
        assert card.startswith("---\nbase_model: ") and "## Load it" in card, directory
        assert "### With PEFT" in card and "### With transformers only (merged)" in card
        assert "### With sparse-lightning" in card


def test_card_says_what_was_trained_from_the_checkpoint(run, tmp_path: Path) -> None:
    written = export_checkpoint(run.ckpt, tmp_path / "delta", merged=True)
    card = (written["delta"] / CARD).read_text()
    assert f"| base model | `{run.base}` |" in card
    assert "SIFT (Song et al., 2024)" in card and "| budget | density=0.05, calibration_batches=1 |" in card
    trainable = sum(p.numel() for p in run.module.parameters() if p.requires_grad)
    assert f"| trainable parameters | {trainable:,} of " in card
    assert "task=sst2" in card and "train_file=" in card and "batch_size=16" in card  # the datamodule's settings
    assert f"val/loss (best, ModelCheckpoint) = {run.val_loss:.6g}" in card
    assert "| training | 2 optimizer steps" in card
    assert "library_name: sparse-lightning" in card and "delta_config.json" in card
    merged_card = (written["merged"] / CARD).read_text()
    assert "library_name: transformers" in merged_card and f"= {run.val_loss:.6g}" in merged_card


def test_in_memory_export_reads_the_metrics_from_the_trainer(run, tmp_path: Path) -> None:
    written = export_model(run.module, tmp_path / "delta")
    card = (written["delta"] / CARD).read_text()
    assert f"val/loss = {run.val_loss:.6g}" in card and "task=sst2" in card


@pytest.mark.parametrize("fmt", ["delta", "peft"])
def test_the_cards_code_runs_and_loads_the_trained_model(run, fmt: str, tmp_path: Path) -> None:
    """Every Python block of the delta / PEFT card and of the merged card, run as written, predicts what the merged
    export predicts (the base path in the card is the run's base directory)."""
    from sparse_lightning.peft_interop import export_checkpoint_peft

    export = export_checkpoint if fmt == "delta" else export_checkpoint_peft
    written = export(run.ckpt, tmp_path / fmt, merged=True)
    expected = logits(AutoModelForSequenceClassification.from_pretrained(written["merged"]).eval(), run.ids)
    blocks = code_blocks((written[fmt if fmt == "delta" else "peft"] / CARD).read_text())
    blocks += code_blocks((written["merged"] / CARD).read_text())
    assert len(blocks) == (3 + 2 if fmt == "peft" else 2 + 1)  # the merged card shows PEFT too when it can
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the card's own example
        models = [namespace[name] for name in ("merged", "model") if name in namespace]
        for model in models:
            assert torch.equal(logits(model.eval(), run.ids), expected), block


def test_an_alias_base_model_is_explained(tmp_path: Path) -> None:
    (tmp_path / "delta_config.json").write_text('{"targets": {}, "dense": []}')
    card = model_card(tmp_path, {"method": "sift", "base_model": "SmolLM2-135M-Instruct", "callbacks": []},
                      {"architecture": "LlamaForCausalLM"}, {"delta": tmp_path})
    assert "dequantized" in card and "resolve_model_path('SmolLM2-135M-Instruct')" in card
    assert "AutoModelForCausalLM" in card and "| data | not recorded |" in card and "| metrics | not recorded |" in card


def test_facts_without_a_trainer_or_checkpoint(tiny_bert_cls_dir: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir)
    facts = run_facts(model, ["classifier.weight", "classifier.bias"])
    assert facts["trainable"] == model.classifier.weight.numel() + 2 and facts["data"] is None
    assert facts["architecture"] == "BertForSequenceClassification" and facts["num_labels"] == 2
