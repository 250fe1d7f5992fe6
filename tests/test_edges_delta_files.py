"""Issue 11, item 2: `apply_delta` checks the whole delta directory before it changes anything.

Each corruption below is put into the *last* target (or the dense part), so a loader that applied target by target
would already have changed the earlier weights when it hit it: the model's state must be bitwise unchanged after the
error, and the message must name the file, the tensor and the problem.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from sparse_lightning.export import DELTA_CONFIG, DELTA_WEIGHTS, FORMAT, DeltaFileError, apply_delta

ENTRY_TARGETS = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value")]
COLUMN_TARGET = "bert.encoder.layer.1.output.dense"  # [32, 64]: an S2FT block on 5 original-layout columns
ROW_TARGET = "bert.encoder.layer.1.intermediate.dense"  # [64, 32]: a block on 3 rows
K = 40


def load_base(model_dir: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=dtype)


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def delta_dir(tiny_bert_dir: Path, tmp_path_factory) -> Path:
    """A valid delta in the exported format: entries on 6 weights, a column and a row block, a dense classifier."""
    generator = torch.Generator().manual_seed(0)
    tensors, targets = {}, {}
    for name in ENTRY_TARGETS:
        tensors[f"{name}.indices"] = torch.randperm(32 * 32, generator=generator)[:K].sort().values.to(torch.int32)
        tensors[f"{name}.values"] = torch.randn(K, generator=generator) * 1e-2
        targets[name] = {"shape": [32, 32], "k": K, "weight": f"{name}.weight"}
    tensors[f"{COLUMN_TARGET}.columns"] = torch.tensor([3, 60, 7, 12, 40])
    tensors[f"{COLUMN_TARGET}.block"] = torch.randn(32, 5, generator=generator) * 1e-2
    targets[COLUMN_TARGET] = {"shape": [32, 64], "kind": "columns", "size": 5, "weight": f"{COLUMN_TARGET}.weight"}
    tensors[f"{ROW_TARGET}.rows"] = torch.tensor([63, 0, 17])
    tensors[f"{ROW_TARGET}.block"] = torch.randn(3, 32, generator=generator) * 1e-2
    targets[ROW_TARGET] = {"shape": [64, 32], "kind": "rows", "size": 3, "weight": f"{ROW_TARGET}.weight"}
    tensors["classifier.weight"] = torch.randn(2, 32, generator=generator)
    tensors["classifier.bias"] = torch.randn(2, generator=generator)
    path = tmp_path_factory.mktemp("delta")
    save_file(tensors, str(path / DELTA_WEIGHTS))
    config = {"format": FORMAT, "method": "sift", "base_model": str(tiny_bert_dir), "targets": targets,
              "dense": ["classifier.weight", "classifier.bias"]}
    (path / DELTA_CONFIG).write_text(json.dumps(config))
    return path


def test_a_valid_delta_applies_exactly(delta_dir: Path, tiny_bert_dir: Path) -> None:
    model = load_base(tiny_bert_dir)
    before = state(model)
    apply_delta(model, delta_dir)
    tensors = load_file(str(delta_dir / DELTA_WEIGHTS))
    params = dict(model.named_parameters())
    for name in ENTRY_TARGETS:
        expected = before[f"{name}.weight"].view(-1).index_add(0, tensors[f"{name}.indices"].long(),
                                                               tensors[f"{name}.values"])
        assert torch.equal(params[f"{name}.weight"].view(-1), expected), name
    expected = before[f"{COLUMN_TARGET}.weight"].index_add(1, tensors[f"{COLUMN_TARGET}.columns"],
                                                           tensors[f"{COLUMN_TARGET}.block"])
    assert torch.equal(params[f"{COLUMN_TARGET}.weight"], expected)
    expected = before[f"{ROW_TARGET}.weight"].index_add(0, tensors[f"{ROW_TARGET}.rows"], tensors[f"{ROW_TARGET}.block"])
    assert torch.equal(params[f"{ROW_TARGET}.weight"], expected)
    assert torch.equal(params["classifier.weight"], tensors["classifier.weight"])


def test_a_bf16_base_gets_the_delta_added_in_fp32_and_rounded_once(delta_dir: Path, tiny_bert_dir: Path) -> None:
    """Item 11: rounding the delta to bf16 and then the sum differs from PEFT's merge; one rounding does not."""
    model = load_base(tiny_bert_dir, torch.bfloat16)
    before = state(model)
    apply_delta(model, delta_dir)
    tensors = load_file(str(delta_dir / DELTA_WEIGHTS))
    params = dict(model.named_parameters())
    for name in ENTRY_TARGETS:
        dense = torch.zeros(32 * 32).index_add(0, tensors[f"{name}.indices"].long(), tensors[f"{name}.values"])
        once = (before[f"{name}.weight"].view(-1).float() + dense).to(torch.bfloat16)
        assert torch.equal(params[f"{name}.weight"].view(-1), once), name
    block = torch.zeros(32, 64).index_add(1, tensors[f"{COLUMN_TARGET}.columns"], tensors[f"{COLUMN_TARGET}.block"])
    once = (before[f"{COLUMN_TARGET}.weight"].float() + block).to(torch.bfloat16)
    assert torch.equal(params[f"{COLUMN_TARGET}.weight"], once)


Corruption = Callable[[dict, dict], None]  # edits (config, tensors) in place
LAST = ENTRY_TARGETS[-1]


def set_tensor(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Corruption:
    return lambda config, tensors: tensors.__setitem__(key, make(tensors[key]))


def poke(tensor: torch.Tensor, position: int, value) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[position] = value
    return tensor


CORRUPTIONS: dict[str, tuple[Corruption, str, str]] = {  # id: (corruption, file, expected message)
    "index out of range": (set_tensor(f"{LAST}.indices", lambda t: poke(t, -1, 32 * 32)), DELTA_WEIGHTS,
                           rf"tensor '{LAST}.indices' has an index outside \[0, 1024\)"),
    "negative index": (set_tensor(f"{LAST}.indices", lambda t: poke(t, 0, -1)), DELTA_WEIGHTS,
                       rf"tensor '{LAST}.indices' has an index outside"),
    "duplicate index": (set_tensor(f"{LAST}.indices", lambda t: poke(t, 1, int(t[0]))), DELTA_WEIGHTS,
                        rf"tensor '{LAST}.indices' repeats a position"),
    "values shorter than indices": (set_tensor(f"{LAST}.values", lambda t: t[:-3].clone()), DELTA_WEIGHTS,
                                    rf"tensor '{LAST}.values' holds {K - 3} values for {K} indices"),
    "missing values": (lambda config, tensors: tensors.pop(f"{LAST}.values"), DELTA_WEIGHTS,
                       rf"tensor '{LAST}.values' is missing"),
    "NaN value": (set_tensor(f"{LAST}.values", lambda t: poke(t, 5, float("nan"))), DELTA_WEIGHTS,
                  rf"tensor '{LAST}.values' holds 1 non-finite value"),
    "Inf in a dense tensor": (set_tensor("classifier.bias", lambda t: poke(t, 1, float("inf"))), DELTA_WEIGHTS,
                              r"tensor 'classifier.bias' holds 1 non-finite value"),
    "float indices": (set_tensor(f"{LAST}.indices", lambda t: t.float()), DELTA_WEIGHTS,
                      rf"tensor '{LAST}.indices' must be a 1-D integer tensor"),
    "wrong format": (lambda config, tensors: config.update(format="peft.lora/1"), DELTA_CONFIG,
                     r"format 'peft.lora/1' is not a sparse-lightning delta"),
    "unsupported version": (lambda config, tensors: config.update(format="sparse_lightning.delta/2"), DELTA_CONFIG,
                            r"format version '2' is not supported"),
    "shape disagrees": (lambda config, tensors: config["targets"][LAST].update(shape=[32, 33]), DELTA_CONFIG,
                        rf"target '{LAST}': {LAST}.weight has shape \[32, 32\] in this model, the delta says \[32, 33\]"),
    "target not in the model": (lambda config, tensors: config["targets"][LAST].update(weight="bert.nope.weight"),
                                DELTA_CONFIG, r"this model has no parameter 'bert.nope.weight'"),
    "unknown dense name": (lambda config, tensors: config["dense"].append("classifier.nope"), DELTA_CONFIG,
                           r"dense parameter 'classifier.nope' does not exist"),
    "column out of range": (set_tensor(f"{COLUMN_TARGET}.columns", lambda t: poke(t, 2, 64)), DELTA_WEIGHTS,
                            rf"tensor '{COLUMN_TARGET}.columns' has an index outside \[0, 64\)"),
    "duplicate row": (set_tensor(f"{ROW_TARGET}.rows", lambda t: poke(t, 2, 63)), DELTA_WEIGHTS,
                      rf"tensor '{ROW_TARGET}.rows' repeats a position"),
    "block shape": (set_tensor(f"{ROW_TARGET}.block", lambda t: t[:2].clone()), DELTA_WEIGHTS,
                    rf"tensor '{ROW_TARGET}.block' has shape \[2, 32\], expected \[3, 32\]"),
    "k disagrees": (lambda config, tensors: config["targets"][LAST].update(k=K + 1), DELTA_WEIGHTS,
                    rf"target '{LAST}': {K} indices, the config says k={K + 1}"),
    "unknown kind": (lambda config, tensors: config["targets"][LAST].update(kind="diagonal"), DELTA_CONFIG,
                     rf"target '{LAST}': unknown kind 'diagonal'"),
    "extra tensor": (lambda config, tensors: tensors.__setitem__("bert.pooler.dense.weight", torch.zeros(32, 32)),
                     DELTA_WEIGHTS, r"tensor 'bert.pooler.dense.weight' is not described by delta_config.json"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_delta_is_refused_and_the_model_is_unchanged(corruption: str, delta_dir: Path, tiny_bert_dir: Path,
                                                               tmp_path: Path) -> None:
    corrupt, file, message = CORRUPTIONS[corruption]
    broken = tmp_path / "delta"
    shutil.copytree(delta_dir, broken)
    config = json.loads((broken / DELTA_CONFIG).read_text())
    tensors = load_file(str(broken / DELTA_WEIGHTS))
    corrupt(config, tensors)
    (broken / DELTA_CONFIG).write_text(json.dumps(config))
    save_file(tensors, str(broken / DELTA_WEIGHTS))

    model = load_base(tiny_bert_dir)
    before = state(model)
    with pytest.raises(DeltaFileError, match=message) as error:
        apply_delta(model, broken)
    assert str(error.value).startswith(f"{broken / file}: ") and "model was not changed" in str(error.value)
    after = state(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{corruption}: {name} changed"


@pytest.mark.parametrize("damage", ["truncated safetensors", "invalid JSON", "missing config"])
def test_unreadable_delta_files_are_refused(damage: str, delta_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "delta"
    shutil.copytree(delta_dir, broken)
    if damage == "truncated safetensors":
        data = (broken / DELTA_WEIGHTS).read_bytes()
        (broken / DELTA_WEIGHTS).write_bytes(data[: len(data) // 2])
        message = rf"{broken / DELTA_WEIGHTS}: not a readable safetensors file"
    elif damage == "invalid JSON":
        (broken / DELTA_CONFIG).write_text("{'format': ")
        message = rf"{broken / DELTA_CONFIG}: not valid JSON"
    else:
        (broken / DELTA_CONFIG).unlink()
        message = rf"{broken / DELTA_CONFIG}: no such file"
    model = load_base(tiny_bert_dir)
    before = state(model)
    with pytest.raises(DeltaFileError, match=message):
        apply_delta(model, broken)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
