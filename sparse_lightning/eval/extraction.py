"""Answer extraction and scoring for math and commonsense generations (LLM-Adapters conventions).

Commonsense: lower-case the generation and take the first answer token of the task's vocabulary.
Math: strip commas and take the last number (within 0.001 of the gold counts); AQuA: the first
answer letter A-E. A generation with no answer scores as wrong.
"""

from __future__ import annotations

import re

MATH_DATASETS = ("gsm8k", "AddSub", "MultiArith", "SingleEq", "SVAMP", "AQuA", "mawps")
COMMONSENSE_DATASETS = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
)
CHOICE_DATASETS = ("AQuA",)

_CHOICES_1_TO_5 = tuple(f"answer{i}" for i in range(1, 6))
COMMONSENSE_VOCABULARY: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _CHOICES_1_TO_5,
    "ARC-Challenge": _CHOICES_1_TO_5,
    "ARC-Easy": _CHOICES_1_TO_5,
    "openbookqa": _CHOICES_1_TO_5,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
}
MATH_TOLERANCE = 1e-3

# A minus sign right after a digit is a subtraction ("10-5"), not the sign of the next number.
_NUMBER = re.compile(r"(?:(?<!\d)-)?(?:\d+(?:\.\d+)?|\.\d+)")
# AQuA letters: an explicit "answer is (X)" / "answer: X" wins; otherwise the first standalone capital
# A-E, skipping the article "A" (an "A" followed by a space and a lower-case word, as in "A train ...").
_ANSWER_IS_LETTER = re.compile(r"(?i:answer)\s*(?:is|:)\s*:?\s*\(?([A-E])(?![A-Za-z])")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])([B-E]|A(?!\s+[a-z]))(?![A-Za-z])")
_COMMONSENSE_PATTERNS = {name: re.compile("|".join(vocab)) for name, vocab in COMMONSENSE_VOCABULARY.items()}
_CANONICAL = {re.sub(r"[-_\s]", "", name.lower()): name for name in MATH_DATASETS + COMMONSENSE_DATASETS}


def canonical_dataset_name(name: str) -> str:
    """Map any spelling ("arc_easy", "GSM8K", "SocialIQA") to the LLM-Adapters folder name."""
    key = re.sub(r"[-_\s]", "", name.lower())
    if key not in _CANONICAL:
        valid = ", ".join(MATH_DATASETS + COMMONSENSE_DATASETS)
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {valid}")
    return _CANONICAL[key]


def normalize_answer(answer: str | int | float | list) -> str:
    """Gold answer as a stripped string; some published test files store it as a one-element list."""
    if isinstance(answer, list):
        if len(answer) != 1:
            raise ValueError(f"an answer list must have exactly one element, got {answer!r}")
        answer = answer[0]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"an answer must be a string, a number or a one-element list, got {answer!r}")
    return str(answer).strip()


def extract_math_answer(text: str) -> float | None:
    """The last number in the text, commas removed (so "1,234" is 1234); None when there is none."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def extract_choice(text: str) -> str | None:
    """AQuA letter A-E: after "answer is" if present, else the first standalone capital A-E."""
    match = _ANSWER_IS_LETTER.search(text) or _STANDALONE_LETTER.search(text)
    return match.group(1) if match else None


def extract_commonsense_answer(text: str, dataset: str) -> str | None:
    """The first (by position) answer token of the task's vocabulary in the lower-cased text."""
    name = canonical_dataset_name(dataset)
    if name not in _COMMONSENSE_PATTERNS:
        raise ValueError(f"{name!r} is not a commonsense dataset; those are: {', '.join(COMMONSENSE_DATASETS)}")
    match = _COMMONSENSE_PATTERNS[name].search(text.lower())
    return match.group(0) if match else None


def is_correct(dataset: str, generation: str, gold: str | int | float | list) -> bool:
    """Score one generation against its gold answer with the dataset's extraction rule."""
    name = canonical_dataset_name(dataset)
    gold_text = normalize_answer(gold)
    if name in CHOICE_DATASETS:
        return extract_choice(generation) == gold_text.upper()
    if name in COMMONSENSE_VOCABULARY:
        return extract_commonsense_answer(generation, name) == gold_text.lower()
    predicted = extract_math_answer(generation)
    return predicted is not None and abs(predicted - float(gold_text)) <= MATH_TOLERANCE
