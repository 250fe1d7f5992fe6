"""Sequence packing for the causal-LM datamodules: several examples per row, none attending to another.

`pack_examples` puts tokenized examples ({input_ids, labels}) into rows of at most `max_length` tokens, best-fit
decreasing (longest example first, into the fullest row it still fits), once, deterministically: the rows are a plain
list, so the resumable (seed, epoch) sampler shuffles rows exactly as it shuffles examples, and a resumed run sees the
same batches.

A packed row carries `position_ids` that restart at 0 for every example. transformers (>= 4.54, its `masking_utils`)
builds a block-diagonal causal mask from such position ids when the model is called with **no** 2D attention mask and
**no** cache (`attention_mask=None, use_cache=False`): sdpa, eager and flex attention get the block-diagonal mask, and
flash-attention runs variable-length kernels from the same position ids. So each example sees only itself, with the
positions (rotary angles) it would have alone. `packed_forward_kwargs` is that call; `CausalLMModule.forward` uses it.
A model whose code does not build its mask through `masking_utils` would attend across examples: the leakage test
(tests/test_packing.py) checks logits per example against unpacked runs.

The first label of every packed example is -100: unpacked, a sequence's first token is never a target (nothing comes
before it); packed, it would be predicted from the previous example's last token.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from datamodules.padding import IGNORE_INDEX, pad_sequences


@dataclass
class PackingStats:
    """How packing filled the rows (tokens are real tokens; rows hold at most `max_length`)."""

    examples: int
    rows: int
    tokens: int
    max_length: int

    @property
    def fill(self) -> float:
        """Real tokens over the rows' capacity (rows * max_length)."""
        return self.tokens / (self.rows * self.max_length) if self.rows else 0.0

    def summary(self, name: str) -> str:
        return (f"{name}: packed {self.examples} examples into {self.rows} rows of up to {self.max_length} tokens "
                f"({self.examples / max(self.rows, 1):.2f} examples per row, rows {100 * self.fill:.1f}% full)")


def pack_examples(
    examples: Sequence[Mapping[str, list[int]]], max_length: int
) -> tuple[list[dict[str, list[int]]], PackingStats]:
    """Best-fit-decreasing packing of {input_ids, labels} examples into rows of at most `max_length` tokens.

    Each row is {input_ids, labels, position_ids}; within a row, examples keep their tokens and labels (the first
    label of each set to -100) and positions restart at 0. Deterministic: ties are broken by the example's index.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 to pack, got {max_length}")
    too_long = [i for i, example in enumerate(examples) if len(example["input_ids"]) > max_length]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {len(examples[too_long[0]]['input_ids'])} tokens, more than the "
                         f"row length {max_length}: truncate examples to max_length before packing")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: best fit = the first with enough room
    for index in order:
        length = len(examples[index]["input_ids"])
        if length == 0:
            continue
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([index])
            bisect.insort(free, (max_length - length, len(rows) - 1))
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            bisect.insort(free, (room - length, row))
    packed = [_concatenate([examples[i] for i in row]) for row in rows]
    tokens = sum(len(row["input_ids"]) for row in packed)
    return packed, PackingStats(examples=sum(map(len, rows)), rows=len(rows), tokens=tokens, max_length=max_length)


def _concatenate(examples: Sequence[Mapping[str, list[int]]]) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX] + list(example["labels"][1:])
        position_ids += range(len(example["input_ids"]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_packed(rows: Sequence[Mapping[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded packed rows: `input_ids`, `labels` (-100 on padding and on each example's first token),
    `position_ids` (restarting per example; the padding is one more sequence, 0, 1, ..., so it never joins the
    last example) and `attention_mask` (1 on real tokens: a padding mask for counting, which the model must NOT get,
    see `packed_forward_kwargs`)."""
    input_ids = [row["input_ids"] for row in rows]
    longest = max(len(ids) for ids in input_ids)
    positions = [list(row["position_ids"]) + list(range(longest - len(row["position_ids"]))) for row in rows]
    return {
        "input_ids": pad_sequences(input_ids, pad_token_id),
        "attention_mask": pad_sequences([[1] * len(ids) for ids in input_ids], 0),
        "labels": pad_sequences([row["labels"] for row in rows], IGNORE_INDEX),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }


def is_packed(batch: Mapping[str, Any]) -> bool:
    """A packed batch carries `position_ids` (the unpacked collators never do)."""
    return "position_ids" in batch


def packed_forward_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for a HF causal LM on a packed batch: position ids, no attention mask and no cache, the one
    call under which transformers masks each example off from the others."""
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None,
              "use_cache": False}
    if "labels" in batch:
        kwargs["labels"] = batch["labels"]
    return kwargs


def padding_fraction(batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Padding tokens over all tokens of the given batches (from their `attention_mask`)."""
    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    total = sum(batch["attention_mask"].numel() for batch in batches)
    return 1.0 - real / total if total else 0.0
