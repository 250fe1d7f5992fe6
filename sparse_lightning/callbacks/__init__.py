"""Sparse fine-tuning methods as Lightning callbacks, one file per method (named by its `method` string); the
algorithms they drive are plain functions in `sparse_lightning.methods`."""

from sparse_lightning.callbacks.base import ElementSparseCallback, SparseMethodCallback
from sparse_lightning.callbacks.random_mask import RandomMaskCallback
from sparse_lightning.callbacks.s2ft import S2FTStructureCallback
from sparse_lightning.callbacks.sift import GradientTopKCallback
from sparse_lightning.callbacks.spiel import PruneRegrowCallback

__all__ = ["ElementSparseCallback", "GradientTopKCallback", "PruneRegrowCallback", "RandomMaskCallback",
           "S2FTStructureCallback", "SparseMethodCallback"]
