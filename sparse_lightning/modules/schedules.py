"""Learning-rate schedules as LambdaLR factors: linear warmup, then linear or cosine decay, or constant."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

Schedule = Literal["linear", "cosine", "constant"]


def warmup_then_decay(schedule: Schedule, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
