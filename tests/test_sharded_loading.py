"""Loading by shards (modules/sharded_loading.py): a model built on the meta device and filled from safetensors
slices is the model `from_pretrained` loads, in one process and on 2 FSDP2 ranks (every parameter, buffer, step
loss and trained delta equal to the full load's, bit for bit), with the random mask, S2FT (co-permuted on the meta
model, permuted rows read) and LoRA."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from sparse_lightning.callbacks import S2FTStructureCallback
from sparse_lightning.methods.s2ft import S2FT
from sparse_lightning.models import resolve_model_path
from sparse_lightning.modules import sharded_loading
from sparse_lightning.modules.fsdp2 import end_units
from sparse_lightning.modules.lora import LoRASettings, apply_lora
from sparse_lightning.modules.sharded_loading import build_on_meta, checkpoint_files, load_shards
from sparse_lightning.registry import names

SCRIPT = Path(__file__).resolve().parent / "distributed_scripts" / "sharded_load_run.py"


@pytest.fixture(scope="module")
def untied_llama_dir(tmp_path_factory) -> Path:
    """The odd LLaMA with an untied head: the embedding and the head are FSDP2 units of their own."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=251, hidden_size=32, intermediate_size=67, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("untied-llama")
    LlamaForCausalLM(config).save_pretrained(path)
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


def attach_s2ft(model: torch.nn.Module) -> torch.nn.Module:
    """Heads (o columns, v rows of 2 KV heads) and channels (down columns, up rows of 67)."""
    S2FT(num_heads=2, num_channels=5, train=["o", "v", "down", "up"], seed=3).attach(model)
    return model


def attach_s2ft_by_weight(model: torch.nn.Module) -> torch.nn.Module:
    """Units chosen by weight norm: on the meta model each layer's weights are read from the checkpoint in turn."""
    S2FT(num_heads=2, num_channels=5, train=["o", "v", "down", "up"], select_by="weight").attach(model)
    return model


def attach_lora(model: torch.nn.Module) -> torch.nn.Module:
    return apply_lora(model, LoRASettings(r=4), ["q_proj", "v_proj", "down_proj"], [])


@pytest.mark.parametrize("attach", [attach_s2ft, attach_s2ft_by_weight, attach_lora], ids=["s2ft", "s2ft_weight", "lora"])
def test_a_method_attached_on_the_meta_model_gives_the_full_loads_model(attach, odd_llama_dir: Path,
                                                                        monkeypatch) -> None:
    """S2FT co-permutes the meta model (only its order records hold values) and the loader reads the permuted rows
    and columns; LoRA's adapters keep the values PEFT draws: every tensor equals attaching to from_pretrained's model
    from the same seed."""
    monkeypatch.setattr(sharded_loading, "READ_BYTES", 1000)
    model, plan = build_on_meta(AutoModelForCausalLM, odd_llama_dir, checkpoint_files(odd_llama_dir), ())
    reference = AutoModelForCausalLM.from_pretrained(odd_llama_dir)
    torch.manual_seed(5)
    model = attach(model)
    torch.manual_seed(5)
    reference = attach(reference)
    load_shards(model, plan, torch.device("cpu"))
    loaded, expected = state(model), state(reference)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_s2ft_loads_by_shards_only_when_its_selection_reads_no_weight(tmp_path: Path) -> None:
    """A random or loaded selection needs shapes only, weight norms read a layer at a time from the checkpoint;
    calibration passes run the whole model."""
    selection = tmp_path / "selection.json"
    assert S2FTStructureCallback().attaches_from_shapes
    assert S2FTStructureCallback(select_by="weight").attaches_from_shapes
    assert S2FTStructureCallback(select_by="gradient", load_selection=str(selection)).attaches_from_shapes
    for select_by in ("activation", "weight_activation", "gradient"):
        assert not S2FTStructureCallback(select_by=select_by).attaches_from_shapes


def test_s2ft_scoring_data_under_fsdp2_says_each_rank_loads_whole_and_what_loads_by_shards(tmp_path: Path) -> None:
    fsdp2 = SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.warns(UserWarning, match=r"select_by='activation' .* every rank loads the whole base .* "
                                         r"\(save_selection\) .* \(load_selection\)"):
        S2FTStructureCallback(select_by="activation").setup(fsdp2, None, "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S2FTStructureCallback(select_by="activation", load_selection=str(tmp_path / "s.json")).setup(fsdp2, None, "fit")
        S2FTStructureCallback(select_by="activation").setup(SimpleNamespace(strategy=None), None, "fit")


def test_weight_norms_on_a_meta_model_without_a_checkpoint_are_refused(odd_llama_dir: Path) -> None:
    config = AutoModelForCausalLM.from_pretrained(odd_llama_dir).config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(RuntimeError, match="no checkpoint tensor to read its values from"):
        attach_s2ft_by_weight(model)


def test_a_meta_tensor_without_a_checkpoint_key_is_refused(odd_llama_dir: Path) -> None:
    """Whatever leaves a parameter on meta that the checkpoint does not fill is an error, not uninitialised memory."""
    model, plan = build_on_meta(AutoModelForCausalLM, odd_llama_dir, checkpoint_files(odd_llama_dir), ())
    model.model.layers[0].mlp.extra = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(RuntimeError, match=r"no checkpoint tensor for model\.layers\.0\.mlp\.extra\.weight"):
        load_shards(model, plan, torch.device("cpu"))


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


#: One method per layout the loader fills on a meta model: k entries chosen without data, co-permuted dense slices
#: (S2FT's structured methods), LoRA's adapters.
LAYOUTS = [names(element_sparse=True, data_driven=False, reselects=False)[0], *names(structured=True), "lora"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", LAYOUTS)
@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_two_fsdp2_ranks_loading_by_shards_train_what_the_full_load_trains(
        task: str, method: str, odd_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path, launch_ranks) -> None:
    """The LLaMA (index of files, uneven rows, tied embeddings) and BERT with a new classifier, 3 steps on 2 ranks
    with the random mask, S2FT (permuted rows and columns, BERT's biases) or LoRA (BERT: a dense classifier and a
    pooler copied from the meta model): the sharded load builds on meta, and every gathered parameter, buffer, step
    loss and trained tensor equals the full load's."""
    model_dir = odd_llama_dir if task == "causal_lm" else tiny_bert_dir
    launch_ranks(SCRIPT, ["--model_dir", str(model_dir), "--task", task, "--method", method, "--output", str(tmp_path)],
                 f"the sharded-load runs ({task}, {method})", 300)
    for shards, full in shards_against_full(tmp_path):
        assert shards["built_on_meta"] and not full["built_on_meta"]
        for key in ("start_parameters", "start_buffers", "trained"):
            assert shards[key].keys() == full[key].keys()
            for name, tensor in full[key].items():
                assert torch.equal(shards[key][name], tensor), f"{key}: {name}"
        assert shards["local_parameter_dtypes"] == full["local_parameter_dtypes"]
        assert shards["losses"] == full["losses"] and len(full["losses"]) == 3


def test_an_untied_embedding_and_head_are_units_of_their_own(odd_llama_dir: Path, untied_llama_dir: Path,
                                                             tiny_bert_dir: Path) -> None:
    """In the root unit they would stay gathered for the whole step; a tied weight stays in the root, and BERT's
    embedding is inside its `BertEmbeddings` block unit."""
    untied = AutoModelForCausalLM.from_pretrained(untied_llama_dir)
    assert end_units(untied) == [untied.model.embed_tokens, untied.lm_head]
    assert end_units(AutoModelForCausalLM.from_pretrained(odd_llama_dir)) == []
    assert end_units(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)) == []


@pytest.mark.multiprocess
def test_two_fsdp2_ranks_choosing_s2ft_units_by_weight_norm_load_by_shards(odd_llama_dir: Path, tmp_path: Path,
                                                                           launch_ranks) -> None:
    """S2FT by weight norm on the meta model reads one layer's weights at a time from the checkpoint: the same units,
    permutation and training as choosing on the whole loaded model."""
    launch_ranks(SCRIPT, ["--model_dir", str(odd_llama_dir), "--task", "causal_lm", "--method", "s2ft",
                          "--select_by", "weight", "--output", str(tmp_path)], "the sharded-load runs (S2FT by weight)", 300)
    for shards, full in shards_against_full(tmp_path):
        assert shards["built_on_meta"] and not full["built_on_meta"]
        for key in ("start_parameters", "start_buffers", "trained"):
            assert shards[key].keys() == full[key].keys()
            for name, tensor in full[key].items():
                assert torch.equal(shards[key][name], tensor), f"{key}: {name}"
        assert shards["losses"] == full["losses"] and len(full["losses"]) == 3


@pytest.mark.multiprocess
def test_two_fsdp2_ranks_with_an_untied_head_load_and_train_by_shards(untied_llama_dir: Path, tmp_path: Path,
                                                                      launch_ranks) -> None:
    """The embedding and the head sharded as their own units: loading by shards still equals the full load."""
    launch_ranks(SCRIPT, ["--model_dir", str(untied_llama_dir), "--task", "causal_lm", "--output", str(tmp_path)],
                 "the sharded-load runs (untied head)", 300)
    for shards, full in shards_against_full(tmp_path):
        assert {"model.embed_tokens", "lm_head"} <= set(shards["fsdp_units"])
        for key in ("start_parameters", "trained"):
            for name, tensor in full[key].items():
                assert torch.equal(shards[key][name], tensor), f"{key}: {name}"
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
