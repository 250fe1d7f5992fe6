"""Invariant 5: S2FT's co-permutation leaves outputs unchanged (BERT and GQA LLaMA), and is undone exactly;
the structures and the callback reject what they cannot honour with errors that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from sparse_lightning.callbacks import S2FTStructureCallback
from sparse_lightning.export import apply_delta, export_delta
from sparse_lightning.sparse import merge_and_unwrap
from sparse_lightning.sparse.block import block_delta_layers
from sparse_lightning.structure import find_groups, permute_group, restore_original_layout, selection_order


def load_llama(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def load_bert(path: Path):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def inputs(vocab: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padding matters for attention
    return {"input_ids": torch.randint(0, vocab, (3, 12)), "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_groups_of_a_gqa_llama(tiny_llama_dir: Path) -> None:
    groups = find_groups(load_llama(tiny_llama_dir))
    assert [(g.kind, g.layer) for g in groups] == [("heads", 0), ("channels", 0), ("heads", 1), ("channels", 1)]
    heads, channels = groups[0], groups[1]
    assert (heads.num_units, heads.unit_size, heads.group_size) == (4, 8, 2)
    assert heads.owner == "model.layers.0.self_attn" and heads.roles["o"] == "model.layers.0.self_attn.o_proj"
    assert (channels.num_units, channels.owner) == (64, "model.layers.0.mlp")
    assert set(channels.roles) == {"gate", "up", "down"}


def test_groups_of_bert(tiny_bert_dir: Path) -> None:
    groups = find_groups(load_bert(tiny_bert_dir))
    heads, channels = groups[0], groups[1]
    assert (heads.num_units, heads.unit_size, heads.group_size) == (4, 8, 1)
    assert heads.roles["o"] == "bert.encoder.layer.0.attention.output.dense"
    assert channels.owner == "bert.encoder.layer.0" and channels.roles == {
        "up": "bert.encoder.layer.0.intermediate.dense", "down": "bert.encoder.layer.0.output.dense"}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_permuting_every_group_preserves_outputs_and_restores_bit_for_bit(family, tiny_llama_dir, tiny_bert_dir):
    model = load_llama(tiny_llama_dir) if family == "llama" else load_bert(tiny_bert_dir)
    batch = inputs(256)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    expected = logits(model, batch)
    generator = torch.Generator().manual_seed(0)
    for group in find_groups(model):
        if group.kind == "heads":  # reversed: KV groups swap, and heads swap within each group
            order = torch.arange(group.num_units).flip(0)
        else:
            order = torch.randperm(group.num_units, generator=generator)
        assert not torch.equal(order, torch.arange(group.num_units))
        permute_group(model, group, order)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, original[name])]
    assert len(moved) >= 10  # the weights really moved
    got = logits(model, batch)
    assert (got - expected).abs().max() <= 1e-5
    restore_original_layout(model)
    assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())
    assert not [name for name, _ in model.named_buffers() if "s2ft" in name]


def test_an_order_moving_a_query_head_out_of_its_kv_group_is_refused(tiny_llama_dir: Path) -> None:
    model = load_llama(tiny_llama_dir)
    group = find_groups(model)[0]
    with pytest.raises(ValueError, match="moves a query head out of its KV group"):
        permute_group(model, group, torch.tensor([0, 2, 1, 3]))


def test_selection_order_puts_the_selection_first_and_keeps_kv_groups(tiny_llama_dir: Path) -> None:
    group = find_groups(load_llama(tiny_llama_dir))[0]  # 4 heads, groups {0, 1} and {2, 3}
    assert selection_order(group, [3]).tolist() == [3, 2, 0, 1]
    assert selection_order(group, [1, 2, 3]).tolist() == [2, 3, 1, 0]
    with pytest.raises(ValueError, match="fill 2 KV groups partially"):
        selection_order(group, [0, 2])


@pytest.mark.parametrize("gqa, num_heads", [("groups", 2), ("heads", 1), ("heads", 3)])
def test_callback_with_every_projection_preserves_outputs(tiny_llama_dir: Path, gqa: str, num_heads: int) -> None:
    model, reference = load_llama(tiny_llama_dir), load_llama(tiny_llama_dir)
    callback = S2FTStructureCallback(num_heads=num_heads, num_channels=5, train=["o", "v", "down", "up", "gate"],
                                     gqa=gqa, select_by="random", seed=3)
    callback.attach(model)
    batch = inputs(256)
    assert (logits(model, batch) - logits(reference, batch)).abs().max() <= 1e-5
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.delta_block.shape == (32, num_heads * 8)
    v_proj = model.model.layers[0].self_attn.v_proj
    assert v_proj.delta_block.shape == (-(-num_heads // 2) * 8, 32)  # the KV heads of the selected groups


def test_unknown_architecture_names_what_was_looked_for() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match=r"no coupled structure for model_type 'gpt2'.*q_proj.*attention\.self\.query"):
        S2FTStructureCallback().attach(model)


@pytest.mark.parametrize("kwargs, message", [
    ({"head_ratio": 0.0}, r"head_ratio must be in \(0, 1\]"),
    ({"channel_ratio": 1.5}, r"channel_ratio must be in \(0, 1\]"),
    ({"num_heads": 0}, "num_heads must be a positive integer"),
    ({"head_ratio": 0.5, "num_heads": 2}, "head_ratio or num_heads, not both"),
    ({"train": ["q"]}, "q and k are not offered"),
    ({"train": ["down"], "num_heads": 1}, "head budget is set but train=.*has no head projection"),
    ({"select_by": "magnitude"}, "select_by must be one of"),
    ({"gqa": "kv"}, "gqa must be one of"),
    ({"calibration_batches": 0}, "calibration_batches must be >= 1"),
])
def test_bad_settings_are_rejected_at_construction(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        S2FTStructureCallback(**kwargs)


def test_more_heads_than_exist(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="num_heads=6 but model.layers.0.self_attn has 4 query heads per layer"):
        S2FTStructureCallback(num_heads=6).attach(load_llama(tiny_llama_dir))


def test_head_count_that_splits_a_kv_group(tiny_llama_dir: Path) -> None:
    message = (r"groups of 2; with gqa='groups' .* multiple of 2, got 3: "
               r"set num_heads to one of \[2, 4\] or use gqa='heads'")
    with pytest.raises(ValueError, match=message):
        S2FTStructureCallback(num_heads=3).attach(load_llama(tiny_llama_dir))


def test_gqa_config_that_cannot_be_honoured(tiny_llama_dir: Path) -> None:
    model = load_llama(tiny_llama_dir)
    model.config.num_key_value_heads = 3  # 4 query heads cannot share 3 KV heads
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        S2FTStructureCallback().attach(model)


def test_a_projection_the_family_lacks(tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"bert blocks have no \['gate'\] projection; choose train among"):
        S2FTStructureCallback(train=["down", "gate"]).attach(load_bert(tiny_bert_dir))


@pytest.mark.parametrize("gqa, num_heads", [("groups", 2), ("heads", 3)])
def test_gqa_delta_exports_in_original_coordinates(tiny_llama_dir: Path, tmp_path: Path, gqa: str,
                                                   num_heads: int) -> None:
    """Trained (here: random) blocks on every projection; the un-permuted merged model, the delta applied to a
    fresh base, and the trained model all predict the same."""
    model = load_llama(tiny_llama_dir)
    S2FTStructureCallback(num_heads=num_heads, num_channels=6, train=["o", "v", "down", "up", "gate"], gqa=gqa,
                          seed=1).attach(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in block_delta_layers(model).values():
            layer.delta_block.normal_(0, 0.05)
    batch = inputs(256)
    expected = logits(model, batch)
    export_delta(model, tmp_path, {"method": "s2ft"}, dense=[])
    restore_original_layout(merge_and_unwrap(model))
    assert (logits(model, batch) - expected).abs().max() <= 1e-5
    base = load_llama(tiny_llama_dir)
    apply_delta(base, tmp_path)
    merged = model.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, merged[name]), name
