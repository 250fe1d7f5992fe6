"""Sparse fine-tuning methods as Lightning callbacks, one file per method."""

from sparse_lightning.callbacks.base import ElementSparseCallback, SparseMethodCallback
from sparse_lightning.callbacks.gradient_topk import GradientTopKCallback
from sparse_lightning.callbacks.prune_regrow import PruneRegrowCallback
from sparse_lightning.callbacks.s2ft import S2FTStructureCallback

__all__ = ["ElementSparseCallback", "GradientTopKCallback", "PruneRegrowCallback", "S2FTStructureCallback",
           "SparseMethodCallback"]
