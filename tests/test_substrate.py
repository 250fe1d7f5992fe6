"""DESIGN.md invariants 1-4 and 8 on a small layer against a dense reference."""

import pytest
import torch
from torch import nn

from sparse_lightning.sparse import SparseDeltaLinear, allocate_budget, merge_and_unwrap
from sparse_lightning.sparse.delta import random_indices, validate_budget


def make_layer(k=7, out_features=6, in_features=5, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias)
    layer = SparseDeltaLinear(base, k)
    layer.set_indices(torch.randperm(out_features * in_features)[:k].sort().values)
    return layer


def test_zero_delta_reproduces_base_exactly():
    layer = make_layer()
    x = torch.randn(3, 4, 5)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("path", ["sampled", "observed"])
@pytest.mark.parametrize("unsorted", [False, True])
def test_values_gradient_equals_dense_gradient_at_indices(path, unsorted):
    layer = make_layer()
    with torch.no_grad():
        layer.delta_values.normal_()
        if unsorted:  # SpIEL's slots point anywhere after regrowth; the sampled product must not assume order
            layer.delta_indices.copy_(layer.delta_indices.flip(0))
    observed = []
    if path == "observed":
        layer.weight_grad_observer = observed.append
    x = torch.randn(3, 4, 5, requires_grad=True)
    target = torch.randn(3, 4, 6)
    ((layer(x) - target) ** 2).sum().backward()

    dense_weight = layer.base.weight.detach().clone()
    dense_weight.view(-1)[layer.delta_indices.long()] += layer.delta_values.detach()
    dense_weight.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ((nn.functional.linear(x_ref, dense_weight, layer.base.bias) - target) ** 2).sum().backward()

    torch.testing.assert_close(layer.delta_values.grad, dense_weight.grad.view(-1)[layer.delta_indices.long()])
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    if path == "observed":
        assert len(observed) == 1
        torch.testing.assert_close(observed[0], dense_weight.grad)


def test_backward_saves_no_dense_copy_of_the_weight():
    layer = make_layer(out_features=64, in_features=32)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(2, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    weight_sized = [t for t in saved if t.numel() == layer.base.weight.numel()]
    assert len(weight_sized) == 1 and weight_sized[0].data_ptr() == layer.base.weight.data_ptr()
    out.sum().backward()
    assert layer.base.weight.grad is None


def test_optimizer_state_scales_with_k():
    layer = make_layer(k=11, out_features=40, in_features=30)
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    layer(torch.randn(4, 30)).sum().backward()
    optimizer.step()
    state_elements = sum(t.numel() for state in optimizer.state.values() for key, t in state.items() if key != "step")
    assert params == [layer.delta_values]
    assert state_elements == 2 * 11


def test_merge_unmerge_restores_base_bit_for_bit():
    layer = make_layer()
    before = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.delta_values.copy_(torch.randn(layer.k) * 1e3)
    x = torch.randn(3, 5)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    assert torch.equal(layer.base.weight, before)


def test_merge_and_unwrap_gives_plain_linear_with_same_outputs():
    model = nn.Sequential(make_layer(), nn.ReLU())
    with torch.no_grad():
        model[0].delta_values.normal_()
    x = torch.randn(2, 5)
    expected = model(x)
    merge_and_unwrap(model)
    assert type(model[0]) is nn.Linear
    assert torch.equal(model(x), expected)


def test_autocast_bf16_forward_backward_dtypes():
    layer = make_layer()
    x = torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.delta_values.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"density": 0.1}, [int(0.1 * 600) + 1, int(0.1 * 200) + 1]),
        ({"num_params": 80}, [60, 20]),
        ({"lora_rank": 2}, [2 * (20 + 30), 2 * (10 + 20)]),
    ],
)
def test_allocate_budget(kwargs, expected):
    assert allocate_budget([(20, 30), (10, 20)], **kwargs) == expected


def test_global_budget_sums_exactly():
    counts = allocate_budget([(7, 13), (3, 5), (11, 2)], num_params=37)
    assert sum(counts) == 37 and all(c >= 1 for c in counts)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_bad_density_names_valid_range(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        validate_budget(density, None, None)


def test_budget_larger_than_targets_is_rejected():
    with pytest.raises(ValueError, match="between 2 .* and 800"):
        allocate_budget([(20, 30), (10, 20)], num_params=10_000)


def test_two_budgets_at_once_is_rejected():
    """A user's config stacked on a shipped recipe that sets another budget is told to null the recipe's."""
    with pytest.raises(ValueError, match=r"exactly one of .* \(got \['density', 'num_params'\]; a config that changes "
                                         r"a shipped recipe's budget sets the recipe's own to null\)"):
        validate_budget(0.1, 10, None)
    with pytest.raises(ValueError, match=r"exactly one of density, num_params, lora_rank \(got none\)$"):
        validate_budget(None, None, None)  # no budget at all: nothing was stacked, so no hint about one


@pytest.mark.parametrize("numel, k", [(10, 10), (10, 3), (100_000, 1_000), (100_000, 24_999)])
def test_random_indices_are_distinct_sorted_in_range_and_seeded(numel, k):
    chosen = random_indices(numel, k, torch.Generator().manual_seed(0))
    assert chosen.numel() == k and chosen.unique().numel() == k
    assert torch.equal(chosen, chosen.sort().values) and 0 <= int(chosen.min()) and int(chosen.max()) < numel
    assert torch.equal(chosen, random_indices(numel, k, torch.Generator().manual_seed(0)))
    assert not torch.equal(chosen, random_indices(numel, k, torch.Generator().manual_seed(1))) or k == numel


def test_random_indices_cover_the_weight_uniformly():
    """Low-density draws (the sampling path) land evenly in every tenth of the weight."""
    counts = torch.zeros(10)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts += torch.bincount(random_indices(1_000_000, 5_000, generator) // 100_000, minlength=10)
    assert (counts / counts.sum() - 0.1).abs().max() < 0.01  # 100k draws: sd of a share is ~0.001


def test_random_indices_reject_an_impossible_count():
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\], got 11"):
        random_indices(10, 11, torch.Generator())
