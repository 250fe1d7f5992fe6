"""The seed a random selection draws with when none is given: the run's `seed_everything` value, so a run at
`--seed_everything 43` draws other positions as well as another data order and head (a seed study that kept the
selection fixed would understate the spread). Outside a seeded run it is 0, as before."""

from __future__ import annotations

import os


def run_seed(seed: int | None) -> int:
    """`seed` if given, else the run's global seed (Lightning's `PL_GLOBAL_SEED`), else 0."""
    if seed is not None:
        return seed
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))
