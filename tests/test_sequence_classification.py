"""SequenceClassificationModule: GLUE metric per task, several validation sets, regression, LoRA/full."""

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.glue import GLUEDataModule
from sparse_lightning import GradientTopKCallback, LoRASettings, PruneRegrowCallback, SequenceClassificationModule
from sparse_lightning.modules.sequence_classification import build_metrics
from sparse_lightning.registry import names


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def validate(module, datamodule, callbacks=()) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.validate(module, datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_accuracy_is_micro_not_per_class_average():
    metrics = build_metrics("accuracy", 3)
    metrics.update(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 2]))
    assert metrics.compute()["accuracy"].item() == pytest.approx(0.75)


def test_mnli_reports_matched_and_mismatched_separately(tiny_bert_dir, tmp_path):
    pairs = [{"premise": f"A man number {i} sleeps.", "hypothesis": "A person rests.", "label": i % 3} for i in range(6)]
    files = [write_jsonl(tmp_path / f"{name}.jsonl", pairs[:n]) for name, n in (("m", 6), ("mm", 3))]
    datamodule = GLUEDataModule("mnli", tokenizer_name_or_path=str(tiny_bert_dir), train_file=files[0],
                                validation_files=files)
    metrics = validate(SequenceClassificationModule(str(tiny_bert_dir)), datamodule)
    assert {"val/matched/accuracy", "val/mismatched/accuracy", "val/matched/loss", "val/mismatched/loss"} <= set(metrics)


def test_stsb_is_regression_with_pearson_and_spearman(tiny_bert_dir, tmp_path):
    records = [{"sentence1": f"Sentence {i}.", "sentence2": f"Other {i}.", "label": float(i % 5)} for i in range(8)]
    path = write_jsonl(tmp_path / "stsb.jsonl", records)
    datamodule = GLUEDataModule("stsb", tokenizer_name_or_path=str(tiny_bert_dir), train_file=path,
                                validation_files=[path])
    module = SequenceClassificationModule(str(tiny_bert_dir))
    metrics = validate(module, datamodule)
    assert module.hparams.num_labels == 1 and module.hparams.metric == "pearson_spearman"
    assert {"val/pearson", "val/spearman", "val/loss"} <= set(metrics)


@pytest.mark.parametrize("method", [*names(sparse=False), "sift"])  # the baselines and one sparse method
def test_trainable_parameters_per_method(tiny_bert_dir, method):
    kwargs = {"lora": LoRASettings(r=2, alpha=4)} if method == "lora" else {}
    module = SequenceClassificationModule(str(tiny_bert_dir), num_labels=2, **kwargs)
    callbacks = [GradientTopKCallback(density=0.05)] if method == "sift" else []
    module.trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=callbacks)
    module.configure_model()
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in module.parameters())
    assert module.method == method
    if method == "full":
        assert sum(p.numel() for p in module.parameters() if p.requires_grad) == total
    elif method == "lora":
        assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
        assert any("classifier" in n for n in trainable)
    else:
        assert trainable and all(n.endswith("delta_values") or ".classifier." in n for n in trainable)


def test_lora_trains_the_modules_it_is_told_to_save(tiny_bert_dir):
    """modules_to_save replaces the default (the head): here the pooler trains densely beside the adapters."""
    module = SequenceClassificationModule(str(tiny_bert_dir), num_labels=1,
                                          lora=LoRASettings(r=2, modules_to_save=["classifier", "pooler"]))
    module.trainer = L.Trainer(accelerator="cpu", logger=False)
    module.configure_model()
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert any(".pooler." in n for n in trainable) and any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n or ".pooler." in n for n in trainable)


def test_lora_and_sparse_callback_together_is_an_error(tiny_bert_dir):
    module = SequenceClassificationModule(str(tiny_bert_dir), num_labels=2, lora=LoRASettings(r=2))
    module.trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[GradientTopKCallback(density=0.05)])
    with pytest.raises(ValueError, match=r"choose LoRA \(model.lora\) or GradientTopKCallback, not both"):
        module.configure_model()


def test_two_sparse_methods_on_one_trainer_is_an_error(tiny_bert_dir):
    module = SequenceClassificationModule(str(tiny_bert_dir), num_labels=2)
    module.trainer = L.Trainer(accelerator="cpu", logger=False,
                               callbacks=[GradientTopKCallback(density=0.05), PruneRegrowCallback(density=0.001)])
    with pytest.raises(ValueError, match="one sparse method per run, got 2: GradientTopKCallback, PruneRegrowCallback"):
        module.configure_model()
    assert module.model is None


def test_a_sparse_target_inside_a_dense_module_is_an_error(tiny_bert_dir):
    module = SequenceClassificationModule(str(tiny_bert_dir), num_labels=2)
    callback = GradientTopKCallback(density=0.05, target_modules=["query", "classifier"], dense_modules=["classifier"])
    module.trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback])
    with pytest.raises(ValueError, match="classifier has a sparse delta but sits inside the densely trained module"):
        module.configure_model()


def test_bad_warmup_ratio_is_rejected():
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\)"):
        SequenceClassificationModule(optimizer=partial(torch.optim.AdamW, lr=1e-3), warmup_ratio=1.5)


def test_model_kwargs_override_the_pretrained_config(tiny_bert_dir):
    module = SequenceClassificationModule(str(tiny_bert_dir), num_labels=3,
                                          model_kwargs={"hidden_dropout_prob": 0.25})
    module.configure_model()
    assert module.model.config.hidden_dropout_prob == 0.25 and module.model.config.num_labels == 3
