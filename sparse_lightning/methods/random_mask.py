"""Random mask (SHiRA / SpaRTA; SIFT's random-selection ablation): k uniformly random entries per weight, fixed.

The positions depend only on `seed` and each weight's name, so every rank, a resumed run and a rerun draw the
same ones, whatever order the layers are visited in.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from sparse_lightning.methods.sift import unselected_layers
from sparse_lightning.sparse import SparseDeltaLinear
from sparse_lightning.sparse.delta import random_indices


@torch.no_grad()
def select_at_random(model: nn.Module, seed: int = 0) -> dict[str, SparseDeltaLinear]:
    """Give every unselected layer k distinct random positions; returns the layers chosen."""
    layers = unselected_layers(model)
    for name, layer in layers.items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        chosen = random_indices(layer.weight_shape.numel(), layer.k, generator)
        layer.set_indices(chosen.to(device=layer.delta_indices.device, dtype=layer.delta_indices.dtype))
    return layers
