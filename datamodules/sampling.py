"""Training order as a function of (seed, epoch), and a loader whose position Lightning checkpoints.

A run killed mid-epoch or at an epoch boundary and resumed with `ckpt_path` then sees exactly the batches the
uninterrupted run would have seen: the order of epoch e is `randperm(seed + e)` (what `DistributedSampler` draws, so
ranks split it the same way), and the loader's `state_dict` (epoch, batches consumed) is saved by Lightning's fit loop
with every checkpoint and restored before the resumed epoch starts, which then skips the consumed batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def check_sample_limits(**limits: int | None) -> None:
    """`max_*_samples` limits are None (all records) or positive: 0 would leave a split empty and fail far away."""
    for name, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive number of records (or null for all of them), got {value!r}")


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (shuffled by seed + epoch, split over ranks; Lightning calls `set_epoch`) that can start
    an epoch part-way through. With one process it is a seeded per-epoch shuffle."""

    def __init__(self, dataset: Dataset, *, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already consumed)
        self.start = 0

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Skip the first `consumed` samples of `epoch`, if that is the next epoch iterated."""
        self._resume = (epoch, consumed)

    def begin_epoch(self) -> int:
        """Fix where the coming pass starts (the pending resume applies only to its own epoch); returns the offset."""
        self.start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            self.start = self._resume[1]
        self._resume = None
        return self.start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a `ResumableSampler` whose position is saved in checkpoints: Lightning's fit loop
    stores `state_dict()` of every loader that has one and calls `load_state_dict` when it resumes mid-epoch."""

    def __init__(self, dataset: Dataset, *, batch_size: int, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._epoch = 0
        self._batches = 0  # batches handed out in `_epoch`, counting those skipped on resume

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first `next`, after Lightning has called `set_epoch` for the epoch.
        sampler: ResumableSampler = self.sampler
        skipped = sampler.begin_epoch()
        self._epoch, self._batches = sampler.epoch, skipped // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(f"the checkpoint was written with batch_size {state['batch_size']}, this run uses "
                             f"{self.batch_size}: resuming mid-epoch needs the same batch size")
        self._epoch, self._batches = state["epoch"], state["batches"]
        self.sampler.resume_at(state["epoch"], state["batches"] * self.batch_size)


def resumable_train_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, trainer: Any = None,
                           **kwargs: Any) -> ResumableDataLoader:
    """The training loader every datamodule here uses: order by (seed, epoch), split over the trainer's ranks."""
    split: dict[str, int] = {}
    if trainer is not None and trainer.world_size > 1:
        split = dict(trainer.strategy.distributed_sampler_kwargs or {})
        split.pop("shuffle", None)
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, **split)
    # Its own generator: starting an epoch then draws nothing from the global RNG, whose state (dropout) the
    # module checkpoints and restores, so a resumed run's dropout masks continue where they stopped.
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)


class ResumableTrainPosition:
    """Mixin (before `LightningDataModule`) that also carries the training loader's position in the datamodule's
    checkpointed state. Lightning restores loader states only when it builds the loader after restoring the
    checkpoint, and a module whose `configure_optimizers` reads `trainer.estimated_stepping_batches` makes it build
    the loader first; the datamodule's `load_state_dict` comes early enough either way."""

    _pending_position: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        loader = self._trainer_train_loader()
        return {"train_position": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = state.get("train_position")
        loader = self._trainer_train_loader()
        if position is not None and loader is not None:  # the trainer built its loader already
            loader.load_state_dict(position)
        else:
            self._pending_position = position

    def _resume_position(self, loader: ResumableDataLoader) -> ResumableDataLoader:
        """Hand a restored position to the first training loader built after the restore (the trainer's)."""
        if self._pending_position is not None:
            loader.load_state_dict(self._pending_position)
            self._pending_position = None
        return loader

    def _trainer_train_loader(self) -> ResumableDataLoader | None:
        trainer = getattr(self, "trainer", None)
        loader = trainer.train_dataloader if trainer is not None else None
        return loader if isinstance(loader, ResumableDataLoader) else None
