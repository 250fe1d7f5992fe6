"""Progress of `sparse-lightning fit`: a bar in a terminal, a plain line every few dozen steps in a log file.

Lightning's default bar (Rich) reads `Epoch 0/-2` when only `max_steps` bounds a run and shows the logger's
version as a metric; redirected to a file it prints nothing until the end. The CLI puts one of these in its place
(`progress_for`) unless the config names a progress bar itself.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


def _total_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    total = trainer.estimated_stepping_batches
    return int(total) if total != float("inf") else None


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar without the logger's version number among the metrics (for a terminal)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ProgressLines(ProgressBar):
    """A plain line every `every` optimizer steps (default: the trainer's `log_every_n_steps`) and after each
    validation: step/total, training loss, steps per second, elapsed and remaining time (for a log file).

        step 50/450 (11%) | train/loss 0.4113 | 0.92 steps/s | 0:54 elapsed, 7:14 left
    """

    def __init__(self, every: int | None = None, stream: TextIO | None = None) -> None:
        super().__init__()
        if every is not None and every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every = every
        self.stream = stream
        self._enabled = True
        self._started: float | None = None
        self._first_step = 0
        self._last_printed = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _print(self, trainer: pl.Trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started, self._first_step = time.monotonic(), trainer.global_step
        total = _total_steps(trainer)
        self._print(trainer, f"training: step {trainer.global_step}" + (f" of {total}" if total else "")
                    + f", a line every {self.every or trainer.log_every_n_steps} steps")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        total = _total_steps(trainer)
        if step == self._last_printed or (step % (self.every or trainer.log_every_n_steps) and step != total):
            return
        self._last_printed = step
        elapsed = time.monotonic() - (self._started or time.monotonic())
        rate = (step - self._first_step) / elapsed if elapsed > 0 else 0.0
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        parts += [f"{name} {value:.4f}" for name, value in self.get_metrics(trainer, pl_module).items()
                  if name != "v_num" and isinstance(value, float)]
        timing = f"{_clock(elapsed)} elapsed"
        if total and rate > 0:
            timing += f", {_clock((total - step) / rate)} left"
        parts += [f"{rate:.2f} steps/s", timing]
        self._print(trainer, " | ".join(parts))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()
                   if name.startswith("val/") and getattr(value, "numel", lambda: 1)() == 1}
        if metrics:
            self._print(trainer, f"validation at step {trainer.global_step}: "
                        + ", ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items())))


def progress_for(stream: TextIO | None = None) -> ProgressBar:
    """The bar for a terminal, plain lines for anything else (a file, a pipe)."""
    stream = stream or sys.stdout
    return StepProgressBar() if stream.isatty() else ProgressLines()
