"""SIFT (Song et al., 2024) as a plain algorithm: each weight keeps the k entries of largest |gradient|.

Scores are the dense gradient summed over the calibration batches (and ranks); the passes run with dropout off,
update nothing and leave no `.grad` behind. Layers that already chose (a resumed run, a reloaded checkpoint) keep
their indices and trained values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparse_lightning.distributed import all_reduce_sum_, broadcast_from_rank_zero_
from sparse_lightning.methods.calibration import Batch, LossFn
from sparse_lightning.modes import eval_mode
from sparse_lightning.sparse import SparseDeltaLinear, sparse_delta_layers


@torch.no_grad()
def select_top_k(layer: SparseDeltaLinear, scores: Tensor) -> None:
    """Point `layer`'s slots at the k largest scores (identical on every rank), values reset to zero."""
    chosen = torch.topk(scores.view(-1), layer.k, sorted=False).indices.sort().values
    layer.set_indices(broadcast_from_rank_zero_(chosen.to(layer.delta_indices.dtype)))


def unselected_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {name: layer for name, layer in sparse_delta_layers(model).items() if not bool(layer.delta_selected)}


def select_by_gradient(model: nn.Module, batches: list[Batch], loss_fn: LossFn) -> dict[str, SparseDeltaLinear]:
    """Choose every unselected layer's indices from |sum of gradients| over `batches`; returns the layers chosen."""
    layers = unselected_layers(model)
    if not layers:
        return layers
    scores = summed_weight_gradients(model, layers, batches, loss_fn)
    for name, layer in layers.items():
        select_top_k(layer, all_reduce_sum_(scores[name]).abs_())
    return layers


def summed_weight_gradients(model: nn.Module, layers: dict[str, SparseDeltaLinear], batches: Sequence[Batch],
                            loss_fn: LossFn) -> dict[str, Tensor]:
    """Each layer's dense weight gradient summed over `batches` (fp32, this rank's): dropout off, nothing updated,
    no `.grad` left behind."""
    scores = {name: torch.zeros(layer.weight_shape, dtype=torch.float32, device=layer.delta_values.device)
              for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.weight_grad_observer = scores[name].add_
    try:
        with eval_mode(model):
            for batch in batches:
                loss_fn(batch).backward()
    finally:
        for layer in layers.values():
            layer.weight_grad_observer = None
        model.zero_grad(set_to_none=True)
    return scores
