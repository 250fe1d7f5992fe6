"""Sequence packing: rows hold several examples, positions restart per example, and no example sees another (the
logits of each packed example equal its logits alone, fp32, on a tiny LLaMA)."""

import json
import random

import lightning as L
import pytest
import torch

from datamodules.instruction import IGNORE_INDEX, InstructionDataModule, collate_for_training
from datamodules.packing import collate_packed, pack_examples, packed_forward_kwargs, padding_fraction
from datamodules.sampling import ResumableDataLoader
from sparse_lightning.modules import CausalLMModule


def random_examples(count: int, vocab: int, longest: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = rng.randint(2, longest)
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def test_best_fit_decreasing_keeps_every_example_once_within_the_row_length():
    examples = random_examples(60, vocab=50, longest=40)
    rows, stats = pack_examples(examples, max_length=64)
    assert stats.examples == 60 and stats.rows == len(rows) < 60
    assert all(len(row["input_ids"]) <= 64 for row in rows)
    # cut each row at its position resets: the pieces are exactly the examples (as a multiset)
    pieces = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert row["position_ids"] == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        for a, b in zip(starts, starts[1:]):
            pieces.append(tuple(row["input_ids"][a:b]))
            assert row["labels"][a] == IGNORE_INDEX  # never predicted from the previous example
    assert sorted(pieces) == sorted(tuple(e["input_ids"]) for e in examples)
    assert stats.tokens == sum(len(e["input_ids"]) for e in examples)
    assert pack_examples(examples, 64)[0] == rows  # deterministic
    with pytest.raises(ValueError, match="example 0 has 10 tokens, more than the row length 8"):
        pack_examples([{"input_ids": [1] * 10, "labels": [1] * 10}], 8)


def test_packed_batch_pads_as_its_own_sequence():
    rows, _ = pack_examples([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                             {"input_ids": [4, 4, 4, 4, 4, 4], "labels": [4] * 6}], max_length=6)
    batch = collate_packed(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[4, 4, 4, 4, 4, 4], [5, 6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 4, 4, 4, 4, 4], [-100, 6, 7, -100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert padding_fraction([batch]) == pytest.approx(1 / 12)
    assert packed_forward_kwargs(batch)["attention_mask"] is None and not packed_forward_kwargs(batch)["use_cache"]


@pytest.fixture(scope="module")
def tiny_lm_module(tiny_lm_dir):
    module = CausalLMModule(str(tiny_lm_dir))
    module.configure_model()
    return module


@torch.no_grad()
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_logits(tiny_lm_module, attention):
    """The leakage test: each example's logits inside a packed row equal its logits alone (fp32), in training mode as
    the module runs it; and the packed loss is the token-weighted mean of the per-example losses."""
    model = tiny_lm_module.model
    model.set_attn_implementation(attention)
    vocab = model.config.vocab_size
    examples = random_examples(12, vocab=vocab, longest=30, seed=1)
    rows, stats = pack_examples(examples, max_length=48)
    assert stats.rows < len(examples) // 2  # several examples per row
    batch = collate_packed(rows, pad_token_id=0)
    model.train()
    packed = tiny_lm_module(batch)
    assert packed.logits.dtype == torch.float32
    checked, loss_sum, label_count = 0, 0.0, 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            alone = collate_for_training([{"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]}], 0)
            single = tiny_lm_module(alone)
            torch.testing.assert_close(packed.logits[r, a:b], single.logits[0], rtol=1e-5, atol=1e-5)
            labelled = int((alone["labels"][0, 1:] != IGNORE_INDEX).sum())
            loss_sum += single.loss.item() * labelled
            label_count += labelled
            checked += 1
    assert checked == len(examples)
    assert packed.loss.item() == pytest.approx(loss_sum / label_count, rel=1e-5)


def test_the_mask_really_is_needed(tiny_lm_module):
    """Control: the same row given the padding mask (or a cache) lets the second example attend to the first."""
    model = tiny_lm_module.model
    model.set_attn_implementation("sdpa")
    rows, _ = pack_examples(random_examples(2, vocab=model.config.vocab_size, longest=10, seed=3), max_length=20)
    batch = collate_packed(rows, 0)
    first = rows[0]["position_ids"].index(0, 1)
    alone = model(input_ids=batch["input_ids"][:, first:]).logits
    leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                  attention_mask=batch["attention_mask"]).logits
    packed = model(**packed_forward_kwargs(batch)).logits
    assert not torch.allclose(leaky[:, first:], alone, atol=1e-3)
    torch.testing.assert_close(packed[:, first:], alone, rtol=1e-5, atol=1e-5)


def alpaca_file(path, count: int):
    rng = random.Random(0)
    records = [{"instruction": f"Repeat {'word ' * rng.randint(1, 12)}", "input": "",
                "output": " ".join(str(i) for i in range(rng.randint(1, 20)))} for _ in range(count)]
    path.write_text(json.dumps(records))
    return path


def test_instruction_datamodule_packs_its_training_rows_only(tiny_lm_dir, tmp_path):
    data = alpaca_file(tmp_path / "a.json", 40)
    kwargs = dict(data_files=str(data), tokenizer_name_or_path=str(tiny_lm_dir), max_length=1024, batch_size=4,
                  val_fraction=0.1)
    plain, packed = InstructionDataModule(**kwargs), InstructionDataModule(**kwargs, packing=True)
    for datamodule in (plain, packed):
        datamodule.setup("fit")
    loader = packed.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)  # resumable order over the packed rows
    batches = list(loader)
    assert all(set(b) == {"input_ids", "attention_mask", "labels", "position_ids"} for b in batches)
    plain_batches = list(plain.train_dataloader())
    assert len(batches) < len(plain_batches)
    # every training token is there once; labels differ only at each example's first token (never a target)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert real == sum(len(e["input_ids"]) for e in plain.train_examples)
    targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert targets == sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in plain.train_examples)
    assert padding_fraction(batches) < padding_fraction(plain_batches)
    assert [b["input_ids"].tolist() for b in packed.train_dataloader()] == [b["input_ids"].tolist() for b in batches]
    assert "position_ids" not in next(iter(packed.val_dataloader()[0]))  # evaluation is not packed


def test_a_packed_run_trains(tiny_lm_dir, tmp_path):
    data = alpaca_file(tmp_path / "a.json", 40)
    datamodule = InstructionDataModule(data_files=str(data), tokenizer_name_or_path=str(tiny_lm_dir), max_length=1024,
                                       batch_size=2, val_fraction=0.1, packing=True)
    module = CausalLMModule(str(tiny_lm_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=3)
    trainer.fit(module, datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/loss" in trainer.callback_metrics
