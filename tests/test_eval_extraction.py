"""Answer extraction and scoring on hand-written generations (ANCHORS section 4)."""

import pytest

from sparse_lightning.eval import (
    COMMONSENSE_DATASETS,
    MATH_DATASETS,
    canonical_dataset_name,
    extract_choice,
    extract_commonsense_answer,
    extract_math_answer,
    is_correct,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("He pays 1,234 dollars.", 1234.0),
        ("Total: 1,234,567.5", 1234567.5),
        ("The temperature drops to -3.5 degrees.", -3.5),
        ("x = -7", -7.0),
        ("so 12-4", 4.0),  # a minus after a digit is a subtraction, not a sign
        ("10 - 15 = -5", -5.0),
        ("3 apples and 4 pears make 7 fruits", 7.0),
        ("She has 12 cookies, eats 4, so 8 are left. The answer is 5.", 5.0),
        ("The answer is 42.", 42.0),
        ("Half is .5", 0.5),
        ("1.8333333333333335", 1.8333333333333335),
        ("I do not know.", None),
        ("", None),
    ],
)
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (D).", "D"),
        ("A train runs 60 km in 1 hour. So the answer is (C).", "C"),
        ("A train runs at 60 km/h, which gives option B", "B"),  # "A" as an article is skipped
        ("Answer: E", "E"),
        ("(A) 23.65", "A"),
        ("A.", "A"),
        ("Both B and D look plausible", "B"),
        ("B is tempting, but the answer is (D).", "D"),  # an explicit "answer is" wins over an earlier letter
        ("Rationale: a car travels 20 miles per gallon", None),
        ("CD player and Ed", None),  # letters inside words never count
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize(
    ("dataset", "text", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "The Correct Answer Is FALSE", "false"),
        ("boolq", "false, although some would say true", "false"),  # first by position wins
        ("piqa", "solution2 is better than solution1", "solution2"),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("ARC-Easy", "Answer5", "answer5"),
        ("ARC-Challenge", "answer2 or answer1", "answer2"),
        ("openbookqa", "answer4", "answer4"),
        ("hellaswag", "ENDING1 then ending4", "ending1"),
        ("winogrande", "option2", "option2"),
        ("winogrande", "the second option", None),
        ("boolq", "", None),
    ],
)
def test_extract_commonsense_answer(dataset, text, expected):
    assert extract_commonsense_answer(text, dataset) == expected


@pytest.mark.parametrize(
    ("dataset", "generation", "gold", "expected"),
    [
        ("gsm8k", "16 - 12 = 4. The answer is 4.", "4.0", True),
        ("gsm8k", "The answer is 4.0005", "4.0", True),  # within 0.001
        ("gsm8k", "The answer is 4.002", "4.0", False),
        ("SVAMP", "The answer is 1,234.", "1234.0", True),
        ("mawps", "1.8333", "1.8333333333333335", True),
        ("AddSub", "no idea", "3.0", False),
        ("MultiArith", "The answer is 7.", ["7.0"], True),  # one-element list gold
        ("AQuA", "A train goes 5 km. The answer is (D).", "D", True),
        ("AQuA", "The answer is (D).", " d ", True),
        ("AQuA", "nothing here", "A", False),
        ("boolq", "The correct answer is TRUE", "true", True),
        ("piqa", "solution1 and solution2", "solution2", False),
        ("hellaswag", "the correct answer is ending3", ["ending3"], True),
        ("arc_easy", "answer1", "answer1", True),
    ],
)
def test_is_correct(dataset, generation, gold, expected):
    assert is_correct(dataset, generation, gold) is expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("576.0", "576.0"), (["A"], "A"), (" true\n", "true"), ([" ending2 "], "ending2"), (7, "7")],
)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize("answer", [["A", "B"], [], None, True, {"answer": "A"}])
def test_normalize_answer_rejects_other_shapes(answer):
    with pytest.raises(ValueError, match="answer"):
        normalize_answer(answer)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("GSM8K", "gsm8k"), ("addsub", "AddSub"), ("svamp", "SVAMP"), ("aqua", "AQuA"),
        ("arc_challenge", "ARC-Challenge"), ("ARC-Easy", "ARC-Easy"), ("SocialIQA", "social_i_qa"),
        ("OpenBookQA", "openbookqa"), ("WinoGrande", "winogrande"),
    ],
)
def test_canonical_dataset_name(name, expected):
    assert canonical_dataset_name(name) == expected


def test_every_canonical_name_maps_to_itself():
    for name in MATH_DATASETS + COMMONSENSE_DATASETS:
        assert canonical_dataset_name(name) == name


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mmlu'.*gsm8k.*ARC-Challenge"):
        is_correct("mmlu", "answer1", "answer1")


def test_commonsense_extraction_refuses_a_math_dataset():
    with pytest.raises(ValueError, match="not a commonsense dataset"):
        extract_commonsense_answer("answer1", "gsm8k")


def test_math_gold_must_be_a_number():
    with pytest.raises(ValueError):
        is_correct("gsm8k", "The answer is 3", "three")
