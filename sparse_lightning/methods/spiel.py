"""SpIEL (Ansell et al., 2024) as a plain algorithm: k entries per weight that periodically drop and regrow.

Every S optimizer steps, after an A-step window, the smallest-|delta| slots are dropped and the same
number of new positions grow in: SpIEL-AG picks the largest accumulated gradients among candidates
(the top-|gradient| entries of the window's first micro-batch, never a persistent dense gradient);
SpIEL-MA picks the largest row x column products of SM3's accumulators (no inactive gradient stored).
New slots start at zero; their optimizer state is re-seeded (AG: Adam moments from the measured
gradient statistics) or reset. Unlike the reference, statistics are fp32 and all-reduced over ranks
before anything is chosen, and optimizer state is addressed by slot, so DDP and FSDP2 stay in step.

`PruneRegrow` needs no Trainer: call `start` once the optimizer exists, `before_step(layers, step, optimizer)`
before each optimizer step's first forward, and `stop` at the end.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from sparse_lightning.distributed import broadcast_from_rank_zero_, is_distributed
from sparse_lightning.methods.reselection_schedule import ReselectionSchedule
from sparse_lightning.sparse import SparseDeltaLinear
from sparse_lightning.sparse.delta import random_indices
from sparse_lightning.sparse.optim import SM3, seed_slots_
from sparse_lightning.sparse.sharding import full_tensor, write_slots_

Regrowth = Literal["gradient", "momentum"]


@torch.no_grad()
def random_initial_indices(layers: dict[str, SparseDeltaLinear], seed: int) -> None:
    """Uniformly random initial indices from `seed` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(layers):
        layer = layers[name]
        chosen = random_indices(layer.weight_shape.numel(), layer.k, generator)
        layer.set_indices(chosen.to(layer.delta_indices))


class PruneRegrow:
    """The drop-and-regrow cycle over a model's delta layers, with its statistics and history."""

    def __init__(self, regrowth: Regrowth, schedule: ReselectionSchedule) -> None:
        if regrowth not in ("gradient", "momentum"):
            raise ValueError(f"regrowth must be 'gradient' (SpIEL-AG) or 'momentum' (SpIEL-MA), got {regrowth!r}")
        self.regrowth = regrowth
        self.schedule = schedule
        self.history: list[dict[str, Any]] = []
        self._first_sets: dict[str, Tensor] = {}
        self._stats: dict[str, dict[str, Tensor]] = {}  # AG: candidates, grad sum, square sum, micro-batch count
        self._group: dist.ProcessGroup | None = None  # AG statistics are reduced on their own group, inside backward
        self._last_step = -1

    def start(self, layers: dict[str, SparseDeltaLinear], optimizer: torch.optim.Optimizer, device: torch.device,
              until: int | None = None) -> None:
        """Before the first step (also after a resume): `until` (T) replaces the schedule's end when given."""
        # statistics restored from a checkpoint come back on the CPU
        self._stats = {name: {key: t.to(device) for key, t in stats.items()} for name, stats in self._stats.items()}
        if until is not None:
            self.schedule = replace(self.schedule, until=max(1, until))
        if self.regrowth == "momentum":
            if not isinstance(optimizer, SM3):
                raise ValueError(f"regrowth='momentum' (SpIEL-MA) scores entries with SM3's accumulators: set the "
                                 f"optimizer to sparse_lightning.sparse.optim.SM3 (got {type(optimizer).__name__})")
            for layer in layers.values():
                optimizer.cover_delta(layer.delta_values, layer.delta_indices, tuple(layer.weight_shape))
        elif is_distributed() and self._group is None:
            self._group = dist.new_group()

    def before_step(self, layers: dict[str, SparseDeltaLinear], step: int, optimizer: torch.optim.Optimizer,
                    accumulate: int = 1) -> None:
        """Reselect if due, and open or close the statistics window; later micro-batches of a step do nothing."""
        if step == self._last_step:
            return
        self._last_step = step
        if self.schedule.reselects_at(step):
            self.reselect(layers, step, optimizer, accumulate)
        if self.regrowth == "gradient":
            if self.schedule.window_starts_at(step):
                self._stats = {}
            in_window = self.schedule.in_window(step)
            for name, layer in layers.items():
                layer.weight_grad_observer = self._observer(name, layer) if in_window else None

    def stop(self, layers: dict[str, SparseDeltaLinear]) -> None:
        for layer in layers.values():
            layer.weight_grad_observer = None

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
    def reselect(self, layers: dict[str, SparseDeltaLinear], step: int, optimizer: torch.optim.Optimizer,
                 accumulate: int = 1) -> None:
        """Drop and regrow every layer's share now (the first reselection replaces every slot)."""
        fraction = self.schedule.fraction_at(step)
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

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "first_sets": self._first_sets, "stats": self._stats}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict["history"]
        self._first_sets = state_dict["first_sets"]
        self._stats = state_dict["stats"]
