"""Reusable LightningModules: the shared base and one module per task family."""

from sparse_lightning.modules.base import SparseFineTuningModule, count_parameters
from sparse_lightning.modules.lora import LoRASettings
from sparse_lightning.modules.sequence_classification import SequenceClassificationModule

__all__ = ["LoRASettings", "SequenceClassificationModule", "SparseFineTuningModule", "count_parameters"]
