"""Text classification from the user's own files: formats, columns, string / integer / float labels, validation
split or held-out fraction, errors that name the file, line and field, and id2label in the exported model."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.text_classification import TextClassificationDataModule, class_names, infer_task, read_rows
from sparse_lightning.export import export_checkpoint
from sparse_lightning.modules import SequenceClassificationModule

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("a fine film", "positive"), ("dull and long", "negative"), ("a joy", "positive"), ("awful", "negative"),
        ("moving", "positive"), ("it's \"great\"", "positive"), ("flat", "negative"), ("so bad", "negative"),
        ("lovely", "positive"), ("boring", "negative")]


def write_csv(path: Path, rows, header=("review", "sentiment"), delimiter=",") -> Path:
    if delimiter == "\t":  # plain tab-separated lines, quotes as they are (GLUE style)
        path.write_text("".join("\t".join(row) + "\n" for row in [header, *rows]), encoding="utf-8")
        return path
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def datamodule(tokenizer_dir, train, **kwargs) -> TextClassificationDataModule:
    kwargs.setdefault("text_columns", ["review"])
    kwargs.setdefault("label_column", "sentiment")
    return TextClassificationDataModule(train_file=str(train), tokenizer_name_or_path=str(tokenizer_dir), **kwargs)


def test_csv_with_string_labels(tiny_bert_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", ROWS)
    dev = write_csv(tmp_path / "dev.csv", ROWS[:4])
    dm = datamodule(tiny_bert_dir, train, validation_file=str(dev), batch_size=4)
    assert (dm.num_labels, dm.metric, dm.label_names) == (2, "accuracy", ["negative", "positive"])
    dm.setup("fit")
    assert [example["labels"] for example in dm.train_dataset] == [1, 0, 1, 0, 1, 1, 0, 0, 1, 0]
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.long and batch["input_ids"].shape[0] == 4
    assert dm.val_set_names == ["validation"] and len(dm.val_dataset) == 4
    assert read_rows(str(train))[5] == (f"{train}: line 7", {"review": 'it\'s "great"', "sentiment": "positive"})


@pytest.mark.parametrize("suffix", [".tsv", ".json", ".json-object", ".jsonl", ".parquet"])
def test_every_file_format_reads_the_same_examples(tiny_bert_dir, tmp_path, suffix):
    records = [{"review": text, "sentiment": label} for text, label in ROWS]
    if suffix == ".tsv":
        path = write_csv(tmp_path / "train.tsv", ROWS, delimiter="\t")  # unbalanced quotes stay as they are
    elif suffix == ".json":
        path = tmp_path / "train.json"
        path.write_text(json.dumps(records))
    elif suffix == ".json-object":
        path = tmp_path / "train.json"
        path.write_text(json.dumps({str(i): r for i, r in enumerate(records)}))
    elif suffix == ".jsonl":
        path = tmp_path / "train.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        import datasets

        path = tmp_path / "train.parquet"
        datasets.Dataset.from_list(records).to_parquet(str(path))
    reference = datamodule(tiny_bert_dir, write_csv(tmp_path / "ref.csv", ROWS), val_fraction=0.0)
    dm = datamodule(tiny_bert_dir, path, val_fraction=0.0)
    dm.setup("fit")
    reference.setup("fit")
    assert dm.train_dataset == reference.train_dataset and dm.label_names == ["negative", "positive"]


def test_sentence_pairs(tiny_bert_dir, tmp_path):
    rows = [(f"premise {i}", f"hypothesis {i}", ["entailment", "neutral", "contradiction"][i % 3]) for i in range(9)]
    train = write_csv(tmp_path / "nli.csv", rows, header=("premise", "hypothesis", "gold"))
    dm = datamodule(tiny_bert_dir, train, text_columns=["premise", "hypothesis"], label_column="gold", val_fraction=0.0)
    dm.setup("fit")
    assert dm.label_names == ["contradiction", "entailment", "neutral"] and dm.num_labels == 3
    first = dm.train_dataset[0]
    assert set(first["token_type_ids"]) == {0, 1} and first["labels"] == 1
    with pytest.raises(ValueError, match="one column, or two for sentence pairs"):
        datamodule(tiny_bert_dir, train, text_columns=["a", "b", "c"])


def test_float_labels_are_regression_integers_are_classes(tiny_bert_dir, tmp_path):
    scores = write_csv(tmp_path / "scores.csv", [(f"text {i}", f"{i / 2}") for i in range(8)])
    dm = datamodule(tiny_bert_dir, scores, val_fraction=0.25)
    assert (dm.num_labels, dm.metric, dm.label_names) == (1, "pearson_spearman", None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float32 and len(dm.val_dataset) == 2
    stars = write_csv(tmp_path / "stars.csv", [(f"text {i}", str(1 + i % 5)) for i in range(10)])
    dm = datamodule(tiny_bert_dir, stars, val_fraction=0.0)
    assert dm.label_names == ["1", "2", "3", "4", "5"] and dm.num_labels == 5
    assert infer_task([1.0, 2.0]) == "regression" and infer_task([1, 2]) == "classification"
    assert infer_task(["1.0", "2"]) == "regression" and infer_task(["a", 1.5]) == "classification"
    assert class_names([10, 2, "2", 1]) == ["1", "2", "10"]
    forced = datamodule(tiny_bert_dir, stars, val_fraction=0.0, task="regression")
    assert forced.num_labels == 1


def test_label_names_fix_the_order_and_accept_ids(tiny_bert_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", [("good", "pos"), ("bad", "0"), ("fine", "1")])
    dm = datamodule(tiny_bert_dir, train, val_fraction=0.0, label_names=["neg", "pos"])
    dm.setup("fit")
    assert [e["labels"] for e in dm.train_dataset] == [1, 0, 1] and dm.label_names == ["neg", "pos"]


def test_heldout_fraction_by_default_and_not_with_a_validation_file(tiny_bert_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", ROWS * 2)
    dm = datamodule(tiny_bert_dir, train)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (18, 2)  # 0.1 held out, seeded
    again = datamodule(tiny_bert_dir, train)
    again.setup("fit")
    assert again.val_dataset == dm.val_dataset
    with pytest.raises(ValueError, match="validation_file or val_fraction, not both"):
        datamodule(tiny_bert_dir, train, validation_file=str(train), val_fraction=0.2)
    none = datamodule(tiny_bert_dir, train, val_fraction=0.0)
    none.setup("fit")
    assert none.val_set_names == [] and none.val_dataloader() == []


def test_hub_dataset(tiny_bert_dir, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"review": t, "sentiment": s} for t, s in ROWS])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = datamodule(tiny_bert_dir, "someone/reviews", validation_file="someone/reviews", hub_config="en",
                    validation_split="test")
    dm.setup("fit")
    assert calls == [("someone/reviews", "en", "train"), ("someone/reviews", "en", "test")]
    assert len(dm.train_dataset) == len(dm.val_dataset) == 10


@pytest.mark.parametrize(("content", "kwargs", "problem"), [
    ("review,stars\nok,1\n", {}, r"train.csv: line 2: field 'sentiment' is missing \(the record has fields: review, stars\)"),
    ("review,sentiment\nok,positive\nbad,\n", {}, r"train.csv: line 3: field 'sentiment': the label is missing"),
    ("review,sentiment\nok,positive\nbad,negative,extra\n", {}, r"train.csv: line 3: 3 cells, the header has 2"),
    ("review,sentiment\nok,positive\nfine,positive\n", {}, r"train.csv: every label is 'positive'"),
    ("review,sentiment\nok,positive\nbad,negative\n", {"validation": "review,sentiment\nmeh,neutral\n"},
     r"dev.csv: line 2: field 'sentiment': unknown label 'neutral'; the classes are negative, positive"),
    ("review,sentiment\nok,1.5\nbad,x\n", {"task": "regression"},
     r"train.csv: line 3: field 'sentiment': cannot read 'x' as a number"),
])
def test_bad_records_name_file_line_and_field(tiny_bert_dir, tmp_path, content, kwargs, problem):
    train = tmp_path / "train.csv"
    train.write_text(content)
    if "validation" in kwargs:
        (tmp_path / "dev.csv").write_text(kwargs.pop("validation"))
        kwargs["validation_file"] = str(tmp_path / "dev.csv")
    with pytest.raises(ValueError, match=problem):
        datamodule(tiny_bert_dir, train, **kwargs).setup("fit")


def test_bad_sources_and_non_string_text(tiny_bert_dir, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"review": "ok", "sentiment": "a"}) + "\n" + json.dumps({"review": 3, "sentiment": "b"}))
    with pytest.raises(ValueError, match=r"train.jsonl: line 2: field 'review' must be a string, got int"):
        datamodule(tiny_bert_dir, path).setup("fit")
    with pytest.raises(ValueError, match=r"unsupported file type '.xlsx'"):
        datamodule(tiny_bert_dir, tmp_path / "train.xlsx").setup("fit")
    with pytest.raises(FileNotFoundError, match="missing.csv: no such file"):
        datamodule(tiny_bert_dir, tmp_path / "missing.csv").setup("fit")


def test_string_labels_reach_the_exported_models_id2label(tiny_bert_dir, tmp_path):
    """Trained through a checkpoint and exported merged: config.json names the classes, and the merged model loads."""
    train = write_csv(tmp_path / "train.csv", ROWS * 2)
    dm = datamodule(tiny_bert_dir, train, val_fraction=0.2, batch_size=4)
    module = SequenceClassificationModule(str(tiny_bert_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = L.Trainer(max_steps=2, val_check_interval=2, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert module.hparams.label_names == ["negative", "positive"] and module.hparams.num_labels == 2
    assert "val/accuracy" in trainer.callback_metrics
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    written = export_checkpoint(checkpoint, tmp_path / "out", merged=True)
    config = json.loads((written["merged"] / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}


@pytest.mark.slow
def test_the_readme_csv_example_trains_through_the_cli(tmp_path):
    """configs/task/csv_classification.yaml (the bundled SST-2 CSV, string labels) with MiniLM and SIFT, a few steps,
    then export: the merged model's id2label names the CSV's classes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sparse_lightning.cli", "fit", "--config", "configs/model/minilm.yaml",
               "--config", "configs/task/csv_classification.yaml", "--config", "configs/method/minilm/sift.yaml",
               "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--data.max_eval_samples", "64",
               "--trainer.default_root_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final metrics: val/accuracy=" in result.stdout + result.stderr
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    export = subprocess.run([sys.executable, "-m", "sparse_lightning.cli", "export", "--ckpt_path", str(checkpoint),
                             "--output", str(tmp_path / "out"), "--merged", "true"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert export.returncode == 0, export.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
