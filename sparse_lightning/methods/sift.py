"""SIFT (Song et al., 2024) as a plain algorithm: each weight keeps the k entries of largest |gradient|.

Scores are the dense gradient summed over the calibration batches (and ranks), as the paper computes them, in
bounded memory: from one batch each layer's top-k is taken inside backward as its dense gradient forms, so about one
layer's gradient lives at a time; from several, the exact sums are kept for groups of layers within a budget
(`scoring/score_groups.py`), the batches re-run once per group. Either way the chosen sets are those of the all-at-once
dense sum. On several ranks each rank holds only its rows of a sum and every rank picks the same top-k from all
ranks' candidates (`scoring/row_sharded_sums.py`). The passes run with dropout off, update nothing and leave no `.grad`
behind; indices are written only once every layer has chosen. Layers that already chose (a resumed run, a reloaded checkpoint) keep their indices and
trained values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from sparse_lightning.distributed import broadcast_from_rank_zero_, own_process_group, world_size
from sparse_lightning.methods.calibration import Batch, LossFn
from sparse_lightning.modes import scoring_mode
from sparse_lightning.scoring.row_sharded_sums import RowShardedSum, share_bytes, top_k_positions
from sparse_lightning.scoring.score_groups import DEFAULT_SCORE_MEMORY, check_score_memory, groups_within
from sparse_lightning.sparse import SparseDeltaLinear, sparse_delta_layers
from sparse_lightning.sparse.functional import WeightGradObserver


@torch.no_grad()
def select_top_k(layer: SparseDeltaLinear, scores: Tensor) -> None:
    """Point `layer`'s slots at the k largest scores (identical on every rank), values reset to zero."""
    layer.set_indices(broadcast_from_rank_zero_(top_k_positions(scores, layer.k).to(layer.delta_indices.dtype)))


def unselected_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {name: layer for name, layer in sparse_delta_layers(model).items() if not bool(layer.delta_selected)}


def select_by_gradient(model: nn.Module, batches: list[Batch], loss_fn: LossFn,
                       score_memory: float = DEFAULT_SCORE_MEMORY) -> dict[str, SparseDeltaLinear]:
    """Choose every unselected layer's indices from |sum of gradients| over `batches` (and ranks); returns the
    layers chosen.

    Args:
        score_memory: with several batches, the most the summed scores hold at once, as a fraction of a full fp32
            score for every unselected weight (1.0: all at once; on N ranks, of this rank's 1/N rows of each); the
            batches run about 1 / score_memory times.
            One batch needs no sum and ignores it.
    """
    check_score_memory(score_memory)
    layers = unselected_layers(model)
    if not layers:
        return layers
    with own_process_group() as group:  # collectives inside backward, beside FSDP2's own
        if len(batches) == 1:
            chosen = top_k_as_gradients_form(model, layers, batches[0], loss_fn, group)
            # a layer that ran twice in the forward (or never) needs its summed (or zero) gradient: score it exactly
            again = {name: layer for name, layer in layers.items() if name not in chosen}
            if again:
                chosen.update(summed_top_k(model, again, batches, loss_fn, score_memory, group))
        else:
            chosen = summed_top_k(model, layers, batches, loss_fn, score_memory, group)
    for name, layer in layers.items():  # the same on every rank by construction (scoring/row_sharded_sums.py)
        layer.set_indices(chosen[name].to(layer.delta_indices.dtype))
    return layers


def top_k_as_gradients_form(model: nn.Module, layers: dict[str, SparseDeltaLinear], batch: Batch,
                            loss_fn: LossFn, group=None) -> dict[str, Tensor]:
    """Each layer's top-k |gradient| positions from one batch, chosen inside backward from its dense gradient
    (reduce-scattered over ranks there, on `group`, each rank ranking its rows). Layers observed more than once are
    left out."""
    chosen: dict[str, Tensor] = {}
    repeated: set[str] = set()

    def observer(name: str, layer: SparseDeltaLinear) -> WeightGradObserver:
        def observe(grad: Tensor) -> None:
            scores = RowShardedSum(layer.weight_shape, grad.device, group)
            scores.add_(grad)
            if name in chosen:
                repeated.add(name)
            chosen[name] = scores.top_k(layer.k)

        return observe

    observed_passes(model, {name: observer(name, layer) for name, layer in layers.items()}, [batch], loss_fn, layers)
    return {name: positions for name, positions in chosen.items() if name not in repeated}


def summed_top_k(model: nn.Module, layers: dict[str, SparseDeltaLinear], batches: Sequence[Batch], loss_fn: LossFn,
                 score_memory: float, group=None) -> dict[str, Tensor]:
    """Each layer's top-k positions of |sum over batches and ranks of its gradient|, a group of layers at a time.
    Each rank holds its rows of the group's sums (`RowShardedSum`), at most `score_memory` x its share of all of them:
    on N ranks 1/N of one process's bytes, for the same passes."""
    world = world_size(group)
    shares = {name: share_bytes(layer.weight_shape, world) for name, layer in layers.items()}
    chosen = {}
    for names in groups_within(shares, score_memory):
        sums = {name: RowShardedSum(layers[name].weight_shape, layers[name].delta_values.device, group)
                for name in names}
        observed_passes(model, {name: sums[name].add_ for name in names}, batches, loss_fn, layers)
        for name in names:
            chosen[name] = sums.pop(name).top_k(layers[name].k)
    return chosen


def summed_weight_gradients(model: nn.Module, layers: dict[str, SparseDeltaLinear], batches: Sequence[Batch],
                            loss_fn: LossFn) -> dict[str, Tensor]:
    """Each layer's dense weight gradient summed over `batches` (fp32, this rank's): dropout off, nothing updated,
    no `.grad` left behind. Holds a full-size score per layer given: pass a group of layers to bound it."""
    scores = {name: torch.zeros(layer.weight_shape, dtype=torch.float32, device=layer.delta_values.device)
              for name, layer in layers.items()}
    observed_passes(model, {name: scores[name].add_ for name in layers}, batches, loss_fn, layers)
    return scores


def observed_passes(model: nn.Module, observers: dict[str, WeightGradObserver], batches: Sequence[Batch],
                    loss_fn: LossFn, layers: dict[str, SparseDeltaLinear]) -> None:
    """Forward and backward over `batches` in `scoring_mode` with each named layer's dense gradient going to its
    observer; nothing updated, no `.grad` left behind. Only the observed layers' values require a gradient meanwhile,
    so backward stops at the first of them and forms no other gradient (not under FSDP2: it fixes each parameter's
    gradient handling when it first runs, and a flag flipped meanwhile breaks its mixed-precision reduction)."""
    narrow = not any(isinstance(p, DTensor) for p in model.parameters())
    flags = {p: p.requires_grad for p in model.parameters()} if narrow else {}
    if narrow:
        model.requires_grad_(False)
    for name, observe in observers.items():
        layers[name].weight_grad_observer = observe
        if narrow:
            layers[name].delta_values.requires_grad_(True)
    try:
        with scoring_mode(model):
            for batch in batches:
                loss = loss_fn(batch)
                if loss.requires_grad:  # else no observed layer reaches the loss: its gradient is zero
                    loss.backward()
    finally:
        for name in observers:
            layers[name].weight_grad_observer = None
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
