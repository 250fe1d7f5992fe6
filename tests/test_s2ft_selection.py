"""Each S2FT selection strategy picks what it says, on tiny GQA LLaMA models built to make the answer known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_lightning.methods import Calibration
from sparse_lightning.callbacks import S2FTStructureCallback
from sparse_lightning.structure import choose_units, find_groups
from sparse_lightning.structure.scores import activation_scores, weight_scores


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path)


def batches(count: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 256, (2, 9), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def selected_channels(model, layer: int = 0) -> list[int]:
    down = model.model.layers[layer].mlp.down_proj
    return sorted(down.delta_columns.tolist()) if hasattr(down, "delta_columns") else []


def selected_heads(model, layer: int = 0) -> list[int]:
    o_proj = model.model.layers[layer].self_attn.o_proj
    return sorted(set((o_proj.delta_columns // 8).tolist())) if hasattr(o_proj, "delta_columns") else []


def channels_only(**kwargs) -> S2FTStructureCallback:
    return S2FTStructureCallback(train=["down"], **kwargs)


@pytest.mark.parametrize("order, expected", [("largest", [5, 40]), ("smallest", [11, 20])])
def test_weight_norm_picks_the_largest_or_smallest_down_columns(tiny_llama_dir: Path, order, expected) -> None:
    model = load(tiny_llama_dir)
    with torch.no_grad():
        down = model.model.layers[0].mlp.down_proj.weight
        down[:, [5, 40]] *= 100
        down[:, [11, 20]] *= 0.01
    channels_only(num_channels=2, select_by="weight", order=order).attach(model)
    assert selected_channels(model) == expected


@pytest.mark.parametrize("order, expected", [("largest", [2, 3]), ("smallest", [0, 1])])
def test_activation_norm_picks_the_heads_with_the_largest_or_smallest_outputs(tiny_llama_dir: Path, order,
                                                                               expected) -> None:
    model = load(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[8:] *= 50  # KV head 1 feeds query heads 2 and 3
        model.model.layers[0].self_attn.o_proj.weight[:, :16] *= 100  # large weights do not matter here
    callback = S2FTStructureCallback(train=["o"], num_heads=2, select_by="activation", order=order)
    callback.attach(model, Calibration.from_batches(model, batches()))
    assert selected_heads(model) == expected


def test_weight_times_activation_is_the_product(tiny_llama_dir: Path) -> None:
    model = load(tiny_llama_dir)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 3] *= 40  # weight only
        mlp.up_proj.weight[7] *= 50  # activation only
        mlp.down_proj.weight[:, 9] *= 30  # both
        mlp.up_proj.weight[9] *= 30
    groups = [g for g in find_groups(model) if g.kind == "channels"][:1]
    weights = weight_scores(model, groups, ["down"])[groups[0].owner]
    activations = activation_scores(model, groups, batches(), lambda b: model(**b).loss)[groups[0].owner]
    assert (int(weights.argmax()), int(activations.argmax()), int((weights * activations).argmax())) == (3, 7, 9)
    channels_only(num_channels=1, select_by="weight_activation").attach(model, Calibration.from_batches(model, batches()))
    assert selected_channels(model) == [9]


def test_gradient_norm_matches_a_dense_reference(tiny_llama_dir: Path) -> None:
    reference = load(tiny_llama_dir)
    for batch in batches():
        reference(**batch).loss.backward()
    norms = reference.model.layers[1].mlp.down_proj.weight.grad.norm(dim=0)
    expected = sorted(torch.topk(norms, 4).indices.tolist())

    model = load(tiny_llama_dir)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    channels_only(num_channels=4, select_by="gradient").attach(model, Calibration.from_batches(model, batches()))
    assert selected_channels(model, layer=1) == expected
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradient behind
    after = {n: p.requires_grad for n, p in model.named_parameters() if "delta_" not in n and ".base." not in n}
    assert after == {n: flag for n, flag in flags.items() if n in after}  # flags restored (wrapped bases: frozen)


def test_random_is_seeded(tiny_llama_dir: Path) -> None:
    picks = []
    for seed in (0, 0, 1):
        model = load(tiny_llama_dir)
        channels_only(num_channels=6, seed=seed).attach(model)
        picks.append(selected_channels(model))
    assert picks[0] == picks[1] != picks[2]
    generator = torch.Generator().manual_seed(0)
    expected = sorted(torch.topk(torch.rand(64, generator=generator, dtype=torch.float64), 6).indices.tolist())
    assert picks[0] == expected


def test_global_allocation_moves_the_budget_to_the_best_layer(tiny_llama_dir: Path) -> None:
    model = load(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, :6] *= 100
    channels_only(num_channels=3, select_by="weight", allocation="global").attach(model)
    assert selected_channels(model, layer=0) == [] and selected_channels(model, layer=1) == [0, 1, 2, 3, 4, 5]
    assert not hasattr(model.model.layers[0].mlp, "s2ft_channel_order")  # an untouched layer is not permuted


def test_gqa_heads_mode_takes_whole_groups_then_the_best_heads_of_one_more(tiny_llama_dir: Path) -> None:
    group = find_groups(load(tiny_llama_dir))[0]  # 4 query heads in KV groups {0, 1} and {2, 3}
    scores = torch.tensor([1.0, 5.0, 4.0, 0.5])
    assert choose_units(group, scores, 1, "heads") == [1]
    assert choose_units(group, scores, 3, "heads") == [0, 1, 2]  # group {0, 1} sums 6 > 4.5
    assert choose_units(group, scores, 2, "groups") == [0, 1]


def test_data_driven_strategy_without_data_says_how_to_give_it(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs calibration batches: run it under Trainer.fit .* or pass calibration="):
        channels_only(select_by="activation").attach(load(tiny_llama_dir))


def test_selection_saved_to_a_file_is_reused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "selection.json"
    first = load(tiny_llama_dir)
    S2FTStructureCallback(num_heads=2, num_channels=5, select_by="activation", save_selection=str(path)).attach(
        first, Calibration.from_batches(first, batches()))
    saved = json.loads(path.read_text())
    assert saved["groups"]["model.layers.0.mlp"] == {"kind": "channels", "units": selected_channels(first)}
    assert saved["settings"]["select_by"] == "activation"

    second = load(tiny_llama_dir)
    S2FTStructureCallback(num_heads=2, num_channels=5, load_selection=str(path)).attach(second)  # no data needed
    for layer in (0, 1):
        assert selected_channels(second, layer) == selected_channels(first, layer)
        assert selected_heads(second, layer) == selected_heads(first, layer)
    first_buffers, second_buffers = dict(first.named_buffers()), dict(second.named_buffers())
    for name, buffer in first_buffers.items():
        if "s2ft" in name or "delta_" in name:
            assert torch.equal(second_buffers[name], buffer), name


def test_a_selection_file_for_another_model_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"format": "sparse_lightning.s2ft_selection/1",
                                "groups": {"encoder.layer.0": {"kind": "channels", "units": [1]}}}))
    with pytest.raises(ValueError, match="channels group 'encoder.layer.0' is not trained in this model"):
        channels_only(load_selection=str(path)).attach(load(tiny_llama_dir))


def test_a_loaded_selection_must_match_the_configured_budget(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "selection.json"
    first = load(tiny_llama_dir)
    channels_only(num_channels=5, select_by="weight", save_selection=str(path)).attach(first)
    with pytest.raises(ValueError, match="selects 5 FFN channels in model.layers.0.mlp but the budget asks for 3"):
        channels_only(num_channels=3, load_selection=str(path)).attach(load(tiny_llama_dir))
    channels_only(load_selection=str(path)).attach(load(tiny_llama_dir))  # no budget given: the file's counts


def test_a_selection_file_with_a_unit_twice_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"format": "sparse_lightning.s2ft_selection/1",
                                "groups": {"model.layers.0.mlp": {"kind": "channels", "units": [3, 1, 3]}}}))
    model = load(tiny_llama_dir)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="selects some units twice"):
        channels_only(load_selection=str(path)).attach(model)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
