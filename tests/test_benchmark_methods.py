"""benchmarks/step_benchmark.py builds every method of the registry through `prepare_model` (and PEFT for SHiRA):
each one, on a tiny LLaMA built from a config, trains the count it claims; the floor trains nothing yet runs every
layer's backward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sparse_lightning.registry import METHODS, names
from script_loading import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    module = load_script(SCRIPT, register=True)
    yield module
    sys.modules.pop(module.__name__, None)


def build(bench, method: str, **budget):
    spec = bench.MODELS["llama_tiny"]
    batches = spec.batches(spec, 1)
    model, heads, loss_for = spec.load(spec, torch.float32, torch.device("cpu"))
    settings = {"density": 0.01, "sift_lora_rank": None, **budget}
    plan = bench.Budget(settings["density"], settings["sift_lora_rank"], calibration_batches=batches,
                        loss_fn=loss_for(model))
    targets = bench.sift_counts(model, spec, plan)
    shapes = bench.target_shapes(model, spec.targets)
    model = bench.setup(method, model, spec, heads, plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, loss_for(model), batches[0], plan, targets, shapes, trainable


@pytest.mark.parametrize("budget", [{}, {"sift_lora_rank": 2}], ids=["density", "lora_rank"])
@pytest.mark.parametrize("method", [*names(element_sparse=True), "shira"])
def test_element_sparse_methods_train_sifts_k(bench, method, budget):
    model, _, _, plan, targets, _, trainable = build(bench, method, **budget)
    assert trainable == sum(targets.values())  # the tiny LLaMA has no task head
    if method == "shira":  # PEFT's own layers, each holding SIFT's k for its weight
        from peft.tuners.shira.layer import ShiraLayer

        per_layer = sorted(m.shira_weight["default"].numel() for m in model.modules() if isinstance(m, ShiraLayer))
        assert per_layer == sorted(targets.values())
        assert ("resized" in plan.notes["shira"]) == (not budget)  # a LoRA-rank budget is PEFT's own count


def test_lora_full_and_s2ft_counts(bench):
    _, _, _, plan, _, shapes, trainable = build(bench, "lora")
    assert trainable == plan.notes["lora_rank"] * sum(out + inp for out, inp in shapes)
    model, _, _, _, _, _, trainable = build(bench, "full")
    assert trainable == sum(p.numel() for p in model.parameters())
    model, _, _, plan, _, _, trainable = build(bench, "s2ft")
    config = bench.MODELS["llama_tiny"].config
    assert trainable == plan.notes["s2ft_channels"] * config["hidden_size"] * config["num_hidden_layers"]


def test_every_registry_method_runs_and_trains(bench):
    assert bench.method_names()[len(bench.OWN_METHODS):] == list(METHODS)
    for method in METHODS:
        _, _, _, plan, _, _, trainable = build(bench, method)
        assert trainable > 0 and plan.optimizer is METHODS[method].optimizer_class()


def test_floor_runs_every_layers_backward_without_weight_gradients(bench):
    model, loss_fn, batch, plan, _, _, trainable = build(bench, "floor")
    assert trainable == 0 and plan.optimizer is None
    reached = []
    for index, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(lambda module, grad_in, grad_out, index=index: reached.append(index))
    loss_fn(batch).backward()
    assert sorted(reached) == list(range(len(model.model.layers)))  # the first layer's backward ran too
    assert all(p.grad is None for p in model.parameters())
