"""MultiDelta: several deltas (our files, S2FT blocks, PEFT SHiRA) on one tiny LLaMA; switching restores the base
bit for bit in every dtype, touches only the delta's entries, fusion sums and reports overlaps, bad input changes
nothing."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sparse_lightning.callbacks import RandomMaskCallback, S2FTStructureCallback
from sparse_lightning.export import DeltaFileError, apply_delta, export_delta
from sparse_lightning.multi_delta import MultiDelta, UnknownDeltaError
from sparse_lightning.peft_interop import write_peft_adapter
from sparse_lightning.sparse import delta_layers
from sparse_lightning.sparse.frozen_delta import is_delta_parameter

#: S2FT on heads (o columns, v rows) and FFN channels (down columns, up rows); "weight" selection with opposite
#: orders picks disjoint channels and KV groups, so two such deltas never share a position.
S2FT = {"train": ["o", "v", "down", "up"], "num_heads": 2, "num_channels": 8, "select_by": "weight"}


def attach_random(seed: int):
    return lambda model: RandomMaskCallback(density=0.05, seed=seed).attach(model)


def attach_s2ft(order: str):
    return lambda model: S2FTStructureCallback(order=order, **S2FT).attach(model)


def make_delta(base_dir: Path, out: Path, attach, seed: int, peft: bool = False) -> Path:
    """Attach a method's deltas, give them random values (large enough to move bf16 weights), write them out."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    attach(model)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if is_delta_parameter(name):
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    if peft:
        return write_peft_adapter(model, out, dense=[], peft_type="SHIRA")
    return export_delta(model, out, {"method": "test", "base_model": str(base_dir)}, dense=[])


@pytest.fixture(scope="module")
def deltas(tiny_lm_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deltas")
    return {"a": make_delta(tiny_lm_dir, root / "a", attach_random(1), 1),
            "b": make_delta(tiny_lm_dir, root / "b", attach_random(2), 2),
            "s_large": make_delta(tiny_lm_dir, root / "s_large", attach_s2ft("largest"), 3),
            "s_small": make_delta(tiny_lm_dir, root / "s_small", attach_s2ft("smallest"), 4),
            "peft": make_delta(tiny_lm_dir, root / "peft", attach_random(5), 5, peft=True)}


def base(tiny_lm_dir: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=dtype).eval()


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    differing = [name for name, tensor in expected.items() if not torch.equal(got[name], tensor)]
    assert not differing, f"{len(differing)} tensor(s) differ, e.g. {differing[:3]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_switching_gives_weights_bit_identical_to_base_plus_each_delta(tiny_lm_dir, deltas, dtype):
    expected = {"base": state(base(tiny_lm_dir, dtype))}
    for name in ("a", "s_large", "peft"):
        expected[name] = state(apply_delta(base(tiny_lm_dir, dtype), deltas[name]))
    model = base(tiny_lm_dir, dtype)
    multi = MultiDelta(model).load("a", deltas["a"]).load("s_large", deltas["s_large"]).load("peft", deltas["peft"])
    assert_same(model, expected["base"])  # loading changes nothing
    for name in ("a", "s_large", "a", None, "peft", "s_large", None):
        multi.activate(name)
        assert multi.active == name
        assert_same(model, expected[name or "base"])


def test_activation_changes_only_the_targeted_entries_and_saves_only_those(tiny_lm_dir, deltas):
    model = base(tiny_lm_dir)
    before = state(model)
    multi = MultiDelta(model).load("a", deltas["a"]).load("s", deltas["s_large"])
    for name in ("a", "s"):
        multi.activate(name)
        entries = multi.entries(name)
        for param_name, param in model.named_parameters():
            changed = int((param.detach() != before[param_name]).sum())
            assert changed <= entries.get(param_name, 0), param_name
            assert (changed > 0) == (param_name in entries), param_name
        saved = multi.memory_bytes()["saved"]
        assert saved == sum(entries.values()) * 4  # the base's values at the delta's positions, fp32: O(k)
    multi.activate(None)
    assert multi.memory_bytes()["saved"] == 0


def fused_against_both(tiny_lm_dir, deltas, first: str, second: str):
    model = base(tiny_lm_dir)
    multi = MultiDelta(model).load(first, deltas[first]).load(second, deltas[second])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = multi.fuse([first, second], as_name="both")
    multi.activate("both")
    both = apply_delta(apply_delta(base(tiny_lm_dir), deltas[first]), deltas[second])
    return model, multi, report, caught, both


def flat_positions(model, multi: MultiDelta, name: str) -> dict[str, set[int]]:
    """Every entry a loaded delta changes, as flat positions per parameter (computed from an activation)."""
    before = state(model)
    multi.activate(name)
    positions = {}
    for param_name in multi.entries(name):
        param = dict(model.named_parameters())[param_name]
        positions[param_name] = set((param.detach() != before[param_name]).flatten().nonzero().flatten().tolist())
    multi.activate(None)
    return positions


def test_fusion_equals_applying_both_and_reports_each_weights_overlap(tiny_lm_dir, deltas):
    model, multi, report, caught, both = fused_against_both(tiny_lm_dir, deltas, "a", "b")
    fused = model.state_dict()
    overlap_total = 0
    for name, tensor in both.state_dict().items():
        torch.testing.assert_close(fused[name], tensor, rtol=0, atol=1e-6)  # fp32 sums in another order
    a_index = {name: set(delta_tensors_indices(deltas["a"], name)) for name in report.entries}
    b_index = {name: set(delta_tensors_indices(deltas["b"], name)) for name in report.entries}
    for name in report.entries:
        overlap = len(a_index[name] & b_index[name])
        assert report.overlaps[name] == overlap
        assert report.entries[name] == len(a_index[name] | b_index[name])
        overlap_total += overlap
        flat = fused[name].flatten()
        alone = both.state_dict()[name].flatten()
        disjoint = sorted((a_index[name] ^ b_index[name]))
        assert torch.equal(flat[disjoint], alone[disjoint])  # where only one delta writes, exactly what it writes
    assert report.overlapping == overlap_total > 0  # 5% densities on 1-2k entries overlap somewhere
    assert any("overlap at" in str(w.message) for w in caught)


def delta_tensors_indices(directory: Path, weight_name: str) -> list[int]:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "delta.safetensors"))
    return tensors[weight_name.removesuffix(".weight") + ".indices"].tolist()


def test_weighted_fusion_scales_each_delta_before_the_sum(tiny_lm_dir, deltas):
    """weights=[0.5, 0.5] (the average) writes base + (a + b) / 2 at every entry either delta changes."""
    model = base(tiny_lm_dir)
    original = state(model)
    multi = MultiDelta(model).load("a", deltas["a"]).load("b", deltas["b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multi.fuse(["a", "b"], as_name="mean", weights=[0.5, 0.5])
        multi.fuse(["a", "b"], as_name="sum")
    multi.activate("sum")
    summed = state(model)
    multi.activate("mean")
    for name, value in state(model).items():
        expected = original[name] + (summed[name] - original[name]) / 2
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    for bad in ([1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weights must be 2 finite numbers"):
            multi.fuse(["a", "b"], as_name="bad", weights=bad)
    assert "bad" not in multi.names


def test_s2ft_deltas_on_disjoint_channels_fuse_without_touching_each_other(tiny_lm_dir, deltas):
    model, multi, report, caught, both = fused_against_both(tiny_lm_dir, deltas, "s_large", "s_small")
    assert report.overlapping == 0 and not caught
    assert_same(model, both.state_dict())  # disjoint blocks: bit for bit what applying both gives
    kinds = {part.dim for part in multi._deltas["both"]}
    assert kinds == {0, 1}  # still row and column blocks, not expanded into entries
    multi.activate(None)
    assert_same(model, state(base(tiny_lm_dir)))


def test_overlapping_s2ft_deltas_add_and_are_reported(tiny_lm_dir, deltas, tmp_path):
    again = make_delta(tiny_lm_dir, tmp_path / "again", attach_s2ft("largest"), 9)  # same channels, other values
    model = base(tiny_lm_dir)
    multi = MultiDelta(model).load("s", deltas["s_large"]).load("again", again)
    with pytest.warns(UserWarning, match="overlap at"):
        report = multi.fuse(["s", "again"], as_name="sum")
    assert report.overlaps == multi.entries("s") == report.entries  # every entry of the block, counted once
    multi.activate("sum")
    torch.testing.assert_close(model.state_dict(), apply_delta(apply_delta(base(tiny_lm_dir), deltas["s_large"]),
                                                               again).state_dict(), rtol=0, atol=1e-6)


def test_unknown_name_fails_in_one_line_and_changes_nothing(tiny_lm_dir, deltas):
    model = base(tiny_lm_dir)
    multi = MultiDelta(model).load("a", deltas["a"])
    multi.activate("a")
    merged = state(model)
    for call in (lambda: multi.activate("nope"), lambda: multi.fuse(["a", "nope"], as_name="x"),
                 lambda: multi.unload("nope")):
        with pytest.raises(UnknownDeltaError) as error:
            call()
        assert "\n" not in str(error.value) and "'nope'" in str(error.value) and "loaded: 'a'" in str(error.value)
        assert multi.active == "a" and multi.names == ["a"]
        assert_same(model, merged)
    with pytest.raises(ValueError, match="loaded already"):
        multi.load("a", deltas["b"])


def test_a_delta_for_another_base_fails_in_one_line_and_changes_nothing(tiny_lm_dir, deltas, tmp_path):
    config = LlamaConfig(vocab_size=257, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wider")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "wider").eval()
    multi = MultiDelta(model)
    before = state(model)
    for name in ("a", "s_large", "peft"):
        with pytest.raises(DeltaFileError) as error:
            multi.load(name, deltas[name])
        assert "\n" not in str(error.value) and "the model was not changed" in str(error.value)
    assert multi.names == [] and multi.active is None
    assert_same(model, before)
    with pytest.raises(FileNotFoundError, match="no such delta directory"):
        multi.load("missing", tmp_path / "missing")


def test_loading_while_a_delta_is_active_reads_against_the_base_and_keeps_it_active(tiny_lm_dir, deltas):
    model = base(tiny_lm_dir)
    multi = MultiDelta(model).load("a", deltas["a"])
    multi.activate("a")
    merged = state(model)
    multi.load("b", deltas["b"])
    assert multi.active == "a"
    assert_same(model, merged)
    multi.unload("a")
    assert multi.active is None and multi.names == ["b"]
    assert_same(model, state(base(tiny_lm_dir)))


def test_a_model_with_delta_layers_is_refused(tiny_lm_dir):
    model = base(tiny_lm_dir)
    attach_random(0)(model)
    assert delta_layers(model)
    with pytest.raises(ValueError, match="merge_and_unwrap"):
        MultiDelta(model)
