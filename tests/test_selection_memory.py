"""Bounded-memory selection chooses exactly what the all-at-once dense sum chooses: SIFT's indices, and S2FT's
gradient scores.

The reference below is the selection as it was computed before memory was bounded: a full-size fp32 accumulator for
every target weight, every calibration batch's dense gradient added into it, then each weight's top-k of |sum|. The
library takes each top-k inside backward from one batch, and sums groups of layers in turn from several; both must
give the same index sets, bit for bit, on several families, with budgets that force one layer per group. S2FT's
gradient scores are checked the same way against summing every trained projection's `.grad` at once.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
)

from sparse_lightning.scoring import row_sharded_sums
from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.methods import select_by_gradient, sift
from sparse_lightning.modes import enable_activation_checkpointing
from sparse_lightning.scoring.row_sharded_sums import share_bytes
from sparse_lightning.scoring.score_groups import groups_within
from sparse_lightning.sparse import freeze_except, sparse_delta_layers
from sparse_lightning.structure import find_groups
from sparse_lightning.structure.families import base_linear
from sparse_lightning.structure.scores import gradient_scores, unit_norms_sq
from script_loading import load_script

pytestmark = pytest.mark.usefixtures("one_thread")

SELECTION_SCRIPT = Path(__file__).resolve().parent / "distributed_scripts" / "selection_run.py"

VOCAB = 96


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, num_labels=2)
        return BertForSequenceClassification(config).eval()
    config = {"llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
              "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
              "phi3": lambda: Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=0)}[family]()
    return AutoModelForCausalLM.from_config(config).eval()


def batches(family: str, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (2, 10), generator=generator)
        labels = torch.randint(0, 2, (2,), generator=generator) if family == "bert" else ids
        out.append({"input_ids": ids, "labels": labels})
    return out


def with_deltas(family: str, density: float = 0.05) -> nn.Module:
    model = tiny(family)
    GradientTopKCallback(density=density).attach(model)
    freeze_except(model, [])
    return model


def dense_sum_selection(model: nn.Module, calibration: list[dict], loss_fn) -> dict[str, torch.Tensor]:
    """The reference: every layer's fp32 sum at once, then top-k of |sum| (sorted flat positions)."""
    layers = sparse_delta_layers(model)
    sums = {name: torch.zeros(layer.weight_shape) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.weight_grad_observer = sums[name].add_
    for batch in calibration:
        loss_fn(batch).backward()
    for layer in layers.values():
        layer.weight_grad_observer = None
    model.zero_grad(set_to_none=True)
    return {name: torch.topk(sums[name].abs().view(-1), layers[name].k, sorted=False).indices.sort().values
            for name in layers}


def chosen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.delta_indices.long() for name, layer in sparse_delta_layers(model).items()}


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("count, score_memory", [(1, 0.125), (3, 1.0), (3, 0.3), (3, 1e-6)])
def test_selection_equals_the_dense_sum(family: str, count: int, score_memory: float) -> None:
    model = with_deltas(family)
    calibration = batches(family, count)
    reference_model = copy.deepcopy(model)
    reference = dense_sum_selection(reference_model, calibration, lambda batch: reference_model(**batch).loss)
    select_by_gradient(model, calibration, lambda batch: model(**batch).loss, score_memory=score_memory)
    got = chosen(model)
    assert got.keys() == reference.keys() and len(got) >= 8
    for name in reference:
        assert torch.equal(got[name], reference[name]), name
    assert all(bool(layer.delta_selected) for layer in sparse_delta_layers(model).values())
    assert all(p.grad is None for p in model.parameters())


def test_several_batches_run_once_per_group_of_layers() -> None:
    """A budget of one layer's worth of the total runs the batches once per group of that size, in model order."""
    model = with_deltas("llama")
    layers = sparse_delta_layers(model)
    sizes = {name: 4 * layer.weight_shape.numel() for name, layer in layers.items()}
    groups = groups_within(sizes, 0.2)
    assert 1 < len(groups) < len(layers) and [n for g in groups for n in g] == list(layers)
    assert all(sum(sizes[n] for n in g) <= 0.2 * sum(sizes.values()) for g in groups)
    calls = []

    def loss_fn(batch):
        calls.append(batch)
        return model(**batch).loss

    select_by_gradient(model, batches("llama", 2), loss_fn, score_memory=0.2)
    assert len(calls) == 2 * len(groups)


def test_one_batch_chooses_inside_backward_without_summing(monkeypatch) -> None:
    model = with_deltas("llama")
    reference_model = copy.deepcopy(model)
    calibration = batches("llama", 1)
    reference = dense_sum_selection(reference_model, calibration, lambda batch: reference_model(**batch).loss)

    def no_sum(*args, **kwargs):
        raise AssertionError("one calibration batch must not hold summed scores")

    monkeypatch.setattr(sift, "summed_top_k", no_sum)
    select_by_gradient(model, calibration, lambda batch: model(**batch).loss)
    assert all(torch.equal(chosen(model)[name], reference[name]) for name in reference)


@pytest.mark.parametrize("count", [1, 3])
def test_scoring_recomputes_every_layer_and_chooses_the_same(count: int) -> None:
    """Scoring passes checkpoint activations whether or not the model does (each block recomputed in backward, in
    eval mode: dropout off) and choose the same; afterwards the model trains without recomputation, as before."""
    model = with_deltas("llama")
    calibration = batches("llama", count)
    reference_model = copy.deepcopy(model)
    reference = dense_sum_selection(reference_model, calibration, lambda batch: reference_model(**batch).loss)
    model.train()
    runs, caching = [], []
    layer = model.model.layers[0]
    layer.mlp.register_forward_pre_hook(lambda module, args: runs.append(module.training))
    layer.register_forward_pre_hook(lambda module, args: caching.append(model.config.use_cache))
    select_by_gradient(model, calibration, lambda batch: model(**batch).loss, score_memory=1.0)
    assert runs == [False, False] * count  # forward, then its recomputation in backward; in eval mode
    assert caching == [False] * count  # no cache to give up, so transformers has nothing to warn about
    assert all(torch.equal(chosen(model)[name], reference[name]) for name in reference)
    assert layer.training and not layer.gradient_checkpointing and "_gradient_checkpointing_func" not in vars(layer)
    assert model.config.use_cache
    runs.clear()
    model(**calibration[0]).loss.backward()
    assert runs == [True]


def test_scoring_keeps_the_models_own_checkpointing() -> None:
    model = with_deltas("llama")
    enable_activation_checkpointing(model)
    layer = model.model.layers[0]
    function = layer._gradient_checkpointing_func
    select_by_gradient(model, batches("llama", 2), lambda batch: model(**batch).loss)
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func is function


class Twice(nn.Module):
    """One Linear applied twice per forward, one never: their scores are a sum and zero."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.other, self.unused = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(torch.tanh(self.shared(torch.tanh(self.shared(x))))).square().sum()


def test_a_layer_run_twice_in_one_batch_is_scored_by_its_summed_gradient() -> None:
    torch.manual_seed(0)
    model = Twice()
    GradientTopKCallback(density=0.2, target_modules=["shared", "other", "unused"]).attach(model)
    freeze_except(model, [])
    calibration = [torch.randn(4, 6)]
    reference_model = copy.deepcopy(model)
    reference = dense_sum_selection(reference_model, calibration, reference_model)
    select_by_gradient(model, calibration, model)
    got = chosen(model)
    assert all(torch.equal(got[name], reference[name]) for name in reference)


@pytest.mark.parametrize("score_memory", [0.0, -0.5, 1.5])
def test_score_memory_out_of_range_is_refused(score_memory: float) -> None:
    with pytest.raises(ValueError, match=r"score_memory must be in \(0, 1\]"):
        GradientTopKCallback(score_memory=score_memory)
    model = with_deltas("llama")
    with pytest.raises(ValueError, match=r"score_memory must be in \(0, 1\]"):
        select_by_gradient(model, batches("llama", 2), lambda batch: model(**batch).loss, score_memory=score_memory)
    assert not any(bool(layer.delta_selected) for layer in sparse_delta_layers(model).values())


def test_groups_keep_model_order_and_an_oversized_weight_alone() -> None:
    sizes = {"a": 10, "b": 10, "c": 60, "d": 10, "e": 10}
    assert groups_within(sizes, 0.2) == [["a", "b"], ["c"], ["d", "e"]]
    assert groups_within(sizes, 1.0) == [list(sizes)]
    assert groups_within(sizes, 1e-9) == [[name] for name in sizes]


def test_on_two_ranks_a_group_holds_half_the_bytes_and_the_same_weights() -> None:
    """Each rank's share of a sum is its rows (uneven rows round up), and the budget is a fraction of the rank's
    shares: the groups of one process, each holding about half its bytes per rank."""
    shapes = {name: torch.Size((rows, 4)) for name, rows in zip("abcdef", (6, 6, 5, 6, 6, 6))}
    one = {name: share_bytes(shape, 1) for name, shape in shapes.items()}
    two = {name: share_bytes(shape, 2) for name, shape in shapes.items()}
    assert list(one.values()) == [96, 96, 80, 96, 96, 96] and list(two.values()) == [48] * 6
    assert groups_within(one, 0.35) == groups_within(two, 0.35) == [["a", "b"], ["c", "d"], ["e", "f"]]


def test_canonical_top_k_breaks_ties_to_the_lower_position() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    assert canonical_top_k(scores, 3).tolist() == [1, 2, 3]
    assert torch.equal(row_sharded_sums.canonical_top_k(scores, 3), canonical_top_k(scores, 3))
    assert row_sharded_sums.canonical_top_k(scores, 0).numel() == 0


def all_at_once_gradient_scores(model: nn.Module, groups, roles, calibration, loss_fn) -> dict[str, torch.Tensor]:
    """The reference: every trained projection's `.grad` summed over the batches at once, then per-unit norms."""
    weights = {(g.owner, r): base_linear(model, g.roles[r]).weight for g in groups for r in roles if r in g.roles}
    model.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    for batch in calibration:
        loss_fn(batch).backward()
    grads = {key: w.grad.clone() for key, w in weights.items()}
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)
    return {g.owner: unit_norms_sq(g, {r: grads[(g.owner, r)] for r in roles if (g.owner, r) in grads}).sqrt()
            for g in groups}


@pytest.mark.parametrize("family, roles", [("llama", ["o", "v", "down", "up", "gate"]), ("phi3", ["o", "v", "down"])])
@pytest.mark.parametrize("count, score_memory", [(1, 0.125), (3, 1.0), (3, 0.3), (3, 1e-6)])
def test_s2ft_gradient_scores_equal_the_all_at_once_sum(family: str, roles: list[str], count: int,
                                                         score_memory: float) -> None:
    model = tiny(family)
    groups = find_groups(model)
    calibration = batches(family, count)
    reference_model = copy.deepcopy(model)
    reference = all_at_once_gradient_scores(reference_model, groups, roles, calibration,
                                            lambda batch: reference_model(**batch).loss)
    flags = [p.requires_grad for p in model.parameters()]
    calls = []

    def loss_fn(batch):
        calls.append(batch)
        return model(**batch).loss

    scores = gradient_scores(model, groups, roles, calibration, loss_fn, score_memory=score_memory)
    assert scores.keys() == reference.keys() and len(scores) == 4
    for owner in reference:
        assert torch.equal(scores[owner], reference[owner]), owner
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    if score_memory < 0.01:  # one weight per group: the batches ran once per distinct trained weight
        assert len(calls) == count * len({id(base_linear(model, g.roles[r]).weight)
                                          for g in groups for r in roles if r in g.roles})


@pytest.fixture(scope="module")
def selection_run() -> ModuleType:
    """tests/distributed_scripts/selection_run.py: its tiny model, each rank's batches and its settings."""
    return load_script(SELECTION_SCRIPT)


def canonical_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of a 1-D tensor, ties to the lower position (a stable sort), sorted."""
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


@pytest.mark.multiprocess
def test_every_rank_holds_the_dense_sum_selection(selection_run: ModuleType, launch_ranks, tmp_path: Path) -> None:
    """On 2 ranks, replicated and FSDP2-sharded, from 1 and 3 batches: every rank holds the same indices, those of one
    process summing both ranks' batches at once (interleaved, rank 0's first; the ranks sum each batch, then the
    batches, so the order of additions differs, and on this data no near-tie at a top-k boundary changes a set);
    S2FT's gradient scores are those of each rank's sum then the two, bit for bit; and a row-sharded sum holds only its
    rows (3 + 2 of 5, padded to 3) and picks the canonical top-k of the whole sum, ties to the lower position."""
    launch_ranks(SELECTION_SCRIPT, ["--output", str(tmp_path)], "the 2-rank selection", 300)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for count in selection_run.BATCH_COUNTS:
        model = selection_run.tiny_model()
        layers = sparse_delta_layers(model)
        sums = {name: torch.zeros(layer.weight_shape) for name, layer in layers.items()}
        for name, layer in layers.items():
            layer.weight_grad_observer = sums[name].add_
        for pair in zip(*(selection_run.rank_batches(rank, count) for rank in range(2))):
            for batch in pair:
                model(**batch).loss.backward()
        assert any(layer.weight_shape[0] % 2 for layer in layers.values())  # some rows split unevenly
        for name, layer in layers.items():
            expected = torch.topk(sums[name].abs().view(-1), layer.k, sorted=False).indices.sort().values
            for strategy in ("replicas", "fsdp2"):
                got = [results[rank][f"{strategy}-{count}"][name].long() for rank in range(2)]
                assert torch.equal(got[0], got[1]), (strategy, count, name)
                assert torch.equal(got[0], expected), (strategy, count, name)
        grads = []
        for rank in range(2):
            model = selection_run.tiny_base()
            groups = find_groups(model)
            model.requires_grad_(False)
            weights = {(g.owner, r): base_linear(model, g.roles[r]).weight for g in groups
                       for r in selection_run.S2FT_ROLES if r in g.roles}
            for weight in weights.values():
                weight.requires_grad_(True)
            for batch in selection_run.rank_batches(rank, count):
                model(**batch).loss.backward()
            grads.append({key: weight.grad for key, weight in weights.items()})
        for g in groups:
            summed = {r: grads[0][(g.owner, r)] + grads[1][(g.owner, r)] for r in selection_run.S2FT_ROLES
                      if (g.owner, r) in grads[0]}
            expected = unit_norms_sq(g, summed).sqrt()
            for rank in range(2):
                assert torch.equal(results[rank][f"s2ft-{count}"][g.owner], expected), (rank, count, g.owner)
    probes = [results[rank]["row-shards"] for rank in range(2)]
    whole = sum(selection_run.probe_gradient(rank, batch) for batch in range(2) for rank in range(2))
    assert [p["rows"] for p in probes] == [3, 3]
    assert torch.equal(torch.cat([p["own"] for p in probes]), whole)
    expected = canonical_top_k(whole.abs().view(-1), selection_run.PROBE_K)
    scores = whole.abs().view(-1)
    assert (scores >= scores[expected].min()).sum() > selection_run.PROBE_K  # ties cross the k-th place
    assert torch.equal(probes[0]["top_k"], expected) and torch.equal(probes[1]["top_k"], expected)
