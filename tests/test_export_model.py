"""In-memory export (`export_model`, no checkpoint needed) and whole-model `merge` / `unmerge`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from sparse_lightning.callbacks import RandomMaskCallback
from sparse_lightning.export import apply_delta, export_model
from sparse_lightning.sparse import freeze_except, merge, sparse_delta_layers, unmerge


def trained(tiny_bert_dir: Path):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    RandomMaskCallback(density=0.1).attach(model)
    freeze_except(model, ["classifier"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 10)), "labels": torch.tensor([0, 1, 1, 0])}
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, batch["input_ids"]


def test_export_model_writes_delta_and_merged_and_leaves_the_model_as_it_was(tiny_bert_dir: Path, tmp_path: Path):
    model, ids = trained(tiny_bert_dir)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    written = export_model(model, tmp_path / "out", merged=True, base_model=str(tiny_bert_dir))
    assert set(written) == {"delta", "merged"}
    assert sparse_delta_layers(model) and not any(layer.merged for layer in sparse_delta_layers(model).values())
    config = json.loads((written["delta"] / "delta_config.json").read_text())
    assert config["dense"] == ["classifier.weight", "classifier.bias"] and len(config["targets"]) == 8
    merged = AutoModelForSequenceClassification.from_pretrained(written["merged"]).eval()
    rebuilt = apply_delta(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval(),
                          written["delta"])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        assert torch.equal(rebuilt(input_ids=ids).logits, merged(input_ids=ids).logits)
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_merge_then_unmerge_restores_every_base_weight_bit_for_bit(tiny_bert_dir: Path):
    model, ids = trained(tiny_bert_dir)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        unmerged_logits = model(input_ids=ids).logits
        merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged_logits, rtol=0, atol=1e-5)
    assert all(layer.merged for layer in sparse_delta_layers(model).values())
    unmerge(model)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
