"""PEFT interop (sparse_lightning/peft_interop.py): a trained delta exported as a PEFT SHiRA or Super-Tuning adapter
loads with `PeftModel.from_pretrained` and predicts what the trained model predicts; `merge_and_unload()` equals our
merged export; `apply_delta` reads PEFT's own sparse adapters back with the same checks as our files.

Rows: a sequence classifier (tiny BERT with its classifier head, trained densely: `modules_to_save`) and a causal LM
(tiny LLaMA with grouped-query attention), each trained by SIFT and by S2FT (the classifier also by the random mask),
each written in both formats. The slow
row repeats the SHiRA round trip on the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from sparse_lightning.callbacks import GradientTopKCallback, RandomMaskCallback, S2FTStructureCallback
from sparse_lightning.export import DeltaFileError, apply_delta, delta_tensors
from sparse_lightning.methods import Calibration
from sparse_lightning.methods.sift import select_by_gradient
from sparse_lightning.peft_interop import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PeftExportError,
    export_peft,
    pad_entries,
    supertuning_count,
    supertuning_sparsity,
)
from sparse_lightning.sparse import freeze_except

peft = pytest.importorskip("peft")
from peft import PeftModel, ShiraConfig, SupertuningConfig, get_peft_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FORMATS = {"peft": "SHIRA", "peft-supertuning": "SUPERTUNING"}
#: S2FT on both dimensions' kinds: heads (v rows, o columns) and FFN channels (up rows, down columns).
S2FT = {"train": ["o", "v", "down", "up"], "num_channels": 8, "select_by": "activation"}


def batch_for(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if kind == "cls":
        return {"input_ids": torch.randint(1000, 2000, (4, 10), generator=generator),
                "labels": torch.tensor([0, 1, 1, 0])}
    ids = torch.randint(0, 256, (4, 12), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def load_base(kind: str, directory: Path, dtype: torch.dtype | None = None):
    cls = AutoModelForSequenceClassification if kind == "cls" else AutoModelForCausalLM
    return cls.from_pretrained(directory, **({"dtype": dtype} if dtype else {})).eval()


def train(kind: str, method: str, base_dir: Path, steps: int = 3):
    """A few AdamW steps of `method` on `kind`'s tiny model, without a Trainer (the callbacks' algorithms)."""
    torch.manual_seed(0)
    model = load_base(kind, base_dir).train()
    batch = batch_for(kind)
    if method == "sift":
        GradientTopKCallback(density=0.05).attach(model)
        select_by_gradient(model, [batch], lambda b: model(**b).loss)
    elif method == "random_mask":
        RandomMaskCallback(density=0.05, seed=0).attach(model)
    else:
        S2FTStructureCallback(num_heads=1 if kind == "cls" else 2, **S2FT).attach(
            model, Calibration.from_batches(model, [batch]))
    freeze_except(model, ["classifier"] if kind == "cls" else [])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), batch["input_ids"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def state_differences(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    assert got.keys() == expected.keys()
    return [name for name, tensor in got.items() if not torch.equal(tensor, expected[name])]


@pytest.fixture(scope="module")
def base_dirs(tiny_bert_cls_dir: Path, tiny_lm_dir: Path) -> dict[str, Path]:
    return {"cls": tiny_bert_cls_dir, "lm": tiny_lm_dir}


@pytest.fixture(scope="module", params=[("cls", "sift"), ("cls", "s2ft"), ("cls", "random_mask"), ("lm", "sift"),
                                        ("lm", "s2ft")], ids=lambda p: "-".join(p))
def trained(request, base_dirs) -> SimpleNamespace:
    kind, method = request.param
    model, ids = train(kind, method, base_dirs[kind])
    return SimpleNamespace(kind=kind, method=method, model=model, ids=ids, base=base_dirs[kind],
                           expected=logits(model, ids))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_peft_loads_the_adapter_and_predicts_what_the_trained_model_predicts(trained, fmt: str, tmp_path: Path):
    written = export_peft(trained.model, tmp_path / "adapter", format=fmt, merged=True, base_model=str(trained.base))
    assert set(written) == {"peft", "merged"}
    peft_model = PeftModel.from_pretrained(load_base(trained.kind, trained.base), written["peft"]).eval()
    assert peft_model.peft_config["default"].peft_type.value == FORMATS[fmt]
    merged = load_base(trained.kind, written["merged"])
    got, ours = logits(peft_model, trained.ids), logits(merged, trained.ids)
    assert torch.equal(got, ours), f"PEFT vs our merged export: max abs diff {(got - ours).abs().max():.3g}"
    if trained.method != "s2ft":  # the element-sparse forward is a merged-weight matmul too: bit for bit
        assert torch.equal(got, trained.expected), f"max abs diff {(got - trained.expected).abs().max():.3g}"
    else:  # S2FT's own forward (a co-permuted weight plus its block as a second matmul) rounds differently from any
        # merged weight, ours included: measured 7.5e-9 (tiny BERT) and 1.4e-6 (tiny LLaMA, logits up to ~3)
        torch.testing.assert_close(got, trained.expected, rtol=0, atol=1e-5)
    assert state_differences(peft_model.merge_and_unload().state_dict(), merged.state_dict()) == []
    assert torch.equal(logits(trained.model, trained.ids), trained.expected)  # the model passed in is unchanged


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_apply_delta_reads_the_exported_adapter_back_bit_for_bit(trained, fmt: str, tmp_path: Path):
    written = export_peft(trained.model, tmp_path / "adapter", format=fmt, merged=True, base_model=str(trained.base))
    rebuilt = apply_delta(load_base(trained.kind, trained.base), written["peft"])
    assert state_differences(rebuilt.state_dict(), load_base(trained.kind, written["merged"]).state_dict()) == []


def trained_count(target: dict) -> int:
    """Entries a target trains: k, or an S2FT block's size times the other dimension."""
    out_features, in_features = target["shape"]
    kind = target.get("kind", "entries")
    return target["k"] if kind == "entries" else target["size"] * (out_features if kind == "columns" else in_features)


def test_shira_files_have_peft_names_shapes_and_the_smallest_r(trained, tmp_path: Path):
    out = export_peft(trained.model, tmp_path / "adapter", base_model=str(trained.base))["peft"]
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    ours, targets = delta_tensors(trained.model)
    assert config["peft_type"] == "SHIRA" and config["base_model_name_or_path"] == str(trained.base)
    assert config["task_type"] == ("SEQ_CLS" if trained.kind == "cls" else "CAUSAL_LM")
    assert config["target_modules"] == sorted(targets)  # exact module names
    assert config["modules_to_save"] == (["classifier"] if trained.kind == "cls" else None)
    r = config["r"]
    counts = {name: trained_count(target) for name, target in targets.items()}
    assert all(counts[name] <= r * sum(t["shape"]) for name, t in targets.items())
    assert any(counts[name] > (r - 1) * sum(t["shape"]) for name, t in targets.items())  # r - 1 would not hold one
    dense = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} if trained.kind == "cls" else set()
    assert set(tensors) == dense | {f"base_model.model.{name}.{leaf}" for name in targets
                                    for leaf in ("shira_indices", "shira_weight")}
    for name, target in targets.items():
        out_features, in_features = target["shape"]
        indices, values = tensors[f"base_model.model.{name}.shira_indices"], tensors[f"base_model.model.{name}.shira_weight"]
        assert indices.dtype == torch.int32 and indices.shape == (2, r * (out_features + in_features))
        assert values.dtype == torch.float32 and values.shape == (r * (out_features + in_features),)
        flat = indices[0].long() * in_features + indices[1].long()
        assert flat.unique().numel() == flat.numel() and int(flat.max()) < out_features * in_features
        # the trained entries with their values, and zero padding everywhere else
        dense_delta = torch.zeros(out_features * in_features).index_put_((flat,), values)
        expected = torch.zeros(out_features, in_features)
        if target.get("kind", "entries") == "entries":
            expected.view(-1)[ours[f"{name}.indices"].long()] = ours[f"{name}.values"]
        elif target["kind"] == "columns":
            expected[:, ours[f"{name}.columns"]] = ours[f"{name}.block"]
        else:
            expected[ours[f"{name}.rows"]] = ours[f"{name}.block"]
        assert torch.equal(dense_delta.view(out_features, in_features), expected), name
        assert int((values != 0).sum()) <= counts[name]


def test_padding_takes_distinct_unused_positions():
    flat, values = pad_entries(torch.tensor([0, 2, 3, 9]), torch.tensor([1.0, 2.0, 3.0, 4.0]), 8)
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 6, 9] and values.tolist() == [1, 0, 2, 3, 0, 0, 0, 4]


def test_supertuning_sparsity_is_the_largest_that_holds_every_weight():
    numels, counts = {"a": 1536 * 576, "b": 576 * 576, "c": 7}, {"a": 4424, "b": 1660, "c": 1}
    sparsity = supertuning_sparsity(numels, counts)
    assert all(supertuning_count(numels[n], sparsity) >= counts[n] for n in numels)
    bigger = math.nextafter(sparsity, 1.0)
    assert any(supertuning_count(numels[n], bigger) < counts[n] for n in numels)
    assert json.loads(json.dumps(sparsity)) == sparsity  # the config round-trips it exactly


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bf16_base_merges_like_ours(base_dirs, fmt: str, tmp_path: Path):
    """SHiRA: PEFT adds the fp32 values onto the bf16 weight in fp32 and rounds once, as we do: bit-identical merged
    weights, and PEFT's forward predicts what our merged export predicts. Super-Tuning: PEFT rounds the values to
    bf16 before adding (two roundings), so some merged entries differ from ours by that one rounding of the value."""
    model, _ = train("lm", "sift", base_dirs["lm"])
    ids = batch_for("lm")["input_ids"]
    model.to(torch.bfloat16)  # the deltas stay fp32
    written = export_peft(model, tmp_path / "adapter", format=fmt, merged=True, base_model=str(base_dirs["lm"]))
    merged = load_base("lm", written["merged"], torch.bfloat16)
    ours = merged.state_dict()
    peft_model = PeftModel.from_pretrained(load_base("lm", base_dirs["lm"], torch.bfloat16), written["peft"]).eval()
    got = logits(peft_model, ids)
    theirs = peft_model.merge_and_unload().state_dict()
    assert all(tensor.dtype == torch.bfloat16 for tensor in theirs.values() if tensor.is_floating_point())
    differ = state_differences(theirs, ours)
    if fmt == "peft":
        assert differ == [] and torch.equal(got, logits(merged, ids))
    else:
        base = load_base("lm", base_dirs["lm"], torch.bfloat16).state_dict()
        eps = torch.finfo(torch.bfloat16).eps
        for name in differ:
            a, b, value = theirs[name].float(), ours[name].float(), (ours[name].float() - base[name].float()).abs()
            bound = eps * (value + torch.maximum(a.abs(), b.abs()))  # one rounding of the value and of the sum
            assert bool(((a - b).abs() <= bound).all()), name
    rebuilt = apply_delta(load_base("lm", base_dirs["lm"], torch.bfloat16), written["peft"]).state_dict()
    assert state_differences(rebuilt, ours) == []  # our import rounds once, whichever format


def test_gpt2_conv1d_is_refused(tmp_path: Path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    GradientTopKCallback(density=0.05).attach(model)
    with pytest.raises(PeftExportError, match="Conv1D.*nn.Linear only"):
        export_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_shira_refuses_an_r_a_weight_cannot_hold_and_supertuning_takes_it(base_dirs, tmp_path: Path):
    """One dense-ish target forces a global r that another weight cannot hold: refused with the way out."""
    model = load_base("lm", base_dirs["lm"])
    from sparse_lightning.sparse import attach_sparse_deltas, sparse_delta_layers

    attach_sparse_deltas(model, {"model.layers.0.mlp.down_proj": 1800, "model.layers.0.self_attn.k_proj": 10})
    for layer in sparse_delta_layers(model).values():
        layer.set_indices(torch.arange(layer.k, dtype=layer.delta_indices.dtype))
        layer.delta_values.data.normal_()
    with pytest.raises(PeftExportError, match=r"one global r.*k_proj.*--format peft-supertuning"):
        export_peft(model, tmp_path / "shira")
    ids = batch_for("lm")["input_ids"]
    written = export_peft(model, tmp_path / "st", format="peft-supertuning")
    peft_model = PeftModel.from_pretrained(load_base("lm", base_dirs["lm"]), written["peft"]).eval()
    assert torch.equal(logits(peft_model, ids), logits(model, ids))


def test_full_fine_tuning_is_refused(base_dirs, tmp_path: Path):
    with pytest.raises(PeftExportError, match="not a sparse delta"):
        export_peft(load_base("cls", base_dirs["cls"]), tmp_path / "adapter")


# ------------------------------------------------------------------------------------------------- import


def peft_made_adapter(kind: str, base_dir: Path, config, output: Path) -> Path:
    """An adapter PEFT itself trained and saved (non-zero values: init_weights=False)."""
    torch.manual_seed(1)
    peft_model = get_peft_model(load_base(kind, base_dir), config)
    peft_model.save_pretrained(output)
    return output


PEFT_CONFIGS = {
    "shira": lambda: ShiraConfig(r=2, target_modules=["query", "value", "output.dense"], init_weights=False,
                                 task_type="SEQ_CLS", random_seed=3),
    "supertuning": lambda: SupertuningConfig(sparsity=0.9, target_modules=["query", "value"], init_weights=False,
                                             task_type="SEQ_CLS"),
    "supertuning-no-indices": lambda: SupertuningConfig(sparsity=0.9, target_modules=["key"], init_weights=False,
                                                        task_type="SEQ_CLS", save_precomputed_indices=False),
}


@pytest.mark.parametrize("which", list(PEFT_CONFIGS))
def test_apply_delta_on_a_peft_made_adapter_equals_peft_merge(base_dirs, which: str, tmp_path: Path):
    adapter = peft_made_adapter("cls", base_dirs["cls"], PEFT_CONFIGS[which](), tmp_path / "adapter")
    reference = PeftModel.from_pretrained(load_base("cls", base_dirs["cls"]), adapter).merge_and_unload()
    ours = apply_delta(load_base("cls", base_dirs["cls"]), adapter)
    assert state_differences(ours.state_dict(), reference.state_dict()) == []
    assert state_differences(ours.state_dict(), load_base("cls", base_dirs["cls"]).state_dict())  # it did change


def corrupt(path: Path, key_suffix: str, change) -> None:
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    key = next(k for k in tensors if k.endswith(key_suffix))
    result = change(tensors, key)
    save_file(tensors if result is None else result, str(path / ADAPTER_WEIGHTS))


def set_value(tensors, key, fill):
    tensors[key] = tensors[key].clone()
    fill(tensors[key])


CORRUPTIONS = {
    "row out of range": ("query.shira_indices", lambda t, k: set_value(t, k, lambda x: x[0].__setitem__(0, 32)),
                         "position outside the \\[32, 32\\] weight"),
    "negative column": ("query.shira_indices", lambda t, k: set_value(t, k, lambda x: x[1].__setitem__(0, -1)),
                        "position outside"),
    "repeated position": ("query.shira_indices", lambda t, k: set_value(t, k, lambda x: x[:, 1].copy_(x[:, 0])),
                          "repeats a position"),
    "NaN value": ("value.shira_weight", lambda t, k: set_value(t, k, lambda x: x.__setitem__(3, float("nan"))),
                  "1 non-finite value"),
    "short values": ("value.shira_weight", lambda t, k: t.__setitem__(k, t[k][:-1].clone()),
                     "1-D floating-point tensor of 128 values"),
    "float indices": ("query.shira_indices", lambda t, k: t.__setitem__(k, t[k].float()), "must be an integer tensor"),
    "missing tensor": ("value.shira_weight", lambda t, k: t.__delitem__(k), "is missing"),
    "unknown module": ("value.shira_weight", lambda t, k: t.__setitem__(k.replace("value", "valve"), t[k].clone()),
                       "no module .*valve"),
    "classifier shape": ("classifier.weight", lambda t, k: t.__setitem__(k, t[k][:, :-1].clone()),
                         "classifier.weight.* has torch.float32 \\[2, 31\\]"),
}


@pytest.mark.parametrize("problem", list(CORRUPTIONS))
def test_a_bad_peft_adapter_is_refused_and_the_model_left_unchanged(base_dirs, problem: str, tmp_path: Path):
    config = ShiraConfig(r=2, target_modules=["query", "value"], init_weights=False, task_type="SEQ_CLS")
    adapter = peft_made_adapter("cls", base_dirs["cls"], config, tmp_path / "adapter")
    suffix, change, message = CORRUPTIONS[problem]
    corrupt(adapter, suffix, change)
    model = load_base("cls", base_dirs["cls"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(DeltaFileError, match=message) as error:
        apply_delta(model, adapter)
    assert "the model was not changed" in str(error.value) and str(adapter) in str(error.value)
    assert state_differences(model.state_dict(), before) == []


@pytest.mark.parametrize("problem", ["lora", "supra", "pickle", "json"])
def test_a_peft_adapter_of_another_kind_is_refused(base_dirs, problem: str, tmp_path: Path):
    adapter = peft_made_adapter("cls", base_dirs["cls"], ShiraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"),
                                tmp_path / "adapter")
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if problem == "lora":
        config["peft_type"], message = "LORA", "'LORA' is not a sparse adapter"
    elif problem == "supra":
        config.update(peft_type="SUPERTUNING", r=4, sparsity=0.9)
        message = "Supra"
    elif problem == "pickle":
        (adapter / ADAPTER_WEIGHTS).rename(adapter / "adapter_model.bin")
        message = "adapter_model.bin is a pickle"
    else:
        (adapter / ADAPTER_CONFIG).write_text("{not json")
    if problem != "json":
        (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    else:
        message = "not valid JSON"
    model = load_base("cls", base_dirs["cls"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(DeltaFileError, match=message):
        apply_delta(model, adapter)
    assert state_differences(model.state_dict(), before) == []


# ------------------------------------------------------------------------------------------------- command line


def test_export_command_writes_a_peft_adapter_from_a_checkpoint(contract, tiny_bert_cls_dir: Path, tmp_path: Path):
    from sparse_lightning.cli import main

    module, _ = contract.run(tiny_bert_cls_dir, tmp_path / "run", "sift")
    for fmt in FORMATS:
        output = tmp_path / fmt
        main(["export", "--ckpt_path", str(tmp_path / "run" / "last.ckpt"), "--output", str(output),
              "--format", fmt, "--merged", "true"])
        assert {p.name for p in output.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "merged"}
        peft_model = PeftModel.from_pretrained(load_base("cls", tiny_bert_cls_dir), output).eval()
        ids = batch_for("cls")["input_ids"]
        assert torch.equal(logits(peft_model, ids), logits(module.model.eval(), ids))
        assert torch.equal(logits(load_base("cls", output / "merged"), ids), logits(peft_model, ids))


def test_export_command_refuses_an_unknown_format(tmp_path: Path):
    from sparse_lightning.cli import main
    from sparse_lightning.usage_errors import UsageError

    with pytest.raises(UsageError, match=r"^sparse-lightning export: argument --format: invalid choice: 'lora'"):
        main(["export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--output", str(tmp_path / "o"), "--format", "lora"])


# ------------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_sift_round_trips_through_peft(tmp_path: Path):
    from sparse_lightning.models import resolve_model_path

    base_dir = resolve_model_path("SmolLM2-135M-Instruct")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    GradientTopKCallback(density=0.001).attach(model)
    select_by_gradient(model, [{"input_ids": ids, "labels": ids}], lambda b: model(**b).loss)
    freeze_except(model, [])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    expected = logits(model, ids)
    written = export_peft(model, tmp_path / "adapter", merged=True, base_model="SmolLM2-135M-Instruct")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), written["peft"]).eval()
    got = logits(peft_model, ids)
    assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max():.3g}"
    merged = AutoModelForCausalLM.from_pretrained(written["merged"]).state_dict()
    assert state_differences(peft_model.merge_and_unload().state_dict(), merged) == []
    shutil.rmtree(tmp_path / "adapter")
