"""Issue 26, data users bring (case 10): labels of mixed kinds would make extra classes silently, and a validation set
too small to measure gives nan or nothing; both are refused naming the file and what it holds. Case 13's library side:
a broken line is named with its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.text_classification import TextClassificationDataModule


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_csv_mixing_class_names_and_numbers_is_refused(tmp_path: Path, tiny_bert_dir: Path):
    rows = [("great", "positive"), ("awful", "negative"), ("fine", "1"), ("meh", "0"), ("so so", "0.5")] * 3
    train = write(tmp_path / "train.csv", "text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    with pytest.raises(ValueError, match=r"train.csv: field 'label' mixes label kinds \(float '0.5' \(line \d+\); "
                                         r"integer '[01]' \(line \d+\); name '(positive|negative)' \(line \d+\)\)"):
        TextClassificationDataModule(train, tokenizer_name_or_path=str(tiny_bert_dir)).setup("fit")


def test_jsonl_classes_mixing_ints_and_floats_are_refused(tmp_path: Path, tiny_bert_dir: Path):
    records = [{"text": f"t{i}", "label": label} for i, label in enumerate([0, 1, 1.0, 0, 1, 0.0] * 3)]
    train = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"train.jsonl: field 'label' mixes label kinds \(float [01].0 \(line \d+\); integer [01] "):
        TextClassificationDataModule(train, task="classification", tokenizer_name_or_path=str(tiny_bert_dir)).setup("fit")


def test_a_three_row_regression_file_without_a_dev_file_is_refused(tmp_path: Path, tiny_bert_dir: Path):
    train = write(tmp_path / "train.csv", "text,label\na,0.5\nb,1.5\nc,2.5\n")
    with pytest.raises(ValueError, match=r"train.csv \(val_fraction 0.1 held out\): the validation set has 1 "
                                         r"record\(s\) with 1 distinct label\(s\); regression needs at least 2"):
        TextClassificationDataModule(train, tokenizer_name_or_path=str(tiny_bert_dir)).setup("fit")


def test_a_one_row_file_or_a_constant_dev_file_is_refused(tmp_path: Path, tiny_bert_dir: Path):
    with pytest.raises(ValueError, match=r"the validation set has 1 record|held out\): the validation set has 0"):
        TextClassificationDataModule(write(tmp_path / "one.csv", "text,label\na,x\n"), label_names=["x", "y"],
                                     tokenizer_name_or_path=str(tiny_bert_dir)).setup("fit")
    regression = write(tmp_path / "reg.csv", "text,label\n" + "".join(f"t{i},{i + 0.5}\n" for i in range(9)))
    with pytest.raises(ValueError, match=r"dev.csv: the validation set has 2 record\(s\) with 1 distinct"):
        TextClassificationDataModule(regression, validation_file=write(tmp_path / "dev.csv", "text,label\na,1.5\nb,1.5\n"),
                                     tokenizer_name_or_path=str(tiny_bert_dir)).setup("fit")


def test_a_measurable_validation_set_passes(tmp_path: Path, tiny_bert_dir: Path):
    train = write(tmp_path / "train.csv", "text,label\n" + "".join(f"t{i},{i % 4 + 0.5}\n" for i in range(40)))
    data = TextClassificationDataModule(train, tokenizer_name_or_path=str(tiny_bert_dir))
    data.setup("fit")
    assert data.task == "regression" and len(data.val_dataset) == 4
