"""The architecture table on families the other tests never use: S2FT inside fused projections (Phi-3's stacked
qkv_proj / gate_up_proj, GPT-NeoX's per-head interleaved query_key_value), and every element-sparse method on
GPT-2's transposed `Conv1D` weights. Each one: outputs unchanged before training, trains, and exports un-permuted
(the merged model and a fresh base plus the exported delta predict what the trained model predicts)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, Phi3Config
from transformers.pytorch_utils import Conv1D

from sparse_lightning.architectures import ARCHITECTURES
from sparse_lightning.callbacks import GradientTopKCallback, PruneRegrowCallback
from sparse_lightning.callbacks import S2FTStructureCallback
from sparse_lightning.export import apply_delta, export_delta
from sparse_lightning.methods import select_by_gradient
from sparse_lightning.registry import method as registry_method
from sparse_lightning.registry import names
from sparse_lightning.sparse import freeze_except, merge_and_unwrap, sparse_delta_layers
from sparse_lightning.sparse.block import block_delta_layers
from sparse_lightning.structure import find_groups, restore_original_layout

CONFIGS = {
    "phi3": lambda: Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               pad_token_id=0),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5),
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def tiny(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()


def batches(count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 128, (2, 12), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "labels": i} for i in ids]


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batches(1)[0]["input_ids"]).logits


def train(model: nn.Module, steps: int = 4, before_step=None, optimizer_class: type = torch.optim.AdamW) -> None:
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in zip(range(steps), batches(steps) * 2):
        if before_step is not None:
            before_step(step, optimizer)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def check_export(trained: nn.Module, model_type: str, tmp_path: Path) -> None:
    """Merged (folded, un-permuted) == trained; a fresh base + the exported delta == merged, bit for bit."""
    expected = logits(trained)
    delta_dir = export_delta(trained, tmp_path / "delta", {"method": "test", "base_model": model_type}, dense=[])
    merged = restore_original_layout(merge_and_unwrap(copy.deepcopy(trained)))
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    rebuilt = apply_delta(tiny(model_type), delta_dir)
    for (name, a), (_, b) in zip(merged.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any("s2ft" in name for name in merged.state_dict())


@pytest.mark.parametrize("model_type, settings", [
    ("phi3", {"num_heads": 2, "num_channels": 5, "train": ["o", "v", "down"]}),
    ("phi3", {"num_heads": 2, "num_channels": 5, "train": ["o", "up"]}),
    ("phi3", {"num_channels": 7, "train": ["gate", "down"]}),
    ("gpt_neox", {"num_heads": 1, "num_channels": 6, "train": ["o", "up", "down"]}),
])
def test_s2ft_inside_fused_projections(model_type: str, settings: dict, tmp_path: Path) -> None:
    model = tiny(model_type)
    before = logits(model)
    S2FTStructureCallback(select_by="weight", **settings).attach(model)
    freeze_except(model, [])
    after = logits(model)
    assert (after - before).abs().max() <= 1e-5  # co-permuted, zero blocks: the same function
    orders = [order for name, order in model.named_buffers() if "s2ft" in name]
    assert orders and any(not torch.equal(order, torch.arange(order.numel())) for order in orders)  # really moved
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith("delta_block") for name in trainable)
    train(model)
    assert all(layer.delta_block.abs().max() > 0 for layer in block_delta_layers(model).values())
    check_export(model, model_type, tmp_path)


def test_fused_role_positions_follow_the_layout() -> None:
    phi3, neox = find_groups(tiny("phi3")), find_groups(tiny("gpt_neox"))
    heads, channels = phi3[0], phi3[1]  # head_dim 8, 4 query heads, 2 KV heads; 48 channels
    assert heads.positions("v", torch.tensor([1])).tolist() == list(range(32 + 16 + 8, 32 + 16 + 16))
    assert channels.positions("up", torch.tensor([0, 2])).tolist() == [48, 50]
    neox_heads = neox[0]  # per head: [q | k | v], 8 rows each
    assert neox_heads.positions("k", torch.tensor([2])).tolist() == list(range(2 * 24 + 8, 2 * 24 + 16))


@pytest.mark.parametrize("model_type, settings, message", [
    ("gpt_neox", {"num_heads": 1, "train": ["o", "v"]}, "interleaves q/k/v per head"),
    ("phi3", {"num_channels": 2, "train": ["gate", "up"]}, "gate and up share one fused weight"),
    ("gpt2", {"num_channels": 2}, "no coupled structure for model_type 'gpt2'"),
])
def test_s2ft_refuses_what_a_layout_cannot_hold(model_type: str, settings: dict, message: str) -> None:
    model = tiny(model_type)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        S2FTStructureCallback(**settings).attach(model)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def spiel_driver(callback: PruneRegrowCallback, model: nn.Module):
    layers = sparse_delta_layers(model)

    def before_step(step: int, optimizer: torch.optim.Optimizer) -> None:
        if step == 0:
            callback.cycle.start(layers, optimizer, torch.device("cpu"))
        callback.cycle.before_step(layers, step, optimizer)

    return before_step


@pytest.mark.parametrize("method", names(element_sparse=True))
def test_element_sparse_methods_on_gpt2_conv1d(method: str, tmp_path: Path) -> None:
    model = tiny("gpt2")
    before = logits(model)
    row = registry_method(method)
    schedule = {"reselection_interval": 3, "accumulation_steps": 1, "reselection_until": 100} if row.reselects else {}
    callback = row.make_callback(density=0.05, **schedule)
    callback.attach(model)
    freeze_except(model, [])
    layers = sparse_delta_layers(model)
    assert len(layers) == 2 * 4 and all(isinstance(layer.base, Conv1D) and layer.transposed for layer in layers.values())
    assert torch.equal(logits(model), before)
    if row.data_driven:
        select_by_gradient(model, batches(2), lambda batch: model(**batch).loss)
        # the chosen entries are the largest |gradient| in the weight's stored [in, out] layout
        layer = layers["transformer.h.0.attn.c_attn"]
        reference = tiny("gpt2")
        sum(reference(**batch).loss for batch in batches(2)).backward()
        grad = reference.transformer.h[0].attn.c_attn.weight.grad.abs().view(-1)
        assert grad[layer.delta_indices.long()].min() >= grad.topk(layer.k).values.min() - 1e-7
    train(model, steps=8, before_step=spiel_driver(callback, model) if row.reselects else None,
          optimizer_class=row.optimizer_class())
    if row.reselects:
        assert callback.history and callback.history[0]["step"] == 1
    assert all(layer.delta_values.abs().max() > 0 for layer in layers.values())
    check_export(model, "gpt2", tmp_path)
    merged = merge_and_unwrap(copy.deepcopy(model))
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)


def test_conv1d_value_gradients_equal_the_dense_reference() -> None:
    torch.manual_seed(0)
    conv = Conv1D(6, 4)
    model = nn.Sequential(conv)
    GradientTopKCallback(density=0.5, target_modules=["0"]).attach(model)
    layer = sparse_delta_layers(model)["0"]
    with torch.no_grad():
        layer.delta_values.copy_(torch.randn(layer.k))
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    weight = conv.weight.detach().clone().view(-1)
    weight[layer.delta_indices.long()] += layer.delta_values.detach()
    weight = weight.view(4, 6).requires_grad_(True)
    (x @ weight + conv.bias).square().sum().backward()
    torch.testing.assert_close(layer.delta_values.grad, weight.grad.view(-1)[layer.delta_indices.long()])


def test_every_architecture_names_targets_that_exist() -> None:
    for model_type in CONFIGS:
        names = [name for name, _ in tiny(model_type).named_modules()]
        for target in ARCHITECTURES[model_type].targets:
            assert any(name.endswith("." + target) for name in names), (model_type, target)
