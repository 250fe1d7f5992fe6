"""Random mask: k uniformly random entries per target weight, chosen once and never moved.

The baseline every sparse method must beat (SHiRA and SpaRTA train such masks; the SIFT paper's random-selection
ablation). Positions come from `seed` and the weight's name only, so ranks, resumed runs and reruns agree.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparse_lightning.callbacks.base import ElementSparseCallback
from sparse_lightning.methods.random_mask import select_at_random
from sparse_lightning.methods.seeding import run_seed
from sparse_lightning.sparse import SparseDeltaLinear


class RandomMaskCallback(ElementSparseCallback):
    """Train k fixed, uniformly random entries of each target weight.

    Args:
        density: fraction of each target weight's entries to train (default 0.01).
        num_params: total trainable entries over all targets, split in proportion to their sizes.
        lora_rank: as many entries as LoRA of this rank would train on the same targets.
        target_modules: module-name patterns; default: the architecture's own.
        exclude_modules: patterns removed from the targets.
        dense_modules: modules trained densely (default: the task module's new heads).
        seed: draws the positions (with each weight's name); default: the run's `seed_everything` value.
    """

    method = "random_mask"

    def __init__(
        self,
        density: float | None = None,
        num_params: int | None = None,
        lora_rank: int | None = None,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        dense_modules: list[str] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(density, num_params, lora_rank, target_modules, exclude_modules, dense_modules)
        self.seed = seed

    def initialize(self, layers: dict[str, SparseDeltaLinear], model: nn.Module) -> None:
        select_at_random(model, run_seed(self.seed))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seed": run_seed(self.seed)}
