"""Issue 26, adapters users receive: a PEFT `adapter_config.json` cannot hang us (case 1) or slip a regex through
`modules_to_save` (case 15); every reader of a PEFT adapter (`apply_delta`, `fit --model.init_delta`, `evaluate`,
`MultiDelta.load`) goes through the same checks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from sparse_lightning.callbacks import RandomMaskCallback
from sparse_lightning.export import DeltaFileError, apply_delta
from sparse_lightning.name_pattern import NamePattern, NamePatternError
from sparse_lightning.peft_interop import ADAPTER_CONFIG, write_peft_adapter
from sparse_lightning.sparse import sparse_delta_layers

HOSTILE = "(.*.*)*Z"  # exponential for a backtracking engine on any name without a Z


@pytest.fixture(scope="module")
def adapter(tiny_lm_dir: Path, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    RandomMaskCallback(density=0.1).attach(model)
    for layer in sparse_delta_layers(model).values():
        layer.delta_values.data.normal_(0.0, 0.05)
    return write_peft_adapter(model, tmp_path_factory.mktemp("adapter") / "peft", dense=[],
                              base_model=str(tiny_lm_dir))


def with_config(adapter: Path, tmp_path: Path, **changes) -> Path:
    directory = tmp_path / "adapter"
    shutil.copytree(adapter, directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    (directory / ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))
    return directory


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_backtracking_bomb_in_target_modules_ends_at_once_in_every_reader(adapter, tiny_lm_dir, tmp_path):
    """On a backtracking engine each reader below never returns; run them in a child with a deadline."""
    directory = with_config(adapter, tmp_path, target_modules=HOSTILE)
    script = textwrap.dedent(f"""
        import torch
        from transformers import LlamaForCausalLM
        from sparse_lightning import MultiDelta
        from sparse_lightning.export import DeltaFileError, apply_delta
        from sparse_lightning.modules import CausalLMModule
        model = LlamaForCausalLM.from_pretrained({str(tiny_lm_dir)!r})
        before = {{k: v.clone() for k, v in model.state_dict().items()}}
        for read in (lambda: apply_delta(model, {str(directory)!r}),
                     lambda: MultiDelta(model).load("x", {str(directory)!r}),
                     lambda: CausalLMModule({str(tiny_lm_dir)!r}, init_delta={str(directory)!r})._merge_init_delta(model)):
            try:
                read()
            except DeltaFileError as error:
                assert "target_modules does not select it" in str(error), error
            else:
                raise AssertionError("applied")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        print("done")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]


def test_a_regex_target_modules_selects_what_pythons_re_selects(adapter, tiny_lm_dir, tmp_path):
    names = json.loads((adapter / ADAPTER_CONFIG).read_text())["target_modules"]
    pattern = "|".join(re.escape(name) for name in names)
    expected = apply_delta(LlamaForCausalLM.from_pretrained(tiny_lm_dir), adapter).state_dict()
    got = apply_delta(LlamaForCausalLM.from_pretrained(tiny_lm_dir),
                      with_config(adapter, tmp_path, target_modules=pattern)).state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.[qkv]_proj",
                                     r"(a|ab)(c|bcd)(d*)", r"a{2,3}b?", r"^[^a-z]+$", r"(?:x|y)+?", r"(a*)*", r"x|",
                                     r"\w+\.\d\.\w*", r"[a-c\d.]*"])
def test_the_linear_matcher_agrees_with_re_fullmatch(pattern: str):
    names = ["model.layers.12.self_attn.q_proj", "model.layers.3.self_attn.v_proj", "model.layers.x.self_attn.k_proj",
             "abcd", "abcdd", "ab", "aab", "aaab", "a", "", "XY.1", "xyx", "foo.1.bar", "abc1.", "a.b.v_proj", "Z"]
    compiled = NamePattern(pattern)
    for name in names:
        assert compiled.fullmatch(name) == (re.fullmatch(pattern, name) is not None), name


@pytest.mark.parametrize("pattern,message", [
    (r"^(?!.*vision).*q_proj", "lookarounds"), (r"(a)\1", "backreferences"), (r"(?i)q_proj", "inline flags"),
    (r"\bq_proj", "word boundaries"), ("(a{1000}){1000}", "too large"), ("(" * 3000 + ")" * 3000, "too deeply"),
    ("[", "not a valid regular expression")])
def test_what_the_matcher_cannot_do_is_refused_in_one_line(adapter, tiny_lm_dir, tmp_path, pattern, message):
    with pytest.raises(NamePatternError, match=message):
        NamePattern(pattern)
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    before = state(model)
    with pytest.raises(DeltaFileError, match=f"'target_modules' .*{message}") as error:
        apply_delta(model, with_config(adapter, tmp_path, target_modules=pattern))
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("entry", ["lm_head(", "(.*.*)*Z", "lm_head|embed"])
def test_a_regex_in_modules_to_save_is_refused_in_one_line(adapter, tiny_lm_dir, tmp_path, entry: str):
    """Case 15: PEFT splices these names into a regex unescaped (re.error, or a hang)."""
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    with pytest.raises(DeltaFileError, match=f"'modules_to_save' entry {re.escape(repr(entry))} is not a module name"):
        apply_delta(model, with_config(adapter, tmp_path, modules_to_save=[entry]))


def test_a_callbacks_target_modules_go_through_the_same_matcher():
    """A config's or checkpoint's `target_modules` reach `name_matches`: the same bomb ends at once there."""
    from sparse_lightning.sparse.inject import name_matches

    name = "model.layers.0.self_attn.q_proj" * 4
    assert not name_matches(name, HOSTILE)
    assert name_matches("model.layers.3.self_attn.q_proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj")
    with pytest.raises(NamePatternError, match="lookarounds"):
        name_matches("model.layers.3.self_attn.q_proj", r"^(?!.*vision).*q_proj")
