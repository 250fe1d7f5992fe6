"""Per-weight delta state (an index buffer and fp32 values) and how a budget is split across weights.

The number of trainable entries k of every target weight is fixed when the delta is attached,
before any optimizer exists; methods only move the slots (`set_indices`), never resize them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparse_lightning.sparse.frozen_delta import FrozenLinearWithDelta
from sparse_lightning.sparse.functional import IndexLayout, WeightGradObserver, sparse_delta_linear


def validate_budget(density: float | None, num_params: int | None, lora_rank: int | None) -> None:
    """Exactly one budget, each in its valid range (checked before any model is loaded)."""
    given = [name for name, value in (("density", density), ("num_params", num_params), ("lora_rank", lora_rank))
             if value is not None]
    if len(given) != 1:
        stacked = "; a config that changes a shipped recipe's budget sets the recipe's own to null" if given else ""
        raise ValueError(f"give exactly one of density, num_params, lora_rank (got {given or 'none'}{stacked})")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if num_params is not None and num_params < 1:
        raise ValueError(f"num_params must be a positive integer, got {num_params}")
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank}")


def allocate_budget(
    shapes: Sequence[tuple[int, int]],
    *,
    density: float | None = None,
    num_params: int | None = None,
    lora_rank: int | None = None,
) -> list[int]:
    """Trainable entries per weight from exactly one of: a per-tensor density (SIFT's
    `int(density * numel) + 1`), a global count split in proportion to tensor size, or a LoRA rank
    (r * (out + in) per weight, LoRA's own count)."""
    validate_budget(density, num_params, lora_rank)
    numels = [out * inp for out, inp in shapes]
    if density is not None:
        return [min(n, int(density * n) + 1) for n in numels]
    if lora_rank is not None:
        too_small = [(out, inp) for out, inp in shapes if lora_rank * (out + inp) > out * inp]
        if too_small:  # never cap silently: the run would train every entry of these weights
            out, inp = too_small[0]
            largest = min(o * i // (o + i) for o, i in shapes)
            raise ValueError(
                f"lora_rank must be between 1 and {largest} for these {len(shapes)} target weights (r * (out + in) "
                f"entries per weight, at most its out * in: a [{out}, {inp}] weight holds {out * inp}), got {lora_rank}"
            )
        return [lora_rank * (out + inp) for out, inp in shapes]
    assert num_params is not None
    total = sum(numels)
    if not len(shapes) <= num_params <= total:
        raise ValueError(
            f"num_params must be between {len(shapes)} (one entry per target weight) and {total} "
            f"(every entry of the {len(shapes)} target weights), got {num_params}"
        )
    exact = [num_params * n / total for n in numels]
    counts = [max(1, int(e)) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in by_remainder[: num_params - sum(counts)]:
        counts[i] += 1
    return counts


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices while they fit (half the memory of int64)."""
    return torch.int32 if numel < 2**31 else torch.int64


def random_indices(numel: int, k: int, generator: torch.Generator) -> Tensor:
    """k distinct positions in [0, numel), uniformly at random, sorted. At low density this draws about k
    integers instead of permuting all numel (a 7B model's FFN weight would need a 45M-entry permutation)."""
    if not 1 <= k <= numel:
        raise ValueError(f"k must be in [1, {numel}], got {k}")
    if 4 * k > numel:
        return torch.randperm(numel, generator=generator)[:k].sort().values
    distinct = torch.empty(0, dtype=torch.long)
    while distinct.numel() < k:  # the distinct values of uniform draws are a uniform random subset
        draws = torch.randint(numel, (k + k // 8 + 16,), generator=generator)
        distinct = torch.cat([distinct, draws]).unique()
    keep = torch.randperm(distinct.numel(), generator=generator)[:k]
    return distinct[keep].sort().values


class SparseDeltaLinear(FrozenLinearWithDelta):
    """A frozen `nn.Linear` plus k trainable entries: `W + scatter(delta_indices, delta_values)`.

    `delta_indices` are flat row-major positions in W (a buffer, saved in every checkpoint);
    `delta_values` are fp32 whatever W's dtype is; `delta_selected` records that a method has chosen
    the indices, so a resumed or reloaded run does not choose them again.
    """

    def __init__(self, base: nn.Linear, k: int, indices: Tensor | None = None) -> None:
        numel = base.weight.numel()
        if not 1 <= k <= numel:
            raise ValueError(f"k must be in [1, {numel}] for a {tuple(base.weight.shape)} weight, got {k}")
        super().__init__(base)
        # On a meta base (built to be loaded by shards after FSDP2 wraps it: modules/sharded_loading.py) the delta
        # is real from the start, on the default device, so a method can choose its indices now; inside a
        # `torch.device("meta")` context it stays meta.
        device = base.weight.device if not base.weight.is_meta else torch.get_default_device()
        if indices is None:
            indices = torch.arange(k, device=device)
        self.register_buffer("delta_indices", indices.to(device=device, dtype=index_dtype(numel)))
        self.delta_values = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))
        self.register_buffer("delta_selected", torch.zeros((), dtype=torch.bool, device=device))
        self.weight_grad_observer: WeightGradObserver | None = None
        self._layout: tuple[Tensor, int, IndexLayout] | None = None

    @property
    def k(self) -> int:
        return self.delta_values.shape[0]

    def index_layout(self) -> IndexLayout:
        """The indices' CSR layout for the value gradient, rebuilt only when they change: any in-place write
        (`set_indices`, SpIEL's slot writes, `load_state_dict`) moves the buffer's version, and moving the module
        replaces the buffer."""
        indices = self.delta_indices
        cached = self._layout
        if cached is None or cached[0] is not indices or cached[1] != indices._version:
            cached = self._layout = (indices, indices._version, IndexLayout(indices, self.weight_shape))
        return cached[2]

    def delta_forward(self, x: Tensor) -> Tensor:
        training = torch.is_grad_enabled() and self.delta_values.requires_grad and self.weight_grad_observer is None
        return sparse_delta_linear(x, self.frozen_weight(), self.base.bias, self.delta_indices, self.delta_values,
                                   self.weight_grad_observer, self.transposed, self.index_layout() if training else None)

    @torch.no_grad()
    def set_indices(self, indices: Tensor) -> None:
        """Point the slots at new unique positions and zero their values. Methods that choose every slot at once
        pass them sorted; SpIEL's reselections rewrite single slots, so its indices are unique but unsorted, and
        every kernel, export and merge accepts either order."""
        if indices.shape != self.delta_indices.shape:
            raise ValueError(f"expected {self.k} indices, got {tuple(indices.shape)}")
        self.delta_indices.copy_(indices)
        self.delta_values.zero_()
        self.delta_selected.fill_(True)

    def export_tensors(self, name: str) -> tuple[dict[str, Tensor], dict]:
        tensors = {f"{name}.indices": self.delta_indices.detach().cpu().contiguous(),
                   f"{name}.values": self.delta_values.detach().float().cpu().contiguous()}
        return tensors, {"shape": list(self.weight_shape), "k": self.k, "weight": f"{name}.weight"}

    def covered_region(self) -> Tensor:
        return self.base.weight.view(-1)[self.delta_indices]

    def add_delta_to_base(self) -> None:
        """W[indices] += values, summed in fp32 and rounded to W's dtype once (the indices are unique)."""
        flat = self.base.weight.view(-1)
        flat[self.delta_indices] = (flat[self.delta_indices].float() + self.delta_values.float()).to(flat.dtype)

    def restore_region(self, originals: Tensor) -> None:
        self.base.weight.view(-1)[self.delta_indices] = originals

    def extra_repr(self) -> str:
        out, inp = reversed(self.weight_shape) if self.transposed else self.weight_shape
        return f"in_features={inp}, out_features={out}, k={self.k} ({self.k / (out * inp):.4%})"
