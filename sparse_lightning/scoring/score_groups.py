"""Exact summed scores in bounded memory: score the weights a group at a time.

A score that sums a dense gradient over several calibration batches needs an entry's whole sum before it can be
ranked, so an exact sum costs a weight-sized accumulator per weight being scored; all of them at once cost about the
model's size again. Instead the weights are split, in model order, into groups whose accumulators fit a budget, and
the calibration batches run once per group: each entry's sum is the same additions in the same order as the
all-at-once sum, so the scores, and what is chosen from them, are bitwise the same (for a deterministic backward).
Memory is traded for passes: a budget of `score_memory` runs about 1 / score_memory times the batches.
"""

from __future__ import annotations

#: The default budget: the accumulators held at once take 1/8 of a full fp32 score for every scored weight (about
#: 0.1x the parameter bytes of an fp32 LLaMA-style model, 0.2x of a bf16 one), for about 8 passes over the batches.
DEFAULT_SCORE_MEMORY = 0.125


def check_score_memory(score_memory: float) -> float:
    if not 0.0 < score_memory <= 1.0:
        raise ValueError(f"score_memory must be in (0, 1] (a fraction of a full fp32 score for every target weight; "
                         f"1 holds them all at once), got {score_memory}")
    return score_memory


def groups_within(sizes: dict[str, int], score_memory: float) -> list[list[str]]:
    """`sizes` (each name's accumulator bytes, in model order) split in order into groups holding at most
    `score_memory` x the total each; a name larger than that alone forms a group of its own."""
    budget = check_score_memory(score_memory) * sum(sizes.values())
    groups: list[list[str]] = []
    used = 0
    for name, size in sizes.items():
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups
