"""Text classification or regression from your own files: CSV, TSV, JSON, JSONL, parquet or a hub dataset.

Name the text column(s) (one, or two for sentence pairs) and the label column. Labels:

- strings (or a mix of strings and numbers) are classes: ids follow the sorted class names (numbers sorted as
  numbers), or the order of `label_names` when given; the names reach the model (`label_names` on
  `SequenceClassificationModule`) and so the exported model's `config.id2label`;
- integers are classes too (ids by sorted value: labels 1..5 become ids 0..4 named "1".."5");
- floats (a JSON/parquet float, or a string such as "3.5" or "1.0") make it regression (`num_labels` 1, Pearson and
  Spearman); `task` forces either reading.

Validation comes from `validation_file`, or a seeded `val_fraction` of the training records (default 0.1 when there is
no validation file). Every record is checked when read: a missing column, a non-string text, a missing or unknown
label fails with the file, line (or record) and field named. TSV is read as plain tab-separated lines with a header
(no quoting: sentences contain quotes, as in GLUE).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from datamodules.glue import _PadCollator, _read_text
from datamodules.instruction import split_heldout
from datamodules.sampling import ResumableTrainPosition, check_sample_limits, resumable_train_loader
from sparse_lightning.borders.models import resolve_model_path

Task = Literal["auto", "classification", "regression"]
SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
VALIDATION = "validation"
Located = tuple[str, Any]  # ("file: line N", record)


# ---------------------------------------------------------------------------------------------- reading


def _csv_rows(path: Path, delimiter: str) -> list[Located]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    rows = []
    for row in reader:
        if None in row:  # more cells than the header names
            raise ValueError(f"{path}: line {reader.line_num}: {len(row) - 1 + len(row[None])} cells, the header has "
                             f"{len(reader.fieldnames)} ({', '.join(reader.fieldnames)})")
        rows.append((f"{path}: line {reader.line_num}", row))
    return rows


def _json_rows(path: Path) -> list[Located]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from error
    if isinstance(data, list):
        return [(f"{path}: record {i} (0-based)", record) for i, record in enumerate(data)]
    if isinstance(data, dict):
        return [(f"{path}: record {key!r}", record) for key, record in data.items()]
    raise ValueError(f"{path}: expected a JSON list of records or an object of records, got {type(data).__name__}")


def _jsonl_rows(path: Path) -> list[Located]:
    rows = []
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if line.strip():
            try:
                rows.append((f"{path}: line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: not valid JSON ({error.msg})") from error
    return rows


def _parquet_rows(path: Path) -> list[Located]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        raise ValueError(f"{path}: cannot read it as parquet ({error})") from error
    return [(f"{path}: record {i} (0-based)", row) for i, row in enumerate(rows)]


def read_rows(source: str, split: str = "train", hub_config: str | None = None) -> list[Located]:
    """Every record of a file (the format follows the suffix) or of a hub dataset's split, with where it is."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        readers = {".csv": lambda p: _csv_rows(p, ","), ".tsv": lambda p: _csv_rows(p, "\t"), ".json": _json_rows,
                   ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}
        rows = readers[suffix](path)
    elif path.exists() or suffix:
        raise ValueError(f"{source}: unsupported file type {path.suffix or '(a folder)'!r}; use one of "
                         f"{', '.join(SUFFIXES)}, or a hub dataset name")
    else:
        import datasets

        try:
            dataset = datasets.load_dataset(source, hub_config, split=split)
        except Exception as error:  # network, auth, cache, unknown split: all mean "no such hub data here"
            raise RuntimeError(f"could not load the hub dataset {source!r} (config {hub_config!r}, split {split!r}): "
                               f"{type(error).__name__}: {error}; offline? pass a local file") from error
        rows = [(f"{source} [{split}]: record {i} (0-based)", row) for i, row in enumerate(dataset.to_list())]
    if not rows:
        raise ValueError(f"{source}: no records")
    return rows


# ---------------------------------------------------------------------------------------------- labels


def _is_float_label(value: Any) -> bool:
    """A float (not an integer) label: 3.5, 1.0, "3.5", "1.0", "1e-3"."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return True
    if isinstance(value, str):
        text = value.strip()
        try:
            int(text)
            return False
        except ValueError:
            pass
        try:
            return math.isfinite(float(text))
        except ValueError:
            return False
    return False


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _class_name(value: Any) -> str:
    number = _as_int(value)
    return str(number) if number is not None else str(value).strip()


def infer_task(labels: Iterable[Any]) -> Literal["classification", "regression"]:
    """Regression when the labels are numbers and at least one is a float; otherwise classification."""
    labels = list(labels)
    numeric = all(_as_int(v) is not None or _is_float_label(v) for v in labels)
    return "regression" if numeric and any(_is_float_label(v) for v in labels) else "classification"


def label_kind(value: Any) -> str:
    """'integer', 'float' or 'name': labels of one file must be one kind to name classes unambiguously."""
    return "integer" if _as_int(value) is not None else "float" if _is_float_label(value) else "name"


def _require_one_label_kind(source: str, rows: list[tuple[str, Any, Any]], field: str) -> None:
    """Class names taken from a file whose labels mix kinds (`negative` beside `0`, `1` beside `1.0`) would make
    extra classes silently: refuse, showing one record of each kind."""
    first: dict[str, tuple[str, Any]] = {}
    for where, _, label in rows:
        first.setdefault(label_kind(label), (where, label))
    if len(first) > 1:
        shown = "; ".join(f"{kind} {label!r} ({where.removeprefix(f'{source}: ')})"
                          for kind, (where, label) in sorted(first.items()))
        raise ValueError(f"{source}: field {field!r} mixes label kinds ({shown}): use one kind (class names, integer "
                         "class ids, or floats for regression), or pass label_names")


#: Validation records a metric needs: a correlation is undefined on fewer than 2 (or constant) values.
MIN_VALIDATION = {"classification": 1, "regression": 2}


def _require_measurable(source: str, labels: list[Any], task: str) -> None:
    """A validation set too small to measure gives nan or nothing at all: refuse it, naming it and its count."""
    needed = MIN_VALIDATION[task]
    if len(labels) < needed or (task == "regression" and len(set(labels)) < 2):
        what = f"{len(labels)} record(s)" + (f" with {len(set(labels))} distinct label(s)" if labels else "")
        raise ValueError(f"{source}: the validation set has {what}; {task} needs at least {needed}"
                         + (" with two distinct labels (Pearson/Spearman are undefined otherwise)"
                            if task == "regression" else "")
                         + ": give a larger validation_file or more training records")


def class_names(labels: Iterable[Any]) -> list[str]:
    """Sorted distinct class names; integer labels sort as numbers."""
    names = {_class_name(v) for v in labels}
    return sorted(names, key=lambda n: (0, int(n), "") if _as_int(n) is not None else (1, 0, n))


# ---------------------------------------------------------------------------------------------- datamodule


class TextClassificationDataModule(ResumableTrainPosition, pl.LightningDataModule):
    """Sequence classification or regression on your own records, for `SequenceClassificationModule`.

    Batches: the tokenizer's `input_ids`, `attention_mask` (and `token_type_ids` for BERT-style pairs), padded to the
    longest in the batch, and `labels` (class ids, or floats for regression). `num_labels`, `metric` and
    `label_names` tell the module what to build.

    Args:
        train_file: the training records: a .csv, .tsv, .json, .jsonl or .parquet file, or a hub dataset name.
        validation_file: the validation records (same formats); without it, val_fraction of train is held out.
        text_columns: the column with the text, or two columns for sentence pairs.
        label_column: the column with the label.
        tokenizer_name_or_path: the model's tokenizer.
        task: "auto" (floats make it regression), "classification" or "regression".
        label_names: class names in id order (default: the sorted names found in train); labels may give a name or,
            when it is not a name, an id.
        val_fraction: share of train held out for validation when there is no validation_file (default 0.1).
        metric: "accuracy", "accuracy_f1" (binary; F1 of id 1), "matthews" or "pearson_spearman"; default: accuracy
            for classes, pearson_spearman for regression.
        hub_config: the hub dataset's configuration name.
        train_split: the hub split to train on.
        validation_split: the hub split to validate on (when validation_file names a hub dataset).
        max_length: tokens per example (pairs are cut longest-first).
    """

    def __init__(
        self,
        train_file: str,
        validation_file: str | None = None,
        text_columns: list[str] | None = None,
        label_column: str = "label",
        tokenizer_name_or_path: str = "all-MiniLM-L6-v2",
        task: Task = "auto",
        label_names: list[str] | None = None,
        val_fraction: float | None = None,
        metric: str | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        validation_split: str = "validation",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        shuffle: bool = True,
        seed: int = 42,
    ) -> None:
        super().__init__()
        check_sample_limits(max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
        text_columns = ["text"] if text_columns is None else list(text_columns)
        if not 1 <= len(text_columns) <= 2:
            raise ValueError(f"text_columns names one column, or two for sentence pairs; got {text_columns}")
        if task not in ("auto", "classification", "regression"):
            raise ValueError(f"task must be 'auto', 'classification' or 'regression', got {task!r}")
        if val_fraction is None:
            val_fraction = 0.0 if validation_file else 0.1
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if validation_file and val_fraction > 0:
            raise ValueError("give validation_file or val_fraction, not both")
        if label_names is not None and (len(set(label_names)) != len(label_names) or len(label_names) < 2):
            raise ValueError(f"label_names must name two or more distinct classes, got {label_names}")
        if label_names is not None and task == "regression":
            raise ValueError("label_names are class names: not for task='regression'")
        self.save_hyperparameters()
        self.text_columns = text_columns
        self.val_fraction = val_fraction
        self.task = task
        self._label_names: list[str] | None = list(label_names) if label_names is not None else None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_dataset: list[dict[str, Any]] | None = None

    # -------------------------------------------------------------------- what the module reads

    @property
    def num_labels(self) -> int:
        self._require_labels()
        return 1 if self.task == "regression" else len(self._label_names)

    @property
    def metric(self) -> str:
        self._require_labels()
        return self.hparams.metric or ("pearson_spearman" if self.task == "regression" else "accuracy")

    @property
    def label_names(self) -> list[str] | None:
        """Class names in id order (the exported model's id2label); None for regression."""
        self._require_labels()
        return list(self._label_names) if self.task == "classification" else None

    @property
    def val_set_names(self) -> list[str]:
        return [VALIDATION] if self.hparams.validation_file or self.val_fraction > 0 else []

    def _require_labels(self) -> None:
        """Labels are known once the training records are read (the module asks before it builds the model)."""
        if self.task == "auto" or (self.task == "classification" and self._label_names is None):
            self._read_splits()

    # -------------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        train, validation = self._read_splits()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._tokenize(train[: self.hparams.max_train_samples])
        if self.val_dataset is None and self.val_set_names:
            self.val_dataset = self._tokenize(validation[: self.hparams.max_eval_samples])

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup('fit') before train_dataloader()")
        loader = resumable_train_loader(self.train_dataset, batch_size=self.hparams.batch_size,
                                        shuffle=self.hparams.shuffle, seed=self.hparams.seed, trainer=self.trainer,
                                        **self._loader_kwargs())
        return self._resume_position(loader)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.val_set_names:
            return []
        if self.val_dataset is None:
            raise RuntimeError("call setup() before val_dataloader()")
        return DataLoader(self.val_dataset, batch_size=self.hparams.eval_batch_size, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()

    # -------------------------------------------------------------------- records -> examples

    _splits: tuple[list[tuple[tuple[str, ...], Any]], list[tuple[tuple[str, ...], Any]]] | None = None

    def _read_splits(self) -> tuple[list[tuple[tuple[str, ...], Any]], list[tuple[tuple[str, ...], Any]]]:
        """(texts, label) examples of train and validation, read and checked once; fixes task and label names."""
        if self._splits is not None:
            return self._splits
        hparams = self.hparams
        train_rows = [self._checked(where, record) for where, record in
                      read_rows(hparams.train_file, hparams.train_split, hparams.hub_config)]
        if hparams.validation_file:
            validation_rows = [self._checked(where, record) for where, record in
                               read_rows(hparams.validation_file, hparams.validation_split, hparams.hub_config)]
        elif self.val_fraction > 0:
            train_rows, validation_rows = split_heldout(train_rows, self.val_fraction, hparams.seed)
        else:
            validation_rows = []
        if self.task == "auto":
            self.task = "classification" if self._label_names else infer_task(r[2] for r in train_rows)
        if self.task == "classification" and self._label_names is None:
            _require_one_label_kind(hparams.train_file, train_rows, hparams.label_column)
            self._label_names = class_names(r[2] for r in train_rows)
            if len(self._label_names) < 2:
                raise ValueError(f"{hparams.train_file}: every label is {self._label_names[0]!r}: a classifier needs "
                                 "two or more classes (floats make it regression: task='regression')")
        train = [self._example(*row) for row in train_rows]
        validation = [self._example(*row) for row in validation_rows]
        if self.val_set_names:
            source = hparams.validation_file or f"{hparams.train_file} (val_fraction {self.val_fraction} held out)"
            _require_measurable(source, [label for _, label in validation], self.task)
        names = self._label_names or []
        summary = (f"classification, {len(names)} classes ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
                   if self.task == "classification" else "regression")
        rank_zero_info(f"{type(self).__name__}: {len(train)} training and {len(validation)} validation records; "
                       f"{summary}")
        self._splits = train, validation
        return self._splits

    def _checked(self, where: str, record: Any) -> tuple[str, tuple[str, ...], Any]:
        """(where, texts, raw label): every text column a string, the label present."""
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a record with fields {', '.join(self.text_columns)}, "
                             f"{self.hparams.label_column}; got {type(record).__name__}")
        texts = []
        for column in (*self.text_columns, self.hparams.label_column):
            if column not in record:
                raise ValueError(f"{where}: field {column!r} is missing (the record has fields: "
                                 f"{', '.join(map(str, record))}); set text_columns / label_column")
        for column in self.text_columns:
            value = record[column]
            if value is None:
                raise ValueError(f"{where}: field {column!r} is missing (an empty cell or null)")
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {column!r} must be a string, got {type(value).__name__} {value!r:.40}")
            texts.append(value)
        label = record[self.hparams.label_column]
        if label is None or (isinstance(label, str) and not label.strip()) or \
                (isinstance(label, float) and math.isnan(label)):
            raise ValueError(f"{where}: field {self.hparams.label_column!r}: the label is missing")
        return where, tuple(texts), label

    def _example(self, where: str, texts: tuple[str, ...], label: Any) -> tuple[tuple[str, ...], int | float]:
        field = self.hparams.label_column
        if self.task == "regression":
            try:
                value = float(label)
            except (TypeError, ValueError):
                value = math.nan
            if isinstance(label, bool) or not math.isfinite(value):
                raise ValueError(f"{where}: field {field!r}: cannot read {label!r} as a number (task is regression)")
            return texts, value
        names = self._label_names
        name = _class_name(label)
        if name in names:
            return texts, names.index(name)
        index = _as_int(label)
        if self.hparams.label_names is not None and index is not None and 0 <= index < len(names):
            return texts, index
        known = ", ".join(names[:20])
        raise ValueError(f"{where}: field {field!r}: unknown label {label!r}; the classes are {known} (from "
                         f"{'label_names' if self.hparams.label_names else 'the training file'}; pass label_names to "
                         "add classes)")

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.tokenizer_name_or_path))
        return self.tokenizer

    def _tokenize(self, examples: list[tuple[tuple[str, ...], int | float]]) -> list[dict[str, Any]]:
        if not examples:
            return []
        columns = [list(column) for column in zip(*(texts for texts, _ in examples))]
        encoded = self._load_tokenizer()(*columns, truncation=True, max_length=self.hparams.max_length)
        return [{**{key: values[i] for key, values in encoded.items()}, "labels": label}
                for i, (_, label) in enumerate(examples)]

    def _loader_kwargs(self) -> dict[str, Any]:
        label_dtype = torch.float if self.task == "regression" else torch.long
        return {"collate_fn": _PadCollator(self._load_tokenizer(), label_dtype), "num_workers": self.hparams.num_workers,
                "persistent_workers": self.hparams.num_workers > 0}
