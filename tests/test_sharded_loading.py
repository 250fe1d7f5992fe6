"""Loading by shards (modules/sharded_loading.py): a model built on the meta device and filled from safetensors
slices is the model `from_pretrained` loads, in one process and on 2 FSDP2 ranks (every parameter, buffer, step
loss and trained delta equal to the full load's, bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from sparse_lightning.models import resolve_model_path
from sparse_lightning.modules import sharded_loading
from sparse_lightning.modules.sharded_loading import build_on_meta, checkpoint_files, load_shards

SCRIPT = Path(__file__).resolve().parent / "distributed_scripts" / "sharded_load_run.py"


@pytest.fixture(scope="module")
def odd_llama_dir(tmp_path_factory) -> Path:
    """Tied embeddings, rows that 2 ranks split unevenly (251 tokens, 67 FFN channels), saved as an index of
    several safetensors files."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=251, hidden_size=32, intermediate_size=67, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("odd-llama")
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_one_process_load_equals_from_pretrained(odd_llama_dir: Path, monkeypatch) -> None:
    """Built on meta (checkpoint weights only there), then filled a few rows per read: every tensor and dtype as
    from_pretrained's, rotary buffers included, and the embedding still tied."""
    monkeypatch.setattr(sharded_loading, "READ_BYTES", 1000)  # several blocks per tensor
    files = checkpoint_files(odd_llama_dir)
    model, plan = build_on_meta(AutoModelForCausalLM, odd_llama_dir, files, ())
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    load_shards(model, plan, torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(odd_llama_dir)
    loaded, expected = state(model), state(reference)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_new_head_is_initialised_as_from_pretrained_initialises_it(tiny_bert_dir: Path) -> None:
    """A BERT checkpoint without a classifier: the head gets from_pretrained's draws from the same seed."""
    torch.manual_seed(3)
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    torch.manual_seed(3)
    model, plan = build_on_meta(AutoModelForSequenceClassification, tiny_bert_dir, checkpoint_files(tiny_bert_dir),
                                ("classifier",), num_labels=2)
    assert not model.classifier.weight.is_meta and model.bert.embeddings.word_embeddings.weight.is_meta
    load_shards(model, plan, torch.device("cpu"))
    expected = state(reference)
    for name, tensor in state(model).items():
        assert torch.equal(tensor, expected[name]), name


def test_a_checkpoint_it_cannot_map_is_left_to_from_pretrained(odd_llama_dir: Path, tmp_path: Path) -> None:
    """No safetensors (a .bin directory), or a parameter whose key is not in the checkpoint outside the new heads:
    the caller loads in full instead of leaving a weight uninitialised."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((odd_llama_dir / "config.json").read_text())
    assert checkpoint_files(tmp_path / "bin") is None
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((odd_llama_dir / "config.json").read_text())
    tensors = {}
    for name in json.loads((odd_llama_dir / "model.safetensors.index.json").read_text())["weight_map"].values():
        tensors.update(load_file(odd_llama_dir / name))
    tensors["model.norm.gamma"] = tensors.pop("model.norm.weight")
    save_file(tensors, renamed / "model.safetensors")
    assert build_on_meta(AutoModelForCausalLM, renamed, checkpoint_files(renamed), ()) is None


def test_a_checkpoint_of_another_shape_is_refused(odd_llama_dir: Path, tmp_path: Path) -> None:
    config = json.loads((odd_llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 66}))
    files = {key: odd_llama_dir / path for key, path in checkpoint_files(odd_llama_dir).items()}
    model, plan = build_on_meta(AutoModelForCausalLM, tmp_path, files, ())
    with pytest.raises(ValueError, match=r"has shape \(67, 32\), the model expects \(66, 32\)"):
        load_shards(model, plan, torch.device("cpu"))


def shards_against_full(output: Path) -> list[tuple[dict, dict]]:
    return [tuple(torch.load(output / loader / f"rank{rank}.pt", weights_only=True) for loader in ("shards", "full"))
            for rank in range(2)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_two_fsdp2_ranks_loading_by_shards_train_what_the_full_load_trains(
        task: str, odd_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path, launch_ranks) -> None:
    """The LLaMA (index of files, uneven rows, tied embeddings) and BERT with a new classifier, random mask, 3 steps
    on 2 ranks: the sharded load builds on meta, and every gathered parameter, buffer, step loss and trained tensor
    equals the full load's."""
    model_dir = odd_llama_dir if task == "causal_lm" else tiny_bert_dir
    launch_ranks(SCRIPT, ["--model_dir", str(model_dir), "--task", task, "--output", str(tmp_path)],
                 f"the sharded-load runs ({task})", 300)
    for shards, full in shards_against_full(tmp_path):
        assert shards["built_on_meta"] and not full["built_on_meta"]
        for key in ("start_parameters", "start_buffers", "trained"):
            assert shards[key].keys() == full[key].keys()
            for name, tensor in full[key].items():
                assert torch.equal(shards[key][name], tensor), f"{key}: {name}"
        assert shards["local_parameter_dtypes"] == full["local_parameter_dtypes"]
        assert shards["losses"] == full["losses"] and len(full["losses"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("alias", "auto_class", "kwargs", "heads"), [
    ("all-MiniLM-L6-v2", AutoModelForSequenceClassification, {"num_labels": 2}, ("classifier",)),
    ("SmolLM2-135M-Instruct", AutoModelForCausalLM, {}, ()),
])
def test_the_real_models_load_by_shards_as_from_pretrained_loads_them(alias, auto_class, kwargs, heads) -> None:
    """MiniLM (a BertModel checkpoint: keys without the `bert.` prefix, a new classifier) and SmolLM2 (tied
    embeddings, rotary buffers): every tensor equal to from_pretrained's from the same seed."""
    path = resolve_model_path(alias)
    torch.manual_seed(0)
    reference = state(auto_class.from_pretrained(path, **kwargs))
    torch.manual_seed(0)
    built = build_on_meta(auto_class, path, checkpoint_files(path), heads, **kwargs)
    assert built is not None, f"{alias}: a checkpoint key did not map"
    model, plan = built
    load_shards(model, plan, torch.device("cpu"))
    loaded = state(model)
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
