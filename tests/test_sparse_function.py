"""The element-sparse Function's fast paths (issue 15): the value gradient over token blocks with a cached index
layout, and W merged in place for training, each held to the dense reference and to what the slower path computed."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparse_lightning.sparse import SparseDeltaLinear
from sparse_lightning.sparse.functional import (
    CPU_TOKEN_CHUNK,
    IndexLayout,
    merged_in_place,
    merged_weight,
    sampled_weight_grad,
)


def make_layer(transposed: bool, out_features: int = 12, in_features: int = 10, k: int = 17) -> SparseDeltaLinear:
    torch.manual_seed(0)
    base = Conv1D(out_features, in_features) if transposed else nn.Linear(in_features, out_features)
    if transposed:
        nn.init.normal_(base.bias)
    layer = SparseDeltaLinear(base, k)
    layer.set_indices(torch.randperm(out_features * in_features)[:k].sort().values)
    with torch.no_grad():
        layer.delta_values.normal_()
    return layer


def dense_reference(layer: SparseDeltaLinear, x: torch.Tensor, target: torch.Tensor):
    """(values gradient, input gradient) of the same loss through a dense merged weight."""
    weight = merged_weight(layer.base.weight.detach(), layer.delta_indices, layer.delta_values.detach())
    weight.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = x_ref @ weight + layer.base.bias if layer.transposed else nn.functional.linear(x_ref, weight, layer.base.bias)
    ((out - target) ** 2).sum().backward()
    return weight.grad.view(-1)[layer.delta_indices.long()], x_ref.grad


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("unsorted", [False, True])
def test_value_gradient_over_token_blocks_equals_the_dense_reference(transposed: bool, unsorted: bool) -> None:
    layer = make_layer(transposed)
    if unsorted:  # SpIEL's slots after regrowth
        with torch.no_grad():
            layer.delta_indices.copy_(layer.delta_indices.flip(0))
    before = layer.base.weight.detach().clone()
    tokens = 2 * CPU_TOKEN_CHUNK + 37  # three token blocks, the last one partial
    x = torch.randn(1, tokens, 10, requires_grad=True)
    target = torch.randn(1, tokens, 12)
    ((layer(x) - target) ** 2).sum().backward()
    values_grad, x_grad = dense_reference(layer, x, target)
    torch.testing.assert_close(layer.delta_values.grad, values_grad)
    torch.testing.assert_close(x.grad, x_grad)
    assert torch.equal(layer.base.weight, before) and layer.base.weight.grad is None


def test_the_layout_is_kept_until_the_indices_change_and_then_follows_them() -> None:
    layer = make_layer(transposed=False)
    x = torch.randn(4, 10)
    layout = layer.index_layout()
    layer(x).sum().backward()
    assert layer.index_layout() is layout  # a training step does not rebuild it

    def slot_write() -> None:  # SpIEL's regrowth: a few slots move to positions not yet covered
        free = torch.tensor([i for i in range(120) if i not in set(layer.delta_indices.tolist())][:3])
        layer.delta_indices[:3] = free.int()

    changes = {
        "set_indices": lambda: layer.set_indices(torch.randperm(120)[:17].sort().values),
        "slot write": slot_write,
        "load_state_dict": lambda: layer.load_state_dict({**layer.state_dict(),
                                                          "delta_indices": torch.randperm(120)[:17].int()}),
    }
    for name, change in changes.items():
        with torch.no_grad():
            change()
            layer.delta_values.normal_()
        assert layer.index_layout() is not layout, name
        layout = layer.index_layout()
        layer.delta_values.grad = None
        target = torch.randn(4, 12)
        ((layer(x) - target) ** 2).sum().backward()
        torch.testing.assert_close(layer.delta_values.grad, dense_reference(layer, x, target)[0], msg=name)


def test_a_given_layout_and_a_fresh_one_give_the_same_gradient() -> None:
    grad_out, x = torch.randn(300, 12), torch.randn(300, 10)
    indices = torch.randperm(120)[:17].int()
    shape = torch.Size((12, 10))
    expected = (grad_out.t() @ x).view(-1)[indices.long()]
    torch.testing.assert_close(sampled_weight_grad(grad_out, x, indices, shape), expected)
    torch.testing.assert_close(sampled_weight_grad(grad_out, x, indices, shape, IndexLayout(indices, shape)), expected)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_inference_forward_is_the_merged_copy_product_bit_for_bit(transposed: bool) -> None:
    layer = make_layer(transposed)
    x = torch.randn(3, 7, 10)
    merged = merged_weight(layer.base.weight, layer.delta_indices, layer.delta_values.detach())
    expected = x @ merged + layer.base.bias if transposed else nn.functional.linear(x, merged, layer.base.bias)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    torch.testing.assert_close(layer(x), expected)  # the training forward (W merged in place) computes the same


def test_merging_in_place_restores_the_weight_bit_for_bit_and_keeps_its_version() -> None:
    weight = torch.randn(6, 5)
    before, version = weight.clone(), weight._version
    indices, values = torch.tensor([0, 7, 29], dtype=torch.int32), torch.randn(3) * 1e3
    with merged_in_place(weight, indices, values) as merged:
        assert merged is weight and torch.equal(weight, merged_weight(before, indices, values))
    assert torch.equal(weight, before) and weight._version == version
    with pytest.raises(RuntimeError, match="inside"):
        with merged_in_place(weight, indices, values):
            raise RuntimeError("inside")
    assert torch.equal(weight, before)


def test_a_retained_graph_runs_backward_twice() -> None:
    layer = make_layer(transposed=False)
    out = layer(torch.randn(4, 10)).sum()
    out.backward(retain_graph=True)
    first = layer.delta_values.grad.clone()
    out.backward()
    torch.testing.assert_close(layer.delta_values.grad, 2 * first)


def test_autocast_bf16_value_gradient_matches_the_bf16_dense_reference() -> None:
    layer = make_layer(transposed=False)
    before = layer.base.weight.detach().clone()
    x = torch.randn(2 * CPU_TOKEN_CHUNK + 5, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().pow(2).sum().backward()
    merged = merged_weight(before, layer.delta_indices, layer.delta_values.detach(), torch.bfloat16)
    grad_out = 2 * nn.functional.linear(x.bfloat16(), merged, layer.base.bias.bfloat16()).float()
    expected = (grad_out.bfloat16().float().t() @ x.bfloat16().float()).view(-1)[layer.delta_indices.long()]
    assert layer.delta_values.grad.dtype == torch.float32
    torch.testing.assert_close(layer.delta_values.grad, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert torch.equal(layer.base.weight, before)
