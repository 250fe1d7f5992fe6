"""Reusable LightningModules: the shared base and one module per task family."""

from sparse_lightning.modules.base import SparseFineTuningModule, count_parameters
from sparse_lightning.modules.causal_lm import CausalLMModule
from sparse_lightning.modules.lora import LoRASettings
from sparse_lightning.modules.prepare import prepare_model
from sparse_lightning.modules.sequence_classification import SequenceClassificationModule

__all__ = ["CausalLMModule", "LoRASettings", "SequenceClassificationModule", "SparseFineTuningModule", "count_parameters",
           "prepare_model"]
