"""Answer extraction and scoring for generated answers (math word problems, commonsense QA)."""

from sparse_lightning.eval.extraction import (
    COMMONSENSE_DATASETS,
    COMMONSENSE_VOCABULARY,
    MATH_DATASETS,
    canonical_dataset_name,
    extract_choice,
    extract_commonsense_answer,
    extract_math_answer,
    is_correct,
    normalize_answer,
)

__all__ = [
    "COMMONSENSE_DATASETS",
    "COMMONSENSE_VOCABULARY",
    "MATH_DATASETS",
    "canonical_dataset_name",
    "extract_choice",
    "extract_commonsense_answer",
    "extract_math_answer",
    "is_correct",
    "normalize_answer",
]
