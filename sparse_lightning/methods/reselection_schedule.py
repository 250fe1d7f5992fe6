"""When SpIEL moves its slots and how many: SpIEL's published cycle, in optimizer steps.

Cycle c accumulates statistics over steps [c*S, c*S + A) and reselects just before step c*S + A. The
first reselection (step A) replaces every random initial index; later ones replace a fraction
xi * (1 - t/T) (or xi * (1 + cos(pi t/T)) / 2) of each tensor's slots; nothing moves at or past T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ReselectionSchedule:
    interval: int = 20  # S
    accumulation_steps: int = 5  # A
    regrow_fraction: float = 0.2  # xi
    until: int = 1_000_000  # T
    decay: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.interval <= self.accumulation_steps:
            raise ValueError(f"reselection_interval ({self.interval}) must be larger than accumulation_steps "
                             f"({self.accumulation_steps}): each cycle accumulates, then reselects, then trains")
        if not 0.0 < self.regrow_fraction <= 1.0:
            raise ValueError(f"regrow_fraction must be in (0, 1], got {self.regrow_fraction}")
        if self.decay not in ("linear", "cosine"):
            raise ValueError(f"decay must be 'linear' or 'cosine', got {self.decay!r}")

    def reselects_at(self, step: int) -> bool:
        """Whether slots move just before optimizer step `step` (0-based)."""
        return step % self.interval == self.accumulation_steps and step < self.until

    def window_starts_at(self, step: int) -> bool:
        """Whether a statistics window opens at `step` (only if its reselection will happen)."""
        return step % self.interval == 0 and self.reselects_at(step + self.accumulation_steps)

    def in_window(self, step: int) -> bool:
        return step % self.interval < self.accumulation_steps and self.reselects_at(
            step - step % self.interval + self.accumulation_steps)

    def fraction_at(self, step: int) -> float:
        """Fraction of each tensor's slots replaced at a reselection step: 1 at the first."""
        if step == self.accumulation_steps:
            return 1.0
        progress = min(step / self.until, 1.0)
        if self.decay == "linear":
            return self.regrow_fraction * (1.0 - progress)
        return self.regrow_fraction * 0.5 * (1.0 + math.cos(math.pi * progress))
