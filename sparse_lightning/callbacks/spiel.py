"""SpIEL (Ansell et al., 2024): k trainable entries per weight that periodically drop and regrow.

The cycle itself is `sparse_lightning.methods.spiel.PruneRegrow`; this callback starts it when training starts,
calls it before each optimizer step, and keeps its state in checkpoints.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from sparse_lightning.callbacks.base import ElementSparseCallback
from sparse_lightning.callbacks.index_history_plot import plot_index_history
from sparse_lightning.methods.reselection_schedule import ReselectionSchedule
from sparse_lightning.methods.seeding import run_seed
from sparse_lightning.methods.spiel import PruneRegrow, Regrowth, random_initial_indices
from sparse_lightning.sparse import SparseDeltaLinear, allocate_budget, sparse_delta_layers


class PruneRegrowCallback(ElementSparseCallback):
    """SpIEL: k trainable entries per weight, periodically dropping the smallest and regrowing new ones.

    Regrowth by accumulated gradient (SpIEL-AG) or by SM3 row x column momentum (SpIEL-MA, needs
    `sparse_lightning.sparse.optim.SM3`).

    Args:
        density: fraction of all the model's parameters (SpIEL's budget), split across the target weights in
            proportion to their size (default 0.01).
        num_params: total trainable entries over all targets.
        lora_rank: as many entries as LoRA of this rank would train on the same targets.
        target_modules: module-name patterns; default: the architecture's own.
        exclude_modules: patterns removed from the targets.
        dense_modules: modules trained densely (default: the task module's new heads).
        regrowth: "gradient" (SpIEL-AG) or "momentum" (SpIEL-MA).
        reselection_interval: S, optimizer steps between reselections.
        accumulation_steps: A, steps of gradient statistics before each reselection (AG).
        regrow_fraction: xi, the share of slots a later reselection replaces, decayed to 0 at T.
        reselection_until: T, the last step that reselects (default: the run's total optimizer steps).
        decay: how xi decays ("linear" or "cosine").
        seed: draws the initial random indices; default: the run's `seed_everything` value.
        plot_path: a PNG of the index-set history, written at the end of training.
    """

    def __init__(
        self,
        density: float | None = None,
        num_params: int | None = None,
        lora_rank: int | None = None,
        target_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        dense_modules: list[str] | None = None,
        regrowth: Regrowth = "gradient",
        reselection_interval: int = 20,
        accumulation_steps: int = 5,
        regrow_fraction: float = 0.2,
        reselection_until: int | None = None,
        decay: Literal["linear", "cosine"] = "linear",
        seed: int | None = None,
        plot_path: str | None = None,
    ) -> None:
        super().__init__(density, num_params, lora_rank, target_modules, exclude_modules, dense_modules)
        if reselection_until is not None and reselection_until < 1:
            raise ValueError(f"reselection_until must be a positive number of optimizer steps, got {reselection_until}")
        schedule = ReselectionSchedule(reselection_interval, accumulation_steps, regrow_fraction,
                                       reselection_until or 1_000_000, decay)
        self.cycle = PruneRegrow(regrowth, schedule)
        self.regrowth = regrowth
        self.reselection_until = reselection_until
        self.seed = seed
        self.plot_path = plot_path

    @property
    def method(self) -> str:
        """`spiel_ag` or `spiel_ma` by the regrowth rule (`sparse_lightning.registry`; checkpoints and exports
        written before said `spiel`)."""
        return "spiel_ma" if self.regrowth == "momentum" else "spiel_ag"

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.cycle.history

    @property
    def schedule(self) -> ReselectionSchedule:
        return self.cycle.schedule

    def allocate(self, model: nn.Module, shapes: list[tuple[int, int]]) -> list[int]:
        if self.density is None:
            return super().allocate(model, shapes)
        total = sum(p.numel() for p in model.parameters())
        budget = max(1, int(self.density * total))
        capacity = sum(out * inp for out, inp in shapes)
        if budget > capacity:
            raise ValueError(f"density {self.density} of the model's {total:,} parameters is {budget:,} entries, more "
                             f"than the {len(shapes)} target weights hold ({capacity:,}); use density <= "
                             f"{capacity / total:.4f} or more target_modules")
        return allocate_budget(shapes, num_params=max(budget, len(shapes)))

    def initialize(self, layers: dict[str, SparseDeltaLinear], model: nn.Module) -> None:
        random_initial_indices(layers, run_seed(self.seed))

    def describe(self) -> dict[str, Any]:
        s = self.schedule
        return {**super().describe(), "regrowth": self.regrowth, "reselection_interval": s.interval,
                "accumulation_steps": s.accumulation_steps, "regrow_fraction": s.regrow_fraction,
                "reselection_until": s.until, "decay": s.decay, "seed": run_seed(self.seed)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        until = None if self.reselection_until is not None else int(trainer.estimated_stepping_batches)
        self.cycle.start(sparse_delta_layers(pl_module), trainer.optimizers[0], pl_module.device, until)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.cycle.before_step(sparse_delta_layers(pl_module), trainer.global_step, trainer.optimizers[0],
                               trainer.accumulate_grad_batches)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cycle.stop(sparse_delta_layers(pl_module))
        if self.plot_path and trainer.is_global_zero and self.history:
            rank_zero_info(f"SpIEL: index-set history written to {plot_index_history(self.history, self.plot_path)}")

    def state_dict(self) -> dict[str, Any]:
        return self.cycle.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cycle.load_state_dict(state_dict)
