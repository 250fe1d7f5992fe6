"""Optimizer support stock optimizers lack: re-seeding a moved slot's state, and SM3 for SpIEL-MA.

Slots are addressed by position in the per-weight value vector, never by parameter identity tricks,
so the same code works on plain, DDP-replicated and FSDP2-sharded (DTensor) parameters and states.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from sparse_lightning.sparse.sharding import local_slot_range, local_tensor, write_slots_


def _group_of(optimizer: Optimizer, param: Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("the parameter is not in this optimizer; was it trainable when the optimizer was built?")


@torch.no_grad()
def seed_slots_(optimizer: Optimizer, param: Tensor, slots: Tensor, mean: Tensor | None = None,
                mean_sq: Tensor | None = None) -> None:
    """Give moved slots fresh optimizer state: zero, or for Adam-family optimizers the moments that
    make bias correction return `mean` and `mean_sq` at the next step (SpIEL-AG's seeding).

    Adam keeps one step count t per tensor; a moment seeded to `(1 - beta**t) * mean` reads back as
    `mean` after bias correction, which is what a per-slot age achieves in the reference.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    betas = _group_of(optimizer, param).get("betas")
    step = float(local_tensor(state["step"])) if "step" in state else 0.0
    for key, value in state.items():
        if not torch.is_tensor(value) or value.shape != param.shape:
            continue
        if betas is not None and step > 0 and mean is not None and key == "exp_avg":
            write_slots_(value, slots, mean * (1 - betas[0] ** step))
        elif betas is not None and step > 0 and mean_sq is not None and key in ("exp_avg_sq", "max_exp_avg_sq"):
            write_slots_(value, slots, mean_sq * (1 - betas[1] ** step))
        else:
            write_slots_(value, slots, 0.0)


class SM3(Optimizer):
    """SM3 (Anil et al., 2019) with momentum on the preconditioned gradient.

    A sparse delta registered with `cover_delta` keeps its second-moment statistics as maxima over
    the rows and the columns of the weight it lives in (out + in floats instead of k): SpIEL-MA
    scores every inactive entry (r, c) by row[r] * col[c] without storing its gradient. Other
    parameters (small dense heads) get one accumulator per entry (SM3 with singleton covers: Adagrad).

    Args:
        params: the trainable parameters.
        lr: the learning rate.
        momentum: momentum on the preconditioned gradient, in [0, 1).
        weight_decay: L2 weight decay.
        eps: added under the square root.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 eps: float = 1e-30) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eps": eps})
        self._covers: dict[int, tuple[Tensor, tuple[int, int]]] = {}

    def cover_delta(self, values: Tensor, indices: Tensor, weight_shape: tuple[int, int]) -> None:
        """Hold `values`' statistics per row and column of the [out, in] weight its `indices` point into."""
        _group_of(self, values)
        self._covers[id(values)] = (indices, tuple(weight_shape))

    def accumulators(self, values: Tensor) -> tuple[Tensor, Tensor] | None:
        """(row, column) second-moment accumulators of a covered delta, identical on every rank; None before step 1."""
        state = self.state.get(values)
        return (state["row"], state["col"]) if state and "row" in state else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = local_tensor(param.grad).float()
                state = self.state[param]
                if not state:
                    state["momentum"] = torch.zeros_like(param, dtype=torch.float32)
                if id(param) in self._covers:
                    update = self._covered_update(param, grad, state)
                else:
                    state.setdefault("acc", torch.zeros_like(param, dtype=torch.float32))
                    acc = local_tensor(state["acc"]).add_(grad * grad)
                    update = grad / (acc.sqrt() + group["eps"])
                momentum = local_tensor(state["momentum"])
                momentum.mul_(group["momentum"]).add_(update, alpha=1 - group["momentum"])
                local = local_tensor(param)
                if group["weight_decay"]:
                    local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(momentum.to(local.dtype), alpha=-group["lr"])
        return loss

    def _covered_update(self, param: Tensor, grad: Tensor, state: dict) -> Tensor:
        indices, (out_features, in_features) = self._covers[id(param)]
        if "row" not in state:
            state["row"] = torch.zeros(out_features, dtype=torch.float32, device=grad.device)
            state["col"] = torch.zeros(in_features, dtype=torch.float32, device=grad.device)
        start, end = local_slot_range(param)
        flat = indices[start:end].long()
        rows, cols = flat // in_features, flat % in_features
        nu = torch.minimum(state["row"][rows], state["col"][cols]) + grad * grad
        state["row"].scatter_reduce_(0, rows, nu, "amax")
        state["col"].scatter_reduce_(0, cols, nu, "amax")
        if isinstance(param, DTensor) and param.device_mesh.size() > 1:
            group = param.device_mesh.get_group()
            dist.all_reduce(state["row"], op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(state["col"], op=dist.ReduceOp.MAX, group=group)
        return torch.where(nu > 0, grad / nu.clamp_min(1e-38).sqrt(), torch.zeros_like(grad))
