"""The memory predictor (`sparse-lightning estimate`): counts from meta-device models, sharding, the CLI.

Its bytes are checked against measured runs by benchmarks/memory_table.py (a benchmark, not a test); here: the
parameter and trainable counts it builds on, and the properties any plan must have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sparse_lightning.callbacks import (
    GradientTopKCallback,
    PruneRegrowCallback,
    RandomMaskCallback,
    S2FTStructureCallback,
)
from sparse_lightning.cli import main
from sparse_lightning.memory_estimate import METHODS, Plan, estimate, load_config, model_shape, trainable_count
from sparse_lightning.modules.lora import LoRASettings, apply_lora
from sparse_lightning.modules.sharded_loading import READ_BYTES
from sparse_lightning.sparse import default_targets, freeze_except


@pytest.fixture(scope="module")
def llama8b():
    return model_shape(load_config("8b"))


def test_llama_shapes_count_their_published_parameters(llama8b) -> None:
    assert llama8b.parameters == 8_030_261_248  # Llama-3.1-8B
    assert model_shape(load_config("1b")).parameters == 1_235_814_400  # Llama-3.2-1B, tied embeddings
    assert llama8b.layers == 32 and len(llama8b.targets) == 32 * 7
    assert llama8b.root_parameters == 4096  # the final norm: the untied embedding and head are their own units
    assert llama8b.end_parameters == 128_256 * 4096
    assert model_shape(load_config("1b")).end_parameters == 0  # tied: one weight at both ends, in the root


@pytest.mark.parametrize("method", METHODS)
def test_more_gpus_never_need_more_memory_per_gpu(method: str, llama8b) -> None:
    config = load_config("8b")
    peaks = [estimate(config, Plan(method, gpus=n), llama8b) for n in (1, 8, 64)]
    for phase in ("load", "selection", "step", "save"):
        values = [e.phases[phase] for e in peaks]
        assert values == sorted(values, reverse=True), (phase, values)
    assert peaks[0].peak > peaks[-1].peak
    # in host memory every method (LoRA and S2FT's random selection too) reads its shard one slice at a time
    reading = [e.host["load"] - e.phases["load"] for e in peaks[1:]]  # beyond the shard the device will hold
    assert reading == [min(READ_BYTES, llama8b.largest_tensor * 2 // n) for n in (8, 64)]
    assert peaks[0].host["load"] == 0  # one process builds on its device


def test_fsdp_shards_the_base_and_what_trains_but_not_indices(llama8b) -> None:
    config = load_config("8b")
    one, eight = (estimate(config, Plan("sift", gpus=n), llama8b) for n in (1, 8))
    assert eight.components["base"] == one.components["base"] // 8
    assert one.components["base"] == 8_030_261_248 * 2  # bf16
    for part in ("trainable", "gradients", "optimizer"):
        assert eight.components[part] == one.components[part] // 8
    assert eight.components["indices"] == one.components["indices"]  # buffers are replicated
    assert "fsdp_unsharded" in eight.components and "fsdp_unsharded" not in one.components


def test_sift_scoring_sums_are_row_sharded_over_ranks(llama8b) -> None:
    """On 8 ranks each holds 1/8 of SIFT's sums (the budget is a fraction of its share) beside the whole dense
    gradient of the weight being scored, its fp32 copy and its reduce-scattered 1/8."""
    config = load_config("8b")
    largest = max(out * inp for out, inp in llama8b.targets.values())
    for batches in (1, 4):
        one, eight = (estimate(config, Plan("sift", gpus=n, calibration_batches=batches), llama8b) for n in (1, 8))
        gradient_one = (2 + 4) * largest if batches == 1 else 2 * largest
        sums_one = one.components["selection"] - gradient_one
        sums_eight = eight.components["selection"] - (2 + 4) * largest - 4 * largest // 8
        assert sums_eight == sums_one // 8
        assert (sums_one > 4 * largest) == (batches > 1)


def test_sift_scoring_recomputes_activations_whether_or_not_training_does(llama8b) -> None:
    """Scoring passes always checkpoint (`modes.scoring_mode`): the selection phase is the same with or without the
    run's gradient checkpointing, and holds less than a step's activations without it."""
    config = load_config("8b")
    plain, checkpointed = (estimate(config, Plan("sift", seq_len=1024, gradient_checkpointing=flag), llama8b)
                           for flag in (False, True))
    assert plain.phases["selection"] == checkpointed.phases["selection"]
    assert plain.components["scoring_activations"] == checkpointed.components["activations"]
    assert plain.components["scoring_activations"] < plain.components["activations"] / 3


def test_sparse_methods_hold_far_less_than_full_fine_tuning(llama8b) -> None:
    config = load_config("8b")
    full = estimate(config, Plan("full"), llama8b)
    for method in [m for m in METHODS if m != "full"]:
        sparse = estimate(config, Plan(method), llama8b)
        assert sparse.components["optimizer"] < full.components["optimizer"] / 50
        assert sparse.checkpoint_bytes < full.checkpoint_bytes / 20
    assert full.components["optimizer"] == 2 * full.components["base"]  # AdamW's moments in the weights' dtype


def test_a_full_checkpoint_adds_the_base(llama8b) -> None:
    config = load_config("8b")
    delta, whole = (estimate(config, Plan("sift", full_checkpoint=f), llama8b) for f in (False, True))
    assert whole.checkpoint_bytes - delta.checkpoint_bytes == llama8b.parameters * 2


def test_gradient_checkpointing_shrinks_activations(llama8b) -> None:
    config = load_config("8b")
    plain, recomputed = (estimate(config, Plan("lora", gradient_checkpointing=g), llama8b) for g in (False, True))
    assert recomputed.components["activations"] < plain.components["activations"] / 3


def attached_trainable(model_dir: Path, method: str, **budget) -> int:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if method == "lora":
        model.requires_grad_(False)
        model = apply_lora(model, LoRASettings(r=budget["lora_rank"]), list(default_targets(model)), [])
    else:
        callbacks = {"sift": lambda: GradientTopKCallback(density=budget["density"]),
                     "random_mask": lambda: RandomMaskCallback(density=budget["density"]),
                     "spiel_ag": lambda: PruneRegrowCallback(num_params=budget["num_params"]),
                     "s2ft": lambda: S2FTStructureCallback(train=["down"], num_channels=budget["channels"],
                                                               select_by="random", seed=0)}
        callbacks[method]().attach(model)
        freeze_except(model, [])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method, budget", [
    ("sift", {"density": 0.05}), ("random_mask", {"density": 0.3}), ("spiel_ag", {"num_params": 777}),
    ("lora", {"lora_rank": 2}), ("s2ft", {"num_params": 3 * 32 * 2, "channels": 3}),
])
def test_trainable_counts_are_what_the_methods_attach(tiny_llama_dir: Path, method: str, budget: dict) -> None:
    shape = model_shape(load_config(str(tiny_llama_dir)))
    plan_budget = {key: value for key, value in budget.items() if key != "channels"}
    assert trainable_count(shape, Plan(method, **plan_budget)) == attached_trainable(tiny_llama_dir, method, **budget)


def test_estimate_reads_only_the_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())  # no weights beside it
    assert estimate(str(tmp_path), Plan("sift")).parameters == model_shape(load_config(str(tiny_llama_dir))).parameters


def test_the_cli_prints_a_table_and_json(capsys) -> None:
    main(["estimate", "--model", "1b", "--method", "sift,lora", "--gpus", "1,8", "--seq_len", "512"])
    table = capsys.readouterr().out
    assert "1,235,814,400 parameters" in table
    assert sum(line.startswith("| 1b | ") for line in table.splitlines()) == 4
    main(["estimate", "--model", "1b", "--method", "spiel_ma", "--gpus", "64", "--json", "--num_params", "1000000"])
    [record] = json.loads(capsys.readouterr().out)
    assert record["trainable"] == 1_000_000 and record["plan"]["gpus"] == 64
    assert record["peak"] == max(record["phases"].values()) == record["phases"]["step"]
    assert record["host"]["save"] >= record["checkpoint_bytes"]


def test_bad_plans_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        Plan("qlora")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Plan("sift", dtype="int8")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_config("/nonexistent/model")
