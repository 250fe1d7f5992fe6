"""`sparse-lightning fit | validate | export` end to end on tiny BERT, and the CLI's errors on bad inputs.

The CLI runs in this process (`sparse_lightning.cli.main`), so the trained module can be compared with what export
writes: the merged directory must load with plain transformers and predict exactly what the trained module predicts.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from datamodules.glue import GLUEDataModule
from sparse_lightning import cli
from sparse_lightning.export import DELTA_CONFIG, DELTA_WEIGHTS, apply_delta
from sparse_lightning.sparse import sparse_delta_layers
from tiny_sst2_runs import DATA, tiny_sst2_config



def write_config(tmp_path: Path, model_dir: Path, name: str = "config.yaml", *, callback: dict | None = None,
                 data: dict | None = None) -> Path:
    callbacks = [{"class_path": "sparse_lightning.callbacks.GradientTopKCallback",
                  "init_args": {"density": 0.05, "calibration_batches": 1, **(callback or {})}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "checkpoints"), "filename": "last"}}]
    return tiny_sst2_config(
        tmp_path, model_dir, {"max_steps": 3, "limit_val_batches": 1, "logger": False,
                              "default_root_dir": str(tmp_path / "root"), "callbacks": callbacks},
        model={"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}},
        data={"tokenizer_name_or_path": str(model_dir), **(data or {})}, name=name)


def dev_batch(model_dir: Path) -> dict[str, torch.Tensor]:
    datamodule = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(model_dir), train_file=str(DATA / "train.tsv"),
                                validation_files=[str(DATA / "dev.tsv")], max_length=32)
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


@pytest.fixture(scope="module")
def exported(tiny_bert_dir: Path, tmp_path_factory) -> dict[str, Any]:
    """fit, then validate the checkpoint, then export it with a merged model; keeps the trained module."""
    tmp_path = tmp_path_factory.mktemp("cli")
    config = write_config(tmp_path, tiny_bert_dir)
    seen: dict[str, Any] = {}
    patch = pytest.MonkeyPatch()
    patch.setattr(cli.SparseLightningCLI, "after_fit", lambda self: seen.update(module=self.model))
    patch.setattr(cli.SparseLightningCLI, "after_validate",
                  lambda self: seen.update(metrics={k: float(v) for k, v in self.trainer.callback_metrics.items()}))
    try:
        cli.main(["fit", "--config", str(config)])
        checkpoint = tmp_path / "checkpoints" / "last.ckpt"
        cli.main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint)])
    finally:
        patch.undo()
    output = tmp_path / "export"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli.main(["export", "--ckpt_path", str(checkpoint), "--output", str(output), "--merged", "true"])
    return {**seen, "checkpoint": checkpoint, "output": output, "stdout": stdout.getvalue(), "config": config,
            "tmp_path": tmp_path}


def test_fit_trains_sift_and_validate_reads_the_checkpoint(exported, tiny_bert_dir: Path) -> None:
    module = exported["module"]
    assert module.trainer.global_step == 3 and exported["checkpoint"].is_file()
    layers = sparse_delta_layers(module.model)
    assert len(layers) == 8 and all(bool(layer.delta_selected) for layer in layers.values())
    assert all(layer.delta_values.abs().max() > 0 for layer in layers.values())

    metrics = exported["metrics"]
    assert {"val/loss", "val/accuracy"} <= metrics.keys() and 0.0 <= metrics["val/accuracy"] <= 1.0
    module.eval()
    with torch.no_grad():
        loss = float(module(dev_batch(tiny_bert_dir)).loss)  # the 16 dev rows are one validation batch
    assert math.isclose(metrics["val/loss"], loss, rel_tol=1e-6)  # validate evaluated the trained weights


def test_the_config_is_saved_in_the_run_directory_and_nowhere_without_a_logger(exported, tiny_bert_dir: Path,
                                                                               tmp_path: Path) -> None:
    written = set(exported["tmp_path"].rglob("config.yaml")) - {exported["config"]}
    assert not written  # logger: false, so there is no run directory to save into
    config = write_config(tmp_path, tiny_bert_dir)
    cli.main(["validate", "--config", str(config), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
              "--trainer.logger.save_dir", str(tmp_path / "logs"), "--trainer.logger.name", "run"])
    saved = yaml.safe_load((tmp_path / "logs" / "run" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["model_name_or_path"] == str(tiny_bert_dir)


def test_validate_with_a_config_for_another_model_says_what_differs(exported, tiny_llama_dir: Path,
                                                                    tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_llama_dir)
    with pytest.raises(ValueError, match=r"was trained with another model than this config builds \(model '.*tiny-bert"):
        cli.main(["validate", "--config", str(config), "--ckpt_path", str(exported["checkpoint"])])


def test_export_writes_the_delta_and_its_config(exported, tiny_bert_dir: Path) -> None:
    output, module = exported["output"], exported["module"]
    assert f"wrote delta: {output}" in exported["stdout"] and "wrote merged:" in exported["stdout"]
    config = json.loads((output / DELTA_CONFIG).read_text())
    assert config["method"] == "sift" and config["base_model"] == str(tiny_bert_dir)
    assert config["callbacks"] == [{"method": "sift", "density": 0.05, "calibration_batches": 1}]
    assert sorted(config["dense"]) == ["classifier.bias", "classifier.weight"]
    layers = sparse_delta_layers(module.model)
    assert sorted(config["targets"]) == sorted(layers)
    tensors = load_file(str(output / DELTA_WEIGHTS))
    for name, layer in layers.items():
        target = config["targets"][name]
        assert target == {"shape": [32, 32], "k": int(0.05 * 32 * 32) + 1, "weight": f"{name}.weight"}
        assert torch.equal(tensors[f"{name}.indices"], layer.delta_indices)
        assert torch.equal(tensors[f"{name}.values"], layer.delta_values.detach())
    assert torch.equal(tensors["classifier.weight"], module.model.classifier.weight.detach())


def test_merged_model_loads_with_plain_transformers_and_predicts_exactly(exported, tiny_bert_dir: Path) -> None:
    merged = AutoModelForSequenceClassification.from_pretrained(exported["output"] / "merged").eval()
    assert not any("delta" in name for name in merged.state_dict())
    module = exported["module"].eval()
    batch = dev_batch(tiny_bert_dir)
    with torch.no_grad():
        expected = module(batch).logits
        got = merged(**batch).logits
    assert torch.equal(got, expected)


def test_apply_delta_to_a_fresh_base_equals_the_merged_model(exported, tiny_bert_dir: Path) -> None:
    merged = AutoModelForSequenceClassification.from_pretrained(exported["output"] / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    apply_delta(base, exported["output"])
    expected = merged.state_dict()
    assert base.state_dict().keys() == expected.keys()
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_print_config(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, tiny_bert_dir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    callback = printed["trainer"]["callbacks"][0]
    assert callback["class_path"] == "sparse_lightning.callbacks.GradientTopKCallback"
    assert callback["init_args"]["density"] == 0.05
    assert printed["model"]["init_args"]["model_name_or_path"] == str(tiny_bert_dir)
    assert not (tmp_path / "checkpoints").exists()  # printing trains nothing


def test_unknown_glue_task(tiny_bert_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_bert_dir, data={"task": "sst3"})
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst3'; valid tasks: cola, sst2"):
        cli.main(["fit", "--config", str(config)])


def test_target_pattern_matching_nothing(tiny_bert_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_bert_dir, callback={"target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match=r"\['q_proj'\] matched no nn.Linear \(or Conv1D\) module.*query"):
        cli.main(["fit", "--config", str(config)])


def test_missing_data_file(tiny_bert_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_train.tsv"
    config = write_config(tmp_path, tiny_bert_dir, data={"train_file": str(missing)})
    with pytest.raises(FileNotFoundError, match=rf"{missing} does not exist; expected a GLUE SST-2 data file"):
        cli.main(["fit", "--config", str(config)])


def test_export_refuses_a_foreign_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not written by a sparse-lightning module"):
        cli.main(["export", "--ckpt_path", str(path), "--output", str(tmp_path / "out")])
