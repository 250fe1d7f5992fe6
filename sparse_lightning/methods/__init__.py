"""The methods as plain algorithms over delta layers, batches and a loss: usable without a Trainer.

The callbacks in `sparse_lightning.callbacks` only decide when each runs.
"""

from sparse_lightning.methods.calibration import Calibration
from sparse_lightning.methods.random_mask import select_at_random
from sparse_lightning.methods.s2ft import S2FT
from sparse_lightning.methods.sift import select_by_gradient
from sparse_lightning.methods.sift_global import attach_by_global_gradient
from sparse_lightning.methods.spiel import PruneRegrow, random_initial_indices

__all__ = ["Calibration", "PruneRegrow", "S2FT", "attach_by_global_gradient", "random_initial_indices", "select_at_random",
           "select_by_gradient"]
