"""Token-id padding shared by the instruction datamodules and packing (a module of its own, so neither imports the
other for it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: The label PyTorch's cross-entropy ignores: prompt tokens, padding, and the first token of each packed example.
IGNORE_INDEX = -100


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Stack variable-length id lists into one [batch, longest] LongTensor, padding on the right or left."""
    longest = max(len(sequence) for sequence in sequences)
    rows = [
        [value] * (longest - len(s)) + list(s) if left else list(s) + [value] * (longest - len(s)) for s in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)
