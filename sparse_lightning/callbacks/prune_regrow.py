"""SpIEL (Ansell et al., 2024): k trainable entries per weight that periodically drop and regrow.

Every S optimizer steps, after an A-step window, the smallest-|delta| slots are dropped and the same
number of new positions grow in: SpIEL-AG picks the largest accumulated gradients among candidates
(the top-|gradient| entries of the window's first micro-batch, never a persistent dense gradient);
SpIEL-MA picks the largest row x column products of SM3's accumulators (no inactive gradient stored).
New slots start at zero; their optimizer state is re-seeded (AG: Adam moments from the measured
gradient statistics) or reset. Unlike the reference, statistics are fp32 and all-reduced over ranks
before anything is chosen, and optimizer state is addressed by slot, so DDP and FSDP2 stay in step.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from sparse_lightning.callbacks.base import ElementSparseCallback, _distributed, broadcast_from_rank_zero_
from sparse_lightning.callbacks.reselection_schedule import ReselectionSchedule
from sparse_lightning.sparse import SparseDeltaLinear, allocate_budget, sparse_delta_layers
from sparse_lightning.sparse.delta import random_indices
from sparse_lightning.sparse.optim import SM3, seed_slots_
from sparse_lightning.sparse.sharding import full_tensor, write_slots_

Regrowth = Literal["gradient", "momentum"]


class PruneRegrowCallback(ElementSparseCallback):
    """SpIEL: drop the smallest deltas and regrow by accumulated gradient ("gradient", SpIEL-AG) or
    by SM3 row x column momentum ("momentum", SpIEL-MA, needs `sparse_lightning.sparse.optim.SM3`).

    `density` is a fraction of all the model's parameters (SpIEL's budget), split across the target
    weights in proportion to their size; `num_params` and `lora_rank` work as for SIFT.
    `reselection_until` (T) defaults to the run's total optimizer steps.
    """

    method = "spiel"

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
        seed: int = 0,
        plot_path: str | None = None,
    ) -> None:
        super().__init__(density, num_params, lora_rank, target_modules, exclude_modules, dense_modules)
        if regrowth not in ("gradient", "momentum"):
            raise ValueError(f"regrowth must be 'gradient' (SpIEL-AG) or 'momentum' (SpIEL-MA), got {regrowth!r}")
        if reselection_until is not None and reselection_until < 1:
            raise ValueError(f"reselection_until must be a positive number of optimizer steps, got {reselection_until}")
        self.regrowth = regrowth
        self.schedule = ReselectionSchedule(reselection_interval, accumulation_steps, regrow_fraction,
                                            reselection_until or 1_000_000, decay)
        self.reselection_until = reselection_until
        self.seed = seed
        self.plot_path = plot_path
        self.history: list[dict[str, Any]] = []
        self._first_sets: dict[str, Tensor] = {}
        self._stats: dict[str, dict[str, Tensor]] = {}  # AG: candidates, grad sum, square sum, micro-batch count
        self._group: dist.ProcessGroup | None = None  # AG statistics are reduced on their own group, inside backward
        self._last_step = -1

    # -- budget and initial indices ------------------------------------------------------------------

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

    def initialize(self, layers: dict[str, SparseDeltaLinear]) -> None:
        """Uniformly random initial indices from `seed` (the same on every rank)."""
        generator = torch.Generator().manual_seed(self.seed)
        for name in sorted(layers):
            layer = layers[name]
            chosen = random_indices(layer.weight_shape.numel(), layer.k, generator)
            layer.set_indices(chosen.to(layer.delta_indices))

    def describe(self) -> dict[str, Any]:
        s = self.schedule
        return {**super().describe(), "regrowth": self.regrowth, "reselection_interval": s.interval,
                "accumulation_steps": s.accumulation_steps, "regrow_fraction": s.regrow_fraction,
                "reselection_until": s.until, "decay": s.decay, "seed": self.seed}

    # -- the training loop ---------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # statistics restored from a checkpoint come back on the CPU
        self._stats = {name: {key: t.to(pl_module.device) for key, t in stats.items()} for name, stats in self._stats.items()}
        if self.reselection_until is None:  # also after a resume: T follows this run's length
            self.schedule = replace(self.schedule, until=max(1, int(trainer.estimated_stepping_batches)))
        if self.regrowth == "momentum":
            optimizer = trainer.optimizers[0]
            if not isinstance(optimizer, SM3):
                raise ValueError(f"regrowth='momentum' (SpIEL-MA) scores entries with SM3's accumulators: set the "
                                 f"optimizer to sparse_lightning.sparse.optim.SM3 (got {type(optimizer).__name__})")
            for layer in sparse_delta_layers(pl_module).values():
                optimizer.cover_delta(layer.delta_values, layer.delta_indices, tuple(layer.weight_shape))
        elif _distributed() and self._group is None:
            self._group = dist.new_group()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a later micro-batch of the same optimizer step
            return
        self._last_step = step
        layers = sparse_delta_layers(pl_module)
        if self.schedule.reselects_at(step):
            self._reselect(trainer, layers, step)
        if self.regrowth == "gradient":
            if self.schedule.window_starts_at(step):
                self._stats = {}
            in_window = self.schedule.in_window(step)
            for name, layer in layers.items():
                layer.weight_grad_observer = self._observer(name, layer) if in_window else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in sparse_delta_layers(pl_module).values():
            layer.weight_grad_observer = None
        if self.plot_path and trainer.is_global_zero and self.history:
            from sparse_lightning.callbacks.index_history_plot import plot_index_history

            rank_zero_info(f"SpIEL: index-set history written to {plot_index_history(self.history, self.plot_path)}")

    # -- SpIEL-AG statistics -------------------------------------------------------------------------

    def _observer(self, name: str, layer: SparseDeltaLinear):
        """What a layer's backward does with its dense gradient during a window. The gradient is first
        averaged over ranks (as DDP averages), so every rank sees what one process would: on the first
        micro-batch the candidates are its top-|gradient| entries (excluding active ones after the first
        reselection); afterwards their gradients accumulate as fp32 sums, squares and a count."""

        @torch.no_grad()
        def observe(grad: Tensor) -> None:
            stats = self._stats.get(name)
            if stats is None:
                mean = self._rank_mean(grad.to(torch.float32, copy=True))
                scores = mean.abs().view(-1)
                if self.history:
                    scores[layer.delta_indices.long()] = -1.0
                candidates = torch.topk(scores, self._candidate_count(layer), sorted=False).indices
                stats = self._stats[name] = {
                    "candidates": candidates,  # the same on every rank: chosen from the same reduced numbers
                    "sum": torch.zeros(candidates.numel(), dtype=torch.float32, device=grad.device),
                    "square_sum": torch.zeros(candidates.numel(), dtype=torch.float32, device=grad.device),
                    "count": torch.zeros((), dtype=torch.int64, device=grad.device)}
                g = mean.view(-1)[stats["candidates"]]
            else:
                g = self._rank_mean(grad.view(-1)[stats["candidates"]].float())
            stats["sum"].add_(g)
            stats["square_sum"].add_(g * g)
            stats["count"].add_(1)

        return observe

    def _rank_mean(self, tensor: Tensor) -> Tensor:
        if self._group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._group)
            tensor /= dist.get_world_size(self._group)
        return tensor

    def _candidate_count(self, layer: SparseDeltaLinear) -> int:
        numel = layer.weight_shape.numel()
        return min(layer.k, numel - layer.k) if self.history else layer.k

    # -- drop and grow -------------------------------------------------------------------------------

    @torch.no_grad()
    def _reselect(self, trainer: pl.Trainer, layers: dict[str, SparseDeltaLinear], step: int) -> None:
        fraction = self.schedule.fraction_at(step)
        optimizer = trainer.optimizers[0]
        accumulate = trainer.accumulate_grad_batches
        replaced: dict[str, int] = {}
        overlap: dict[str, float] = {}
        for name in sorted(layers):
            layer = layers[name]
            wanted = layer.k if not self.history else round(fraction * layer.k)
            moved = self._move_slots(name, layer, wanted, optimizer, accumulate) if wanted > 0 else 0
            replaced[name] = moved
            if not self.history:
                self._first_sets[name] = layer.delta_indices.detach().cpu().clone()
            first = self._first_sets.get(name)
            if first is not None:
                overlap[name] = torch.isin(layer.delta_indices.cpu(), first).float().mean().item()
        self._stats = {}
        self.history.append({"step": step, "fraction": fraction, "replaced": replaced,
                             "k": {name: layers[name].k for name in sorted(layers)}, "overlap_with_first": overlap})
        total_k = sum(layer.k for layer in layers.values())
        rank_zero_info(f"SpIEL: step {step}, replaced {sum(replaced.values()):,} of {total_k:,} entries "
                       f"({self.regrowth} regrowth, fraction {fraction:.3f})")

    def _move_slots(self, name: str, layer: SparseDeltaLinear, wanted: int, optimizer: torch.optim.Optimizer,
                    accumulate: int) -> int:
        """Drop the `wanted` smallest-|delta| slots and point them at the best inactive positions."""
        values = full_tensor(layer.delta_values.detach()).float()
        indices = layer.delta_indices.long()
        if wanted >= layer.k:
            dropped = torch.arange(layer.k, device=indices.device)
        else:
            dropped = torch.topk(values.abs(), wanted, largest=False).indices.to(indices.device)
        keep = torch.ones(layer.k, dtype=torch.bool, device=indices.device)
        keep[dropped] = False
        grown, mean, mean_sq = self._grow(name, layer, indices[keep], dropped.numel(), optimizer, accumulate)
        if grown is None:
            return 0
        dropped = dropped[: grown.numel()]  # as many as could be regrown, so counts never change
        layer.delta_indices[dropped] = broadcast_from_rank_zero_(grown.to(layer.delta_indices.dtype))
        write_slots_(layer.delta_values.data, dropped, 0.0)
        seed_slots_(optimizer, layer.delta_values, dropped, mean, mean_sq)
        return grown.numel()

    def _grow(self, name: str, layer: SparseDeltaLinear, active: Tensor, count: int, optimizer: torch.optim.Optimizer,
              accumulate: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """New positions (largest score first) and, for AG, their mean and mean-square step gradients."""
        if self.regrowth == "momentum":
            accumulators = optimizer.accumulators(layer.delta_values)
            if accumulators is None:
                return None, None, None
            row, col = accumulators
            scores = torch.outer(row, col).view(-1)
            scores[active] = -1.0
            return torch.topk(scores, count).indices, None, None
        stats = self._stats.get(name)
        if stats is None:
            return None, None, None
        candidates = stats["candidates"]
        allowed = ~torch.isin(candidates, active.to(candidates.device))
        scores = torch.where(allowed, stats["sum"].abs(), torch.full_like(stats["sum"], -1.0))
        count = min(count, int(allowed.sum()))
        top = torch.topk(scores, count).indices
        # Lightning divides each micro-batch loss by the accumulation count: a step's gradient is their sum.
        micro_batches = stats["count"].float()
        mean = stats["sum"][top] / micro_batches * accumulate
        mean_sq = stats["square_sum"][top] / micro_batches * accumulate**2
        return candidates[top], mean, mean_sq

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "first_sets": self._first_sets, "stats": self._stats}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict["history"]
        self._first_sets = state_dict["first_sets"]
        self._stats = state_dict["stats"]
