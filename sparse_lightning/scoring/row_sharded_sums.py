"""A weight-sized score summed over batches and ranks, each rank holding only its rows; its top-k, the same on every
rank without a broadcast.

Rows are cut as FSDP2 cuts a weight (`Shard(0)`): ceil(rows / N) per rank in rank order, the last ranks holding
fewer (or none). Each batch's gradient is reduce-scattered into the rows this rank keeps, so a rank holds 1/N of the
sum; the rows past the weight's end are zero padding that never ranks. The top-k is canonical: the k largest scores,
ties going to the lower flat position. Each rank takes that of its rows, all ranks gather the N x k candidates
(values and global positions, in position order), and every rank takes the same canonical top-k of the same
gathered numbers, which is the canonical top-k of the whole sum.

On one process nothing is cut: the sum is the whole weight's, its additions those of a plain accumulator, and its top-k
`torch.topk`'s, as before ranks were sharded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparse_lightning.distributed import all_gather_cat, rank, reduce_scatter_sum, world_size


def rows_per_rank(rows: int, world: int) -> int:
    return math.ceil(rows / world)


def share_bytes(shape: torch.Size, world: int) -> int:
    """Bytes of one rank's fp32 rows of a `shape`-sized sum (the whole of it on one process)."""
    return 4 * rows_per_rank(shape[0], world) * math.prod(shape[1:])


def top_k_positions(scores: Tensor, k: int) -> Tensor:
    """The flat positions of the k largest scores, sorted (ties broken as `torch.topk` breaks them)."""
    return torch.topk(scores.view(-1), k, sorted=False).indices.sort().values


def canonical_top_k(scores: Tensor, k: int) -> Tensor:
    """The flat positions of the k largest of a 1-D `scores`, ties to the lower position, sorted; holds one bool per
    score beside a `torch.topk`."""
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    kth = torch.topk(scores, k, sorted=False).values.min()
    above = (scores > kth).nonzero().view(-1)
    tied = (scores == kth).nonzero().view(-1)[:k - above.numel()]
    return torch.cat([above, tied]).sort().values


class RowShardedSum:
    """This rank's rows of the fp32 sum over batches and ranks of a weight's gradients (`add_` one batch's gradient
    on every rank, in the same order), and the top-k of its absolute value."""

    def __init__(self, shape: torch.Size, device: torch.device, group=None) -> None:
        self.shape, self.group = torch.Size(shape), group
        self.world, self.rank = world_size(group), rank(group)
        self.rows = rows_per_rank(self.shape[0], self.world)
        self.first_row = self.rank * self.rows
        self.own_rows = max(0, min(self.rows, self.shape[0] - self.first_row))
        self.total = torch.zeros((self.rows, *self.shape[1:]), dtype=torch.float32, device=device)

    @torch.no_grad()
    def add_(self, grad: Tensor) -> None:
        if self.world == 1:
            self.total.add_(grad)
            return
        padded_rows = self.rows * self.world
        if grad.dtype != torch.float32 or grad.shape[0] != padded_rows:
            padded = grad.new_zeros((padded_rows, *self.shape[1:]), dtype=torch.float32)
            padded[:self.shape[0]].copy_(grad)
            grad = padded
        self.total.add_(reduce_scatter_sum(grad, self.group))

    @torch.no_grad()
    def top_k(self, k: int) -> Tensor:
        """The sorted flat positions (in the whole weight) of the k largest |sum|; consumes the sum. On several ranks
        every rank gets the same canonical top-k; on one, `torch.topk`'s."""
        if self.world == 1:
            return top_k_positions(self.total[:self.own_rows].abs_().view(-1), k)
        return self.top_k_scores(k)[1]

    @torch.no_grad()
    def top_k_scores(self, k: int) -> tuple[Tensor, Tensor]:
        """The canonical top-k of |sum| over all ranks (ties to the lower position), the same on every rank: (|sum|,
        flat positions in the whole weight), in position order; consumes the sum."""
        scores = self.total[:self.own_rows].abs_().view(-1)
        own = canonical_top_k(scores, min(k, scores.numel()))
        if self.world == 1:
            return scores[own], own
        values = torch.full((k,), -1.0, device=scores.device)  # padding below every |score|: never chosen
        positions = torch.full((k,), -1, dtype=torch.long, device=scores.device)
        values[:own.numel()] = scores[own]
        positions[:own.numel()] = own + self.first_row * math.prod(self.shape[1:])
        values, positions = all_gather_cat(values, self.group), all_gather_cat(positions, self.group)
        # candidates are in position order (ranks' rows in order, each rank's sorted), padding aside: ties by index
        # among them are ties by position
        real = positions >= 0
        values, positions = values[real], positions[real]
        best = canonical_top_k(values, k)
        return values[best], positions[best]
