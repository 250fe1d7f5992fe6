"""`init_delta` on a base loaded by shards (modules/row_updates.py): each rank adds the delta's entries in its own rows
as it reads them, and the model equals `from_pretrained` + `apply_delta` bit for bit: our delta directories (an
init_delta chain of entries, a dense parameter and S2FT blocks), PEFT SHiRA and Super-Tuning adapters (one without
saved indices, chosen from the base's magnitudes), on the plain and the S2FT co-permuted meta model, in one process
and on 2 FSDP2 ranks with uneven rows, and LoRA's `modules_to_save` copies of a meta module. A bad delta still fails
in one line and leaves nothing deferred; base + delta past the weight's dtype in one rank's rows stops every rank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sparse_lightning.callbacks import RandomMaskCallback
from sparse_lightning.export import DeltaFileError, apply_delta, export_model
from sparse_lightning.methods.s2ft import S2FT
from sparse_lightning.modules import CausalLMModule, sharded_loading
from sparse_lightning.modules.sharded_loading import (
    build_on_meta,
    checkpoint_files,
    load_shards,
)
from sparse_lightning.peft_interop import export_peft

SCRIPT = Path(__file__).resolve().parent / "distributed_scripts" / "sharded_load_run.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def trained_values(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def deltas(odd_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """`chain`: S2FT blocks (rows and columns) recorded as trained from `entries` (random-mask entries, and every
    parameter outside the targets dense: attaching freezes nothing, so the tied embedding and the norms are replaced
    whole), so applying it applies both; `shira` and `supertuning`: the entries as PEFT adapters (the dense ones in
    `modules_to_save`), the latter without saved indices (PEFT then picks the base's largest magnitudes)."""
    root = tmp_path_factory.mktemp("init-deltas")
    torch.manual_seed(0)
    entries = AutoModelForCausalLM.from_pretrained(odd_llama_dir)
    RandomMaskCallback(density=0.1).attach(entries)
    trained_values(entries, 1)
    export_model(entries, root / "entries", base_model=str(odd_llama_dir))
    export_peft(entries, root / "shira", format="peft", base_model=str(odd_llama_dir))
    export_peft(entries, root / "supertuning", format="peft-supertuning", base_model=str(odd_llama_dir))
    config_path = root / "supertuning" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "save_precomputed_indices": False}))
    tensors = load_file(root / "supertuning" / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("supertuning_indices")},
              root / "supertuning" / "adapter_model.safetensors")
    blocks = AutoModelForCausalLM.from_pretrained(odd_llama_dir)
    S2FT(num_heads=2, num_channels=7, train=["o", "v", "down", "up"], seed=4).attach(blocks)
    trained_values(blocks, 2)
    export_model(blocks, root / "chain", base_model=str(odd_llama_dir))
    config_path = root / "chain" / "delta_config.json"
    config = json.loads(config_path.read_text())
    assert {target["kind"] for target in config["targets"].values()} == {"rows", "columns"}
    config_path.write_text(json.dumps({**config, "init_delta": str(root / "entries")}))
    return {name: root / name for name in ("entries", "chain", "shira", "supertuning")}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def s2ft_random(model: torch.nn.Module) -> None:
    S2FT(num_heads=2, num_channels=5, train=["o", "v", "down", "up"], seed=3).attach(model)


def s2ft_by_weight(model: torch.nn.Module) -> None:
    """Weight norms of base + init_delta: read whole, one layer at a time, with the deferred entries added."""
    S2FT(num_heads=2, num_channels=5, train=["o", "v", "down", "up"], select_by="weight").attach(model)


@pytest.mark.parametrize("attach", [None, s2ft_random, s2ft_by_weight], ids=["plain", "s2ft", "s2ft_weight"])
@pytest.mark.parametrize("kind", ["chain", "shira", "supertuning"])
def test_deferred_init_delta_loads_as_the_whole_merge(kind: str, attach, deltas, odd_llama_dir: Path,
                                                      monkeypatch) -> None:
    """Built on meta, init_delta deferred, (S2FT co-permutes the meta model,) rows read a few at a time with the
    entries added: every tensor equals from_pretrained + apply_delta (+ the same S2FT)."""
    monkeypatch.setattr(sharded_loading, "READ_BYTES", 1000)
    model, plan = build_on_meta(AutoModelForCausalLM, odd_llama_dir, checkpoint_files(odd_llama_dir), ())
    apply_delta(model, deltas[kind], plan.defer)
    assert plan.updates and all(p.is_meta for p in model.parameters())
    reference = apply_delta(AutoModelForCausalLM.from_pretrained(odd_llama_dir), deltas[kind])
    assert not torch.equal(reference.model.layers[0].mlp.up_proj.weight,
                           AutoModelForCausalLM.from_pretrained(odd_llama_dir).model.layers[0].mlp.up_proj.weight)
    if attach is not None:
        attach(model)
        attach(reference)
    load_shards(model, plan, torch.device("cpu"))
    loaded, expected = state(model), state(reference)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("kind", ["entries", "chain"])
def test_a_bad_init_delta_on_a_meta_base_fails_in_one_line_and_defers_nothing(kind: str, deltas, odd_llama_dir: Path,
                                                                             tmp_path: Path) -> None:
    """A target of the wrong shape (in the delta itself, or in the chain's second directory after the first was
    handed over): one line naming the file, no update kept, no real tensor changed."""
    bad = tmp_path / kind
    shutil.copytree(deltas[kind], bad)
    config = json.loads((bad / "delta_config.json").read_text())
    config["targets"][next(iter(config["targets"]))]["shape"] = [7, 7]
    (bad / "delta_config.json").write_text(json.dumps(config))
    model, plan = build_on_meta(AutoModelForCausalLM, odd_llama_dir, checkpoint_files(odd_llama_dir), ())
    before = {name: t.clone() for name, t in state(model).items() if not t.is_meta}
    module = CausalLMModule(str(odd_llama_dir), init_delta=str(bad))
    module._sharded_load = plan
    with pytest.raises(DeltaFileError, match=r"delta_config\.json: target .* has shape") as error:
        module._merge_init_delta(model)
    assert "\n" not in str(error.value) and str(bad) in str(error.value)
    assert not plan.updates and not module._init_delta_merged
    assert all(torch.equal(before[name], t) for name, t in state(model).items() if not t.is_meta)


def test_an_init_delta_that_overflows_a_rank_s_rows_is_refused_while_loading(deltas, odd_llama_dir: Path,
                                                                             tmp_path: Path) -> None:
    """Values finite in fp32 but past fp16's range on an fp16 base: the base values are read only when loading, so
    that is where it is refused, naming the file and the weight."""
    bad = tmp_path / "huge"
    shutil.copytree(deltas["entries"], bad)
    tensors = load_file(bad / "delta.safetensors")
    name = next(key for key in tensors if key.endswith(".values"))
    tensors[name][0] = 1e6
    save_file(tensors, bad / "delta.safetensors")
    model, plan = build_on_meta(AutoModelForCausalLM, odd_llama_dir, checkpoint_files(odd_llama_dir), (),
                                dtype=torch.float16)
    apply_delta(model, bad, plan.defer)
    weight = name.removesuffix(".values") + ".weight"
    with pytest.raises(DeltaFileError, match=rf"delta\.safetensors: adding it would make 1 entries of "
                                             rf"{weight} non-finite in float16") as error:
        load_shards(model, plan, torch.device("cpu"))
    assert "\n" not in str(error.value)
    with pytest.raises(DeltaFileError, match="non-finite in float16"):  # the whole merge refuses it too
        apply_delta(AutoModelForCausalLM.from_pretrained(odd_llama_dir, dtype=torch.float16), bad)


def test_a_meta_base_without_a_loader_to_defer_to_is_refused(deltas, odd_llama_dir: Path) -> None:
    model, _ = build_on_meta(AutoModelForCausalLM, odd_llama_dir, checkpoint_files(odd_llama_dir), ())
    with pytest.raises(ValueError, match="weights are on the meta device"):
        apply_delta(model, deltas["entries"])


@pytest.mark.multiprocess
@pytest.mark.parametrize(("method", "kind"), [("random_mask", "chain"), ("s2ft", "chain"), ("s2ft", "shira")])
def test_two_fsdp2_ranks_load_init_delta_by_shards_as_the_whole_merge(method: str, kind: str, deltas,
                                                                     odd_llama_dir: Path, tmp_path: Path,
                                                                     launch_ranks) -> None:
    """2 ranks, rows split unevenly (251 and 67 rows), fitted from init_delta: the sharded run builds on meta and
    adds each rank's entries (S2FT: through its co-permutation), and every gathered parameter, buffer, step loss and
    trained tensor equals the run that loads the whole model on each rank and merges init_delta into it, and the
    base fingerprint a delta checkpoint records (the base before init_delta) is the same."""
    launch_ranks(SCRIPT, ["--model_dir", str(odd_llama_dir), "--task", "causal_lm", "--method", method,
                          "--init_delta", str(deltas[kind]), "--output", str(tmp_path)],
                 f"the sharded-load runs from init_delta ({method}, {kind})", 300)
    for rank in range(2):
        shards, full = (torch.load(tmp_path / loader / f"rank{rank}.pt", weights_only=True)
                        for loader in ("shards", "full"))
        assert shards["built_on_meta"] and not full["built_on_meta"]
        assert shards["init_delta_merged"] and full["init_delta_merged"]
        assert shards["base_fingerprint"] == full["base_fingerprint"]  # a delta checkpoint resumes onto either
        for key in ("start_parameters", "start_buffers", "trained"):
            assert shards[key].keys() == full[key].keys()
            for name, tensor in full[key].items():
                assert torch.equal(shards[key][name], tensor), f"{key}: {name}"
        assert shards["losses"] == full["losses"] and len(full["losses"]) == 3
    base = AutoModelForCausalLM.from_pretrained(odd_llama_dir).model.norm.weight
    assert not torch.equal(full["start_parameters"]["model.norm.weight"], base)  # init_delta's dense norm landed


@pytest.mark.multiprocess
def test_an_init_delta_overflowing_one_rank_s_rows_stops_every_rank(deltas, odd_llama_dir: Path, tmp_path: Path,
                                                                   launch_ranks) -> None:
    """A value past fp16's range in a row only rank 1 reads: both ranks raise the same one-line error (none is left
    waiting in a collective), as both do when each merges it into the whole model."""
    bad = tmp_path / "huge"
    shutil.copytree(deltas["entries"], bad)
    tensors = load_file(bad / "delta.safetensors")
    name = "model.layers.1.mlp.up_proj"  # [67, 32]: rank 0 reads rows 0..33, rank 1 rows 34..66
    flat = tensors[f"{name}.indices"].long()
    last = int(flat.argmax())
    assert int(flat[last]) // 32 >= 34
    tensors[f"{name}.values"][last] = 1e6
    save_file(tensors, bad / "delta.safetensors")
    launch_ranks(SCRIPT, ["--model_dir", str(odd_llama_dir), "--task", "causal_lm", "--init_delta", str(bad),
                          "--dtype", "float16", "--output", str(tmp_path / "out")], "an overflowing init_delta", 300)
    for loader in ("shards", "full"):
        for rank in range(2):
            error = torch.load(tmp_path / "out" / loader / f"rank{rank}.pt", weights_only=True)["error"]
            assert f"{bad / 'delta.safetensors'}: adding it would make 1 entries of {name}.weight non-finite in " \
                   "float16" in error and "\n" not in error, (loader, rank, error)


def test_lora_copies_of_a_meta_module_get_its_init_delta_too(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """BERT with a new classifier and LoRA's `modules_to_save` copy of the pooler: the delta's new-head values are
    written at once (the head is real), its pooler entries wait for the load, and PEFT's copy of the still-meta
    pooler gets them too (`ShardedLoad.follow_copies`): every tensor equals LoRA on from_pretrained + apply_delta."""
    from transformers import AutoModelForSequenceClassification

    from sparse_lightning.modules.lora import LoRASettings, saved_module_copies
    from sparse_lightning.modules.prepare import prepare_model

    torch.manual_seed(0)
    trained = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).requires_grad_(False)
    RandomMaskCallback(density=0.1, target_modules=["pooler.dense", "query"]).attach(trained)
    trained.classifier.weight.requires_grad_(True)
    export_model(trained_values(trained, 1), tmp_path / "delta", base_model=str(tiny_bert_dir))
    settings = LoRASettings(r=4, target_modules=["query", "value"], modules_to_save=["pooler"])

    torch.manual_seed(3)
    model, plan = build_on_meta(AutoModelForSequenceClassification, tiny_bert_dir, checkpoint_files(tiny_bert_dir),
                                ("classifier",), num_labels=2)
    apply_delta(model, tmp_path / "delta", plan.defer)
    assert {plan.sources[holder] for holder in plan.updates} >= {"pooler.dense.weight"}
    torch.manual_seed(5)
    model = prepare_model(model, settings, heads=("classifier",))
    plan.follow_copies(saved_module_copies(model))
    load_shards(model, plan, torch.device("cpu"))
    torch.manual_seed(3)
    reference = apply_delta(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2),
                            tmp_path / "delta")
    torch.manual_seed(5)
    reference = prepare_model(reference, settings, heads=("classifier",))
    loaded, expected = state(model), state(reference)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    copy = next(copy for _, copy in saved_module_copies(model) if isinstance(copy, torch.nn.Linear))
    assert not torch.equal(copy.weight, AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2).bert.pooler.dense.weight)
