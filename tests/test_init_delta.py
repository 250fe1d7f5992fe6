"""`init_delta` on fit: fine-tuning starts from an exported delta (ours or a PEFT SHiRA / Super-Tuning adapter) merged
into the base before the method attaches; a bad directory fails in one line and changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from datamodules.reasoning import MathDataModule
from sparse_lightning import cli
from sparse_lightning.callbacks import RandomMaskCallback
from sparse_lightning.export import DeltaFileError, apply_delta, export_checkpoint, export_model
from sparse_lightning.modules import CausalLMModule
from sparse_lightning.peft_interop import export_peft
from sparse_lightning.sparse import sparse_delta_layers

IDS = torch.tensor([[5, 17, 33, 90, 120, 7, 64, 201]])
TRAIN = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"The answer is {a + b}."}
         for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]


@pytest.fixture(scope="module")
def exported(tiny_lm_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """One random-mask delta with non-zero values, exported as our delta and as both PEFT formats."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir).eval()
    RandomMaskCallback(density=0.1).attach(model)
    for layer in sparse_delta_layers(model).values():
        layer.delta_values.data.normal_(0.0, 0.05)
    root = tmp_path_factory.mktemp("init-delta")
    export_model(model, root / "delta", base_model=str(tiny_lm_dir))
    export_peft(model, root / "peft", format="peft", base_model=str(tiny_lm_dir))
    export_peft(model, root / "peft-supertuning", format="peft-supertuning", base_model=str(tiny_lm_dir))
    return {name: root / name for name in ("delta", "peft", "peft-supertuning")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("math")
    (root / "dataset" / "AddSub").mkdir(parents=True)
    (root / "dataset" / "AddSub" / "test.json").write_text(json.dumps(
        [{"instruction": "Tom has 2 apples and gets 3 more. How many?", "input": "", "output": "", "answer": "5"}]))
    (root / "train.json").write_text(json.dumps(TRAIN * 4))
    return root


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


class FirstStepLogits(Callback):
    """The model's logits when training starts (after the method attached, before any step)."""

    def on_train_start(self, trainer: Trainer, pl_module: CausalLMModule) -> None:
        was_training = pl_module.model.training
        pl_module.model.eval()
        self.logits = logits(pl_module.model)
        pl_module.model.train(was_training)


def fit_from(tiny_lm_dir: Path, data_dir: Path, init_delta: Path, tmp_path: Path) -> tuple[Trainer, FirstStepLogits]:
    torch.set_num_threads(1)
    seen = FirstStepLogits()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[RandomMaskCallback(density=0.05), seen])
    data = MathDataModule(data_dir=str(data_dir), train_files="train.json", tokenizer_name_or_path=str(tiny_lm_dir),
                          eval_datasets=["AddSub"], max_length=64, batch_size=4, val_fraction=0.0)
    trainer.fit(CausalLMModule(str(tiny_lm_dir), init_delta=str(init_delta)), datamodule=data)
    return trainer, seen


@pytest.mark.parametrize("kind", ["delta", "peft", "peft-supertuning"])
def test_fit_starts_from_the_delta_predictions(exported, kind: str, tiny_lm_dir: Path, data_dir: Path,
                                               tmp_path: Path):
    base = LlamaForCausalLM.from_pretrained(tiny_lm_dir).eval()
    plain = logits(base)
    expected = logits(apply_delta(base, exported[kind]))
    _, seen = fit_from(tiny_lm_dir, data_dir, exported[kind], tmp_path)
    assert not torch.equal(expected, plain)
    assert torch.equal(seen.logits, expected)  # zero new deltas on base + init_delta: exactly its predictions


def test_the_export_of_such_a_run_names_its_init_delta(exported, tiny_lm_dir: Path, data_dir: Path, tmp_path: Path):
    trainer, _ = fit_from(tiny_lm_dir, data_dir, exported["delta"], tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    written = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "out")
    config = json.loads((written["delta"] / "delta_config.json").read_text())
    assert config["init_delta"] == str(exported["delta"])


def _corrupt(directory: Path, problem: str) -> None:
    config_path = directory / "delta_config.json"
    config = json.loads(config_path.read_text())
    name = next(iter(config["targets"]))
    if problem == "shape":
        config["targets"][name]["shape"] = [7, 7]
    elif problem == "name":
        config["targets"][name]["weight"] = "model.layers.9.mlp.up_proj.weight"
    elif problem == "non-finite":
        tensors = load_file(str(directory / "delta.safetensors"))
        tensors[f"{name}.values"][0] = float("nan")
        save_file(tensors, str(directory / "delta.safetensors"))
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("problem,message", [
    ("shape", "has shape"), ("name", "has no parameter"), ("non-finite", "non-finite"), ("missing", "no such")])
def test_a_bad_init_delta_fails_in_one_line_and_changes_nothing(exported, problem: str, message: str,
                                                                 tiny_lm_dir: Path, tmp_path: Path):
    directory = tmp_path / "bad"
    if problem != "missing":
        shutil.copytree(exported["delta"], directory)
        _corrupt(directory, problem)
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises((DeltaFileError, FileNotFoundError), match=message) as error:
        CausalLMModule(str(tiny_lm_dir), init_delta=str(directory))._merge_init_delta(model)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_a_delta_trained_on_another_base_name_warns(exported, tiny_lm_dir: Path, tmp_path: Path):
    directory = tmp_path / "renamed"
    shutil.copytree(exported["delta"], directory)
    config = json.loads((directory / "delta_config.json").read_text())
    (directory / "delta_config.json").write_text(json.dumps({**config, "base_model": "some/other-model"}))
    with pytest.warns(UserWarning, match="was trained on 'some/other-model'"):
        CausalLMModule(str(tiny_lm_dir), init_delta=str(directory))._merge_init_delta(
            LlamaForCausalLM.from_pretrained(tiny_lm_dir))


def test_the_cli_flag_reaches_the_module(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="init_delta .*no such directory"):
        cli.main(["fit", "--model", "sparse_lightning.modules.CausalLMModule",
                  "--model.model_name_or_path", str(tiny_lm_dir), "--model.init_delta", str(tmp_path / "nowhere"),
                  "--data", "datamodules.reasoning.MathDataModule", "--data.data_dir", str(data_dir),
                  "--data.train_files", "train.json", "--data.eval_datasets", "[AddSub]",
                  "--data.val_fraction", "0.0", "--trainer.max_steps", "1", "--trainer.logger", "false",
                  "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)])
