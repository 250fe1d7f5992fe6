"""S2FT's block layers against a dense reference: invariants 1-4 and 8 for column and row blocks.

The block gradient equals the selected columns (rows) of the dense weight gradient; backward keeps only the
selected input columns; the frozen weight never gets a gradient; merge/unmerge restore the base bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_lightning.sparse import merge_and_unwrap
from sparse_lightning.sparse.block import ColumnBlockLinear, RowBlockLinear

OUT, IN, S = 12, 10, 4


def make(cls, bias: bool = True, filled: bool = True):
    torch.manual_seed(0)
    layer = cls(nn.Linear(IN, OUT, bias=bias), torch.tensor([7, 2, 9, 0]))
    if filled:
        with torch.no_grad():
            layer.delta_block.normal_()
    return layer


def dense_reference(layer, x: torch.Tensor, target: torch.Tensor):
    """The same layer as one dense weight W + block, differentiated by plain autograd."""
    weight = layer.base.weight.detach().clone()
    weight.narrow(layer.dim, 0, S).add_(layer.delta_block.detach())
    weight.requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    ((nn.functional.linear(x, weight, layer.base.bias) - target) ** 2).sum().backward()
    return weight.grad, x.grad


@pytest.mark.parametrize("cls", [ColumnBlockLinear, RowBlockLinear])
def test_zero_block_reproduces_the_base_exactly(cls) -> None:
    layer = make(cls, filled=False)
    x = torch.randn(3, 5, IN)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("cls", [ColumnBlockLinear, RowBlockLinear])
def test_block_gradient_is_the_dense_gradient_of_the_selected_slice(cls) -> None:
    layer = make(cls)
    x = torch.randn(3, 5, IN, requires_grad=True)
    target = torch.randn(3, 5, OUT)
    ((layer(x) - target) ** 2).sum().backward()
    dense_grad, x_grad = dense_reference(layer, x, target)
    torch.testing.assert_close(layer.delta_block.grad, dense_grad.narrow(layer.dim, 0, S))
    torch.testing.assert_close(x.grad, x_grad)
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert not layer.base.weight.requires_grad


def test_column_block_saves_only_the_selected_input_columns() -> None:
    layer = make(ColumnBlockLinear)
    saved = []
    x = torch.randn(6, 7, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    activations = [t for t in saved if t.data_ptr() not in (layer.base.weight.data_ptr(), layer.delta_block.data_ptr())]
    assert len(saved) == 3 and len(activations) == 1
    kept = activations[0]
    assert kept.shape == (6, 7, S) and kept.is_contiguous()  # a compact copy, not a view pinning all of x
    assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()
    assert torch.equal(kept, x[..., :S])
    weights = [t for t in saved if t.data_ptr() == layer.base.weight.data_ptr()]
    assert len(weights) == 1  # the frozen weight itself, not a copy
    out.sum().backward()
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("cls", [ColumnBlockLinear, RowBlockLinear])
def test_optimizer_state_scales_with_the_block(cls) -> None:
    layer = make(cls)
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    layer(torch.randn(4, IN)).sum().backward()
    optimizer.step()
    assert params == [layer.delta_block]
    assert sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k != "step") == 2 * S * (
        OUT if cls is ColumnBlockLinear else IN)


@pytest.mark.parametrize("cls", [ColumnBlockLinear, RowBlockLinear])
def test_merge_unmerge_and_fold(cls) -> None:
    layer = make(cls)
    before = layer.base.weight.detach().clone()
    x = torch.randn(3, IN)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    assert torch.equal(layer.base.weight, before)
    model = nn.Sequential(layer)
    merge_and_unwrap(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("cls", [ColumnBlockLinear, RowBlockLinear])
def test_autocast_bf16_keeps_an_fp32_block_gradient(cls) -> None:
    layer = make(cls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(3, IN))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.delta_block.grad.dtype == torch.float32


def test_block_size_must_fit_the_weight() -> None:
    with pytest.raises(ValueError, match=r"a block needs 1 to 10 positions from 0 along dim 1 of a \(12, 10\) weight, got 11"):
        ColumnBlockLinear(nn.Linear(IN, OUT), torch.arange(11))
