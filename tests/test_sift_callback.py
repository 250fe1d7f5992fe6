"""GradientTopKCallback (SIFT) inside a real Trainer on tiny BERT: what it selects, and what it must leave alone."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from datamodules.glue import GLUEDataModule
from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.methods import Calibration
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.sparse import sparse_delta_layers

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"
TARGETS = ("query", "key", "value", "attention.output.dense")  # BERT defaults


def make_datamodule(model_dir: Path, batch_size: int = 8) -> GLUEDataModule:
    return GLUEDataModule(task="sst2", tokenizer_name_or_path=str(model_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=batch_size, shuffle=False,
                          max_length=32)


def fit(model_dir: Path, root: Path, callbacks: list[pl.Callback], max_steps: int = 1) -> SequenceClassificationModule:
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(model_dir))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, make_datamodule(model_dir))
    return module


def snapshot(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Every tensor, the frozen base's too (the module's own `state_dict` holds only what trains)."""
    return {f"model.{name}": tensor.detach().clone() for name, tensor in module.model.state_dict().items()}


class Probe(pl.Callback):
    """Put after the SIFT callback: records the state before calibration (on_fit_start) and right after it."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = snapshot(pl_module)
        self.modes_before = {name: m.training for name, m in pl_module.named_modules()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after = snapshot(pl_module)
        self.modes_after = {name: m.training for name, m in pl_module.named_modules()}
        self.with_grad = [name for name, p in pl_module.named_parameters() if p.grad is not None]
        self.global_step = trainer.global_step


@pytest.fixture(scope="module")
def calibrated(tiny_bert_dir: Path, tmp_path_factory) -> tuple[SequenceClassificationModule, Probe]:
    probe = Probe()
    module = fit(tiny_bert_dir, tmp_path_factory.mktemp("sift"),
                 [GradientTopKCallback(density=0.05, calibration_batches=2), probe])
    return module, probe


def dense_reference_scores(model_dir: Path, before: dict[str, torch.Tensor], batches: int) -> dict[str, torch.Tensor]:
    """|sum of the dense weight gradients| over the first `batches` training batches, on a plain HF copy of the
    model as it was before calibration (deltas dropped, base weights and the new classifier loaded)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    plain = {name.removeprefix("model.").replace(".base.", "."): tensor for name, tensor in before.items()
             if not name.split(".")[-1].startswith("delta_")}
    model.load_state_dict(plain, strict=True)
    model.eval()
    datamodule = make_datamodule(model_dir)
    datamodule.setup("fit")
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == batches:
            break
        model(**batch).loss.backward()
    return {name.removesuffix(".weight"): p.grad.abs() for name, p in model.named_parameters()
            if p.grad is not None and name.endswith(".weight") and name.removesuffix(".weight").endswith(TARGETS)}


def test_selects_the_top_k_of_the_dense_gradient(calibrated, tiny_bert_dir: Path) -> None:
    module, probe = calibrated
    scores = dense_reference_scores(tiny_bert_dir, probe.before, batches=2)
    layers = sparse_delta_layers(module.model)
    assert sorted(layers) == sorted(scores) and len(layers) == 8
    for name, layer in layers.items():
        selected = probe.after[f"model.{name}.delta_indices"]
        assert selected.shape == (int(0.05 * scores[name].numel()) + 1,)
        expected = torch.topk(scores[name].view(-1), layer.k).indices
        assert set(selected.tolist()) == set(expected.tolist()), name
        assert torch.equal(selected, selected.sort().values)  # stored sorted
        assert bool(probe.after[f"model.{name}.delta_selected"])


def test_calibration_changes_no_weight_and_leaves_no_gradient(calibrated) -> None:
    module, probe = calibrated
    assert probe.before.keys() == probe.after.keys()
    for name, tensor in probe.after.items():
        if name.endswith(("delta_indices", "delta_selected")):
            continue
        assert torch.equal(tensor, probe.before[name]), name  # base weights, classifier, values
        if name.endswith("delta_values"):
            assert not tensor.any(), name
    assert probe.with_grad == []
    assert probe.global_step == 0
    assert probe.modes_after == probe.modes_before  # calibration runs in eval mode and restores every module's mode


def test_training_starts_with_every_module_in_train_mode(calibrated) -> None:
    """from_pretrained returns eval mode and Lightning keeps modes: without care, dropout would stay off."""
    module, probe = calibrated
    assert [name for name, training in probe.modes_after.items() if not training] == []


class Preselect(pl.Callback):
    """Marks some layers as already selected (as a resumed checkpoint would), with recognisable indices."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.names = names
        self.chosen: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, layer in sparse_delta_layers(pl_module.model).items():
            if self.names is None or name in self.names:
                numel = layer.weight_shape.numel()
                indices = torch.arange(numel - layer.k, numel)  # the last k entries: not what gradients pick
                layer.set_indices(indices.to(layer.delta_indices.dtype))
                layer.delta_values.data.fill_(0.5)
                self.chosen[name] = layer.delta_indices.clone()


def test_selected_layers_are_not_selected_again(tiny_bert_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran although every layer was already selected")

    monkeypatch.setattr(Calibration, "batches", no_calibration)
    preselect, probe = Preselect(), Probe()
    fit(tiny_bert_dir, tmp_path, [preselect, GradientTopKCallback(density=0.05), probe])
    assert len(preselect.chosen) == 8
    for name, indices in preselect.chosen.items():
        assert torch.equal(probe.after[f"model.{name}.delta_indices"], indices), name
        assert torch.all(probe.after[f"model.{name}.delta_values"] == 0.5), name


def test_only_unselected_layers_are_selected(tiny_bert_dir: Path, tmp_path: Path) -> None:
    kept = "bert.encoder.layer.0.attention.self.query"
    preselect, probe = Preselect([kept]), Probe()
    fit(tiny_bert_dir, tmp_path, [preselect, GradientTopKCallback(density=0.05), probe])
    assert torch.equal(probe.after[f"model.{kept}.delta_indices"], preselect.chosen[kept])
    assert torch.all(probe.after[f"model.{kept}.delta_values"] == 0.5)
    others = [key for key in probe.after if key.endswith("delta_indices") and kept not in key]
    assert len(others) == 7
    for key in others:
        assert not torch.equal(probe.after[key], probe.before[key]), key  # moved off the initial arange
        assert bool(probe.after[key.replace("delta_indices", "delta_selected")])


def test_pattern_matching_nothing_names_the_existing_modules(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['no_such_proj'\] matched no nn.Linear.*query"):
        fit(tiny_bert_dir, tmp_path, [GradientTopKCallback(density=0.05, target_modules=["query", "no_such_proj"])])


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_out_of_range_is_rejected_at_construction(density: float) -> None:
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        GradientTopKCallback(density=density)


def test_calibration_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="calibration_batches must be >= 1"):
        GradientTopKCallback(calibration_batches=0)
