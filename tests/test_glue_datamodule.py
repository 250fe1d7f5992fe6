"""GLUEDataModule: every source (bundled, GLUE folders, single files, hub) and every kind of bad data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.glue import BUNDLED_DIR, GLUE_TASKS, GLUEDataModule, glue_task

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_shared = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason=f"{SHARED_GLUE} is absent")

MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                     "sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def mnli_row(columns: list[str], premise: str, hypothesis: str, gold: str) -> str:
    values = {"sentence1": premise, "sentence2": hypothesis, "gold_label": gold, "label1": gold}
    return "\t".join(values.get(column, "x") for column in columns)


def labels_of(loader: DataLoader) -> list[float]:
    return [label for batch in loader for label in batch["labels"].tolist()]


def test_bundled_sst2_gives_padded_batches() -> None:
    dm = GLUEDataModule("sst2", data_dir="bundled", batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].shape == (8,)
    assert all(batch[key].dtype == torch.long for key in batch)
    assert set(batch["labels"].tolist()) <= {0, 1}
    # padded to the longest sequence of this batch, not to max_length
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1] < 128
    assert len(dm.train_dataset) == 30000
    val = dm.val_dataloader()
    assert isinstance(val, DataLoader) and len(val.dataset) == 872
    assert (dm.num_labels, dm.metric, dm.val_set_names, dm.hparams.task) == (2, "accuracy", ["validation"], "sst2")


@needs_shared
def test_bundled_sst2_is_a_verbatim_subset_of_shared_data() -> None:
    shared = (SHARED_GLUE / "SST-2" / "train.tsv").read_bytes().splitlines(keepends=True)
    bundled = (BUNDLED_DIR / "SST-2" / "train.tsv").read_bytes().splitlines(keepends=True)
    assert bundled[0] == shared[0] and len(bundled) == 30001
    assert set(bundled[1:]) <= set(shared[1:])
    assert (BUNDLED_DIR / "SST-2" / "dev.tsv").read_bytes() == (SHARED_GLUE / "SST-2" / "dev.tsv").read_bytes()


def test_shuffle_is_seeded() -> None:
    def first_labels(**kwargs: object) -> list[int]:
        dm = GLUEDataModule("sst2", data_dir="bundled", batch_size=64, max_train_samples=64, **kwargs)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["labels"].tolist()

    assert first_labels(seed=1) == first_labels(seed=1) != first_labels(seed=2)
    assert first_labels(shuffle=False) != first_labels(seed=1)


# First 8 dev labels of each shared file, read off the tsv by hand (QNLI/RTE names mapped: entailment 0).
SHARED_DEV_LABELS = {
    "cola": [1, 1, 1, 1, 0, 0, 0, 1],
    "sst2": [1, 0, 1, 1, 0, 1, 0, 0],
    "mrpc": [1, 0, 0, 1, 0, 1, 0, 1],
    "stsb": [5.0, 4.75, 5.0, 2.4, 2.75, 2.615, 5.0, 2.333],
    "qnli": [0, 1, 1, 0, 1, 1, 1, 1],
    "rte": [1, 0, 1, 1, 0, 0, 0, 0],
    "wnli": [0, 1, 0, 1, 1, 0, 1, 1],
}


@needs_shared
@pytest.mark.parametrize("task", SHARED_DEV_LABELS)
def test_shared_glue_folder_loads(task: str) -> None:
    dm = GLUEDataModule(task, data_dir=str(SHARED_GLUE), batch_size=4, eval_batch_size=8,
                        max_train_samples=12, max_eval_samples=8)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    expected_dtype = torch.float if task == "stsb" else torch.long

    assert dm.num_labels == (1 if task == "stsb" else 2)
    assert len(dm.train_dataset) == 12 and train["labels"].dtype == expected_dtype
    assert labels_of(dm.val_dataloader()) == pytest.approx(SHARED_DEV_LABELS[task])
    if len(GLUE_TASKS[task].text_fields) == 2:
        assert (train["token_type_ids"] == 1).any(), "pairs are encoded as two segments"


@needs_shared
def test_qnli_falls_back_to_the_train_subset(caplog: pytest.LogCaptureFixture) -> None:
    dm = GLUEDataModule("qnli", data_dir=str(SHARED_GLUE), max_eval_samples=1)
    with caplog.at_level(logging.WARNING, logger="datamodules.glue"):
        dm.setup("fit")
    assert len(dm.train_dataset) == 8999
    assert sum(feature["labels"] == 0 for feature in dm.train_dataset) == 4523  # entailment, per SOURCE.md
    assert "train_subset_9k.json" in caplog.text


def test_mnli_has_matched_and_mismatched_validation(tmp_path: Path) -> None:
    folder = tmp_path / "MNLI"
    write_lines(folder / "train.tsv", ["\t".join(MNLI_TRAIN_HEADER)] + [
        mnli_row(MNLI_TRAIN_HEADER, "A man sleeps.", "A person rests.", "entailment"),
        mnli_row(MNLI_TRAIN_HEADER, "A man sleeps.", "A man runs.", "contradiction"),
    ])
    write_lines(folder / "dev_matched.tsv", ["\t".join(MNLI_DEV_HEADER)] + [
        mnli_row(MNLI_DEV_HEADER, "It rains.", "It is wet.", gold)
        for gold in ("entailment", "neutral", "contradiction")
    ])
    write_lines(folder / "dev_mismatched.tsv", ["\t".join(MNLI_DEV_HEADER)] + [
        mnli_row(MNLI_DEV_HEADER, "A cat.", "An animal.", gold) for gold in ("neutral", "entailment")
    ])
    dm = GLUEDataModule("MNLI", data_dir=str(tmp_path), shuffle=False)
    dm.setup("fit")

    assert dm.val_set_names == ["matched", "mismatched"] and dm.num_labels == 3
    matched, mismatched = dm.val_dataloader()
    assert labels_of(matched) == [0, 1, 2] and labels_of(mismatched) == [1, 0]
    assert labels_of(dm.train_dataloader()) == [0, 2]
    assert [labels_of(loader) for loader in dm.test_dataloader()] == [[0, 1, 2], [1, 0]]


def test_qqp_tsv(tmp_path: Path) -> None:
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    rows = ["1\t1\t2\tHow do I cook rice?\tWhat is the way to cook rice?\t1",
            "2\t3\t4\tWhy is the sky blue?\tWho am I?\t0"]
    write_lines(tmp_path / "QQP" / "train.tsv", [header, *rows])
    write_lines(tmp_path / "QQP" / "dev.tsv", [header, rows[1]])
    dm = GLUEDataModule("qqp", data_dir=str(tmp_path), shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    assert dm.metric == "accuracy_f1"
    assert batch["labels"].tolist() == [1, 0] and (batch["token_type_ids"] == 1).any()
    assert labels_of(dm.val_dataloader()) == [0]


RTE_RECORDS = [
    {"sentence1": "The cat sat on the mat.", "sentence2": "A cat sat.", "label": "entailment"},
    {"sentence1": "It is sunny.", "sentence2": "It is raining.", "label": 1},
]


def write_records(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        import pyarrow
        import pyarrow.parquet

        labels = [str(record["label"]) for record in records]  # parquet columns need one type
        table = pyarrow.table({**{k: [r[k] for r in records] for k in ("sentence1", "sentence2")}, "label": labels})
        pyarrow.parquet.write_table(table, path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_record_files(tmp_path: Path, suffix: str) -> None:
    path = write_records(tmp_path / f"rte{suffix}", RTE_RECORDS)
    dm = GLUEDataModule("rte", train_file=str(path), validation_files=[str(path)], shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    assert batch["labels"].tolist() == [0, 1]
    assert dm.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "the cat sat on the mat. a cat sat."
    assert labels_of(dm.val_dataloader()) == [0, 1]


def test_json_object_of_text_a_text_b_records(tmp_path: Path) -> None:
    records = {"0": {"text_a": "Who wrote it?", "text_b": "Ann wrote it.", "label": "entailment"},
               "1": {"text_a": "Where is it?", "text_b": "It rains.", "label": "not_entailment"}}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    dm = GLUEDataModule("qnli", train_file=str(path), validation_files=[str(path)])
    dm.setup("validate")
    assert labels_of(dm.val_dataloader()) == [0, 1] and dm.train_dataset is None


def test_hub_source_uses_glue_split_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"premise": ["A dog barks."], "hypothesis": ["A dog is loud."],
                                           "label": [1], "idx": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = GLUEDataModule("mnli")
    dm.setup("fit")
    assert [split for _, _, split in calls] == ["train", "validation_matched", "validation_mismatched"]
    assert {(path, name) for path, name, _ in calls} == {("nyu-mll/glue", "mnli")}
    assert [labels_of(loader) for loader in dm.val_dataloader()] == [[1], [1]]


def test_hub_failure_says_how_to_work_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="no route to huggingface.co") as error:
        GLUEDataModule("sst2").setup("fit")
    assert "data_dir" in str(error.value) and "'bundled'" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("spelling, name", [("SST-2", "sst2"), ("sst-2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"),
                                            ("mnli", "mnli")])
def test_task_spellings(spelling: str, name: str) -> None:
    assert glue_task(spelling).name == name


def test_unknown_task_fails_in_init_and_lists_the_tasks() -> None:
    valid = "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"
    with pytest.raises(ValueError, match=f"unknown GLUE task 'imdb'.*{valid}"):
        GLUEDataModule("imdb")


def test_wrong_number_of_validation_files() -> None:
    with pytest.raises(ValueError, match="mnli has 2 validation set"):
        GLUEDataModule("mnli", validation_files=["dev.jsonl"])


def sst2_error(tmp_path: Path, lines: list[str]) -> str:
    path = write_lines(tmp_path / "SST-2" / "train.tsv", lines)
    write_lines(tmp_path / "SST-2" / "dev.tsv", ["sentence\tlabel", "fine .\t1"])
    with pytest.raises(ValueError) as error:
        GLUEDataModule("sst2", data_dir=str(tmp_path)).setup("fit")
    assert str(path) in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("lines, expected", [
    (["sentence\tlabel", "good .\t1", "a row with no label column"], ["line 3", "'label'", "1 tab-separated columns"]),
    (["sentence\tlabel", "good .\tabc"], ["line 2", "'label'", "'abc'"]),
    (["sentence\tlabel", "good .\t1", "bad .\t"], ["line 3", "'label'", "missing"]),
    (["sentence\tlabel", "good .\t7"], ["line 2", "'label'", "'7'"]),
    (["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"], ["line 1", "'sentence'", "SST-2"]),
    (["sentence\tlabel"], ["no records"]),
    ([], ["empty"]),
])
def test_bad_tsv_names_file_line_and_field(tmp_path: Path, lines: list[str], expected: list[str]) -> None:
    message = sst2_error(tmp_path, lines)
    for part in expected:
        assert part in message


def test_json_record_missing_a_field(tmp_path: Path) -> None:
    path = write_records(tmp_path / "rte.json", [RTE_RECORDS[0], {"sentence1": "x", "label": 0}])
    with pytest.raises(ValueError, match=r"rte\.json: record 2: field 'sentence2' is missing"):
        GLUEDataModule("rte", train_file=str(path), validation_files=[str(path)]).setup("fit")


def test_missing_file_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        GLUEDataModule("sst2", data_dir=str(tmp_path)).setup("fit")
    assert str(tmp_path / "SST-2" / "train.tsv") in str(error.value) and "data_dir='bundled'" in str(error.value)

    with pytest.raises(FileNotFoundError, match="only has SST-2"):
        GLUEDataModule("cola", data_dir="bundled").setup("fit")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        GLUEDataModule("rte", train_file=str(tmp_path / "nowhere.jsonl")).setup("fit")
