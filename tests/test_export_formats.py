"""One export pipeline: every format records the same metadata block, gets a model card, and applies back to the
same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from sparse_lightning.borders.apply import apply_delta
from sparse_lightning.borders.export import WRITERS, export_model
from sparse_lightning.borders.peft import adapter_metadata
from sparse_lightning.callbacks import RandomMaskCallback
from sparse_lightning.sparse import freeze_except, sparse_delta_layers


def trained_lm(base_dir: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    RandomMaskCallback(density=0.1).attach(model)
    for layer in sparse_delta_layers(model).values():
        layer.delta_values.data.normal_(0.0, 0.05)
    freeze_except(model, [])
    return model


def recorded(directory: Path, format: str) -> dict:
    if format == "delta":
        config = json.loads((directory / "delta_config.json").read_text())
        return {key: value for key, value in config.items() if key not in ("format", "targets", "dense")}
    return adapter_metadata(directory)


def test_every_format_records_the_same_metadata_and_a_card_and_applies_to_the_same_weights(tiny_lm_dir: Path,
                                                                                        tmp_path: Path):
    model = trained_lm(tiny_lm_dir)
    blocks, weights = {}, {}
    for format in WRITERS:
        written = export_model(model, tmp_path / format, base_model=str(tiny_lm_dir), format=format)
        (directory,) = written.values()
        blocks[format] = recorded(directory, format)
        assert (directory / "README.md").is_file()
        base = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
        weights[format] = apply_delta(base, directory).state_dict()
    assert blocks["delta"] == {"method": "SparseDeltaLinear", "base_model": str(tiny_lm_dir), "callbacks": []}
    assert blocks["peft"] == blocks["delta"] == blocks["peft-supertuning"]
    for format in ("peft", "peft-supertuning"):  # fp32 base: PEFT's and our additions agree exactly
        assert all(torch.equal(weights[format][name], value) for name, value in weights["delta"].items())


def test_an_unknown_format_names_the_formats_and_writes_nothing(tiny_lm_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown export format 'gguf': choose one of delta, peft, peft-supertuning"):
        export_model(trained_lm(tiny_lm_dir), tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()
