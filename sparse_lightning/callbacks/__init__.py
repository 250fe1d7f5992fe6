"""Sparse fine-tuning methods as Lightning callbacks, one file per method."""

from sparse_lightning.callbacks.base import ElementSparseCallback, SparseMethodCallback
from sparse_lightning.callbacks.gradient_topk import GradientTopKCallback

__all__ = ["ElementSparseCallback", "GradientTopKCallback", "SparseMethodCallback"]
