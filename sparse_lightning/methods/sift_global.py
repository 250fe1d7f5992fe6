"""SIFT with one budget for the whole model: the K entries of largest |summed gradient| over all target weights
together, each weight then training as many of them as it holds (`GradientTopKCallback(allocation="global")`).

The scores are SIFT's own (`methods/sift.py`): the dense gradient summed over the calibration batches and ranks, in
bounded memory (from one batch each weight is ranked inside backward as its gradient forms; from several, groups of
weights within `score_memory` re-run the batches, `scoring/score_groups.py`; on N ranks each holds its rows of a sum,
`scoring/row_sharded_sums.py`). The global top-K of all the scores is the top-K of every weight's own top-min(K, numel)
together, so a running merge holds at most K candidates plus one weight's, never every score. Ties go to the earlier
weight in model order, then to the lower position; every rank merges the same gathered numbers, so every rank ends
with the same sets.

Since each weight's k is known only once everything is scored, the deltas are sized here, when they attach (before
any optimizer exists and before DDP wraps the model), not at the start of training as per-weight SIFT chooses. A
weight that holds none of the K gets no delta: it stays frozen, and its Linear is left as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparse_lightning.distributed import own_process_group, world_size
from sparse_lightning.methods.calibration import Batch, LossFn
from sparse_lightning.methods.sift import observed_passes
from sparse_lightning.scoring.row_sharded_sums import RowShardedSum, canonical_top_k, share_bytes
from sparse_lightning.scoring.score_groups import DEFAULT_SCORE_MEMORY, check_score_memory, groups_within
from sparse_lightning.sparse import SparseDeltaLinear, attach_sparse_deltas
from sparse_lightning.sparse.submodules import replace_submodule


class RunningTopK:
    """The `k` largest scores added so far over several weights (each added once, as its own top-k candidates), ties
    to the earlier weight of `order`, then the lower position; held in (weight, position) order."""

    def __init__(self, k: int, order: Sequence[str], largest_numel: int) -> None:
        self.k, self.order, self.stride = k, list(order), largest_numel
        self.index = {name: i for i, name in enumerate(self.order)}
        self.scores = torch.zeros(0)
        self.keys = torch.zeros(0, dtype=torch.long)  # weight index * stride + flat position

    @torch.no_grad()
    def add(self, name: str, scores: Tensor, positions: Tensor) -> None:
        keys = torch.cat([self.keys.to(positions.device), positions.long() + self.index[name] * self.stride])
        scores = torch.cat([self.scores.to(scores.device), scores.float()])
        by_key = keys.argsort()
        keys, scores = keys[by_key], scores[by_key]
        best = canonical_top_k(scores, min(self.k, scores.numel()))  # sorted: the kept stay in key order
        self.keys, self.scores = keys[best], scores[best]

    def chosen(self) -> dict[str, Tensor]:
        """Each weight's chosen flat positions, sorted, in `order`; weights holding none are left out."""
        weights, positions = self.keys // self.stride, self.keys % self.stride
        return {name: positions[weights == i] for i, name in enumerate(self.order) if bool((weights == i).any())}


def attach_by_global_gradient(model: nn.Module, targets: Sequence[str], batches: Sequence[Batch], loss_fn: LossFn,
                              budget: int, score_memory: float = DEFAULT_SCORE_MEMORY) -> dict[str, SparseDeltaLinear]:
    """Give the `budget` entries of largest |sum of gradients| over `batches` (and ranks), across all `targets`
    (Linear module names) together, to their weights: each chosen weight gets a delta of exactly its count, indices
    set and marked selected; the others are left as plain Linears. Returns the delta layers attached.

    Args:
        score_memory: with several batches, the most the summed scores hold at once, as a fraction of a full fp32
            score for every target (on N ranks, of this rank's 1/N rows); one batch ignores it.
    """
    check_score_memory(score_memory)
    shells = attach_sparse_deltas(model, {name: 1 for name in targets})  # to observe each weight's gradient
    try:
        total = sum(layer.weight_shape.numel() for layer in shells.values())
        if not 1 <= budget <= total:
            raise ValueError(f"the global budget must be between 1 and {total} (every entry of the targets), got "
                             f"{budget}")
        chosen = global_top_k(model, shells, batches, loss_fn, budget, score_memory)
    except BaseException:  # the model as it was: no shell left behind
        for name, shell in shells.items():
            replace_submodule(model, name, shell.base)
        raise
    attached = {}
    for name, shell in shells.items():
        if name not in chosen:
            replace_submodule(model, name, shell.base)
            continue
        layer = SparseDeltaLinear(shell.base, chosen[name].numel())
        layer.set_indices(chosen[name].to(layer.delta_indices.dtype))
        replace_submodule(model, name, layer)
        attached[name] = layer
    return attached


def global_top_k(model: nn.Module, layers: dict[str, SparseDeltaLinear], batches: Sequence[Batch], loss_fn: LossFn,
                 budget: int, score_memory: float = DEFAULT_SCORE_MEMORY) -> dict[str, Tensor]:
    """The canonical top-`budget` of |sum of gradients| over `batches` and ranks across every layer of `layers`:
    each layer's chosen flat positions (sorted, the same on every rank); layers holding none are left out."""
    largest = max(layer.weight_shape.numel() for layer in layers.values())
    with own_process_group() as group:  # collectives inside backward, beside the strategy's own
        if len(batches) == 1:
            merge = RunningTopK(budget, list(layers), largest)
            if merged_as_gradients_form(model, layers, batches[0], loss_fn, merge, group):
                return merge.chosen()
        merge = RunningTopK(budget, list(layers), largest)
        shares = {name: share_bytes(layer.weight_shape, world_size(group)) for name, layer in layers.items()}
        for names in groups_within(shares, score_memory):
            sums = {name: RowShardedSum(layers[name].weight_shape, layers[name].delta_values.device, group)
                    for name in names}
            observed_passes(model, {name: sums[name].add_ for name in names}, batches, loss_fn, layers)
            for name in names:
                merge.add(name, *sums.pop(name).top_k_scores(min(budget, layers[name].weight_shape.numel())))
    return merge.chosen()


def merged_as_gradients_form(model: nn.Module, layers: dict[str, SparseDeltaLinear], batch: Batch, loss_fn: LossFn,
                             merge: RunningTopK, group=None) -> bool:
    """Merge each layer's candidates from one batch inside backward, as its dense gradient forms (about one layer's
    gradient at a time); False when a layer ran twice in the forward (its first gradient was only part of its sum:
    score again by summing). A layer the loss never reached has a zero gradient: its first positions, at zero."""
    seen: set[str] = set()
    repeated: list[str] = []

    def observer(name: str, layer: SparseDeltaLinear):
        def observe(grad: Tensor) -> None:
            if name in seen:
                repeated.append(name)
                return
            seen.add(name)
            scores = RowShardedSum(layer.weight_shape, grad.device, group)
            scores.add_(grad)
            merge.add(name, *scores.top_k_scores(min(merge.k, layer.weight_shape.numel())))

        return observe

    observed_passes(model, {name: observer(name, layer) for name, layer in layers.items()}, [batch], loss_fn, layers)
    if repeated:
        return False
    for name, layer in layers.items():
        if name not in seen:
            count = min(merge.k, layer.weight_shape.numel())
            device = layer.delta_values.device
            merge.add(name, torch.zeros(count, device=device), torch.arange(count, device=device))
    return True
