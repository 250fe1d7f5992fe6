"""The substrate: trainable sparse deltas on frozen weights."""

from sparse_lightning.sparse.delta import SparseDeltaLinear, allocate_budget
from sparse_lightning.sparse.functional import merged_weight, sparse_delta_linear
from sparse_lightning.sparse.inject import (
    attach_sparse_deltas,
    default_targets,
    find_linear_targets,
    freeze_except,
    merge,
    merge_and_unwrap,
    sparse_delta_layers,
    unmerge,
)
from sparse_lightning.sparse.frozen_delta import delta_layers

__all__ = [
    "SparseDeltaLinear",
    "allocate_budget",
    "attach_sparse_deltas",
    "default_targets",
    "delta_layers",
    "find_linear_targets",
    "freeze_except",
    "merge",
    "merge_and_unwrap",
    "merged_weight",
    "sparse_delta_layers",
    "sparse_delta_linear",
    "unmerge",
]
