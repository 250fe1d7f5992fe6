"""sparse_lightning: sparse fine-tuning of pre-trained language models as Lightning components."""

from sparse_lightning.borders.multi_delta import FusionReport, MultiDelta
from sparse_lightning.callbacks import (
    GradientTopKCallback,
    PruneRegrowCallback,
    RandomMaskCallback,
    S2FTStructureCallback,
    SparseMethodCallback,
)
from sparse_lightning.modules import (
    CausalLMModule,
    LoRASettings,
    SequenceClassificationModule,
    SparseFineTuningModule,
    prepare_model,
)

__version__ = "0.1.0"

__all__ = [
    "CausalLMModule",
    "FusionReport",
    "GradientTopKCallback",
    "LoRASettings",
    "MultiDelta",
    "PruneRegrowCallback",
    "RandomMaskCallback",
    "S2FTStructureCallback",
    "SequenceClassificationModule",
    "SparseFineTuningModule",
    "SparseMethodCallback",
    "prepare_model",
]
