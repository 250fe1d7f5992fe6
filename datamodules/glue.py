"""GLUE as a LightningDataModule, from local files, the Hugging Face hub, or a bundled SST-2 subset.

Every record is read and checked when a split is first needed, so bad data fails at once with the file, record and
field named. Each split is tokenized once in `setup`; batches are padded to their longest member by the collator.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from datamodules.sampling import ResumableTrainPosition, check_sample_limits, resumable_train_loader
from sparse_lightning.borders.models import resolve_model_path

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled" / "glue"
HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """What the rest of the code needs to know about one GLUE task (field names follow nyu-mll/glue)."""

    name: str
    folder: str
    text_fields: tuple[str, ...]
    num_labels: int
    metric: str
    val_set_names: tuple[str, ...]


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", ("sentence",), 2, "matthews", ("validation",)),
        GlueTask("sst2", "SST-2", ("sentence",), 2, "accuracy", ("validation",)),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), 2, "accuracy_f1", ("validation",)),
        GlueTask("qqp", "QQP", ("question1", "question2"), 2, "accuracy_f1", ("validation",)),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), 1, "pearson_spearman", ("validation",)),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), 3, "accuracy", ("matched", "mismatched")),
        GlueTask("qnli", "QNLI", ("question", "sentence"), 2, "accuracy", ("validation",)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), 2, "accuracy", ("validation",)),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), 2, "accuracy", ("validation",)),
    )
}

# Class names in label-id order, exactly as nyu-mll/glue numbers them; files may give either the name or the id.
_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}


@dataclass(frozen=True)
class _TsvLayout:
    """Where a GLUE tsv keeps the texts and the label; `columns` names the columns of a file without a header."""

    text_columns: tuple[str, ...]
    label_column: str
    columns: tuple[str, ...] = ()


_TSV_LAYOUTS: dict[str, _TsvLayout] = {
    "cola": _TsvLayout(("sentence",), "label", columns=("source", "label", "orig_mark", "sentence")),
    "sst2": _TsvLayout(("sentence",), "label"),
    "mrpc": _TsvLayout(("#1 String", "#2 String"), "Quality"),
    "qqp": _TsvLayout(("question1", "question2"), "is_duplicate"),
    "stsb": _TsvLayout(("sentence1", "sentence2"), "score"),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label"),
    "qnli": _TsvLayout(("question", "sentence"), "label"),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label"),
    "wnli": _TsvLayout(("sentence1", "sentence2"), "label"),
}

# Split ("train" or a validation set name) -> file stem in a GLUE folder, and -> split name on the hub.
_FILE_STEMS = {"train": "train", "validation": "dev", "matched": "dev_matched", "mismatched": "dev_mismatched"}
_HUB_SPLITS = {"train": "train", "validation": "validation", "matched": "validation_matched",
               "mismatched": "validation_mismatched"}
_FOLDER_SUFFIXES = (".tsv", ".jsonl", ".json", ".parquet")
# Files made from a part of a train set (e.g. shared/data's QNLI/train_subset_9k.json), used when no full one is there.
_SUBSET_PATTERN = "train_subset*"

Example = tuple[tuple[str, ...], int | float]


def glue_task(name: str) -> GlueTask:
    """Look a task up by any usual spelling: "sst2", "SST-2", "sst-2", "STS-B", "sts_b"."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# ---------------------------------------------------------------------------------------------------------------------
# Records -> examples


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _parse_label(value: Any, task: GlueTask, where: str, field: str) -> int | float:
    """A class id (from an id or a class name) or, for STS-B, a float score; anything else is an error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: field {field!r}: the label is missing")
    if task.num_labels == 1:
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if isinstance(value, bool) or not math.isfinite(score):
            raise ValueError(f"{where}: field {field!r}: cannot parse {value!r} as a {task.name} score (a number)")
        return score
    names = _LABEL_NAMES[task.name]
    label = names.index(value.strip()) if isinstance(value, str) and value.strip() in names else _as_int(value)
    if label is None or not 0 <= label < task.num_labels:
        raise ValueError(
            f"{where}: field {field!r}: cannot parse {value!r} as a {task.name} label; "
            f"expected an id 0..{task.num_labels - 1} or one of {', '.join(names)}"
        )
    return label


def _text_field(record: dict[str, Any], field: str, alias: str, where: str) -> str:
    value = record.get(field, record.get(alias))
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise ValueError(f"{where}: field {field!r} {problem} (the record has fields: {', '.join(map(str, record))})")
    return value


def _example_from_record(record: Any, task: GlueTask, where: str) -> Example:
    """A record with the task's field names (or text_a/text_b, as some GLUE exports use) and a `label`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a record with fields {', '.join(task.text_fields)}, label; "
                         f"got {type(record).__name__}")
    aliases = ("text_a", "text_b")
    texts = tuple(_text_field(record, field, alias, where) for field, alias in zip(task.text_fields, aliases))
    return texts, _parse_label(record.get("label"), task, where, "label")


# ---------------------------------------------------------------------------------------------------------------------
# Files -> examples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error


def _numbered_lines(text: str) -> list[tuple[int, str]]:
    """Non-empty lines with their 1-based line numbers; only "\\n" ends a line (a stray "\\r" stays in its text)."""
    lines = (line.removesuffix("\r") for line in text.split("\n"))
    return [(number, line) for number, line in enumerate(lines, 1) if line]


def _tsv_example(cells: list[str], positions: dict[str, int], task: GlueTask, where: str) -> Example:
    layout = _TSV_LAYOUTS[task.name]

    def cell(column: str) -> str:
        if positions[column] >= len(cells):
            raise ValueError(f"{where}: field {column!r} is missing: the row has {len(cells)} tab-separated columns, "
                             f"expected {len(positions)}")
        return cells[positions[column]]

    texts = tuple(cell(column) for column in layout.text_columns)
    return texts, _parse_label(cell(layout.label_column), task, where, layout.label_column)


def _read_tsv(path: Path, task: GlueTask) -> list[Example]:
    """Plain tab-split lines, never csv quoting: GLUE sentences contain unbalanced quotes."""
    layout = _TSV_LAYOUTS[task.name]
    lines = _numbered_lines(_read_text(path))
    if not lines:
        return []
    if layout.columns:
        header = list(layout.columns)
    else:
        header_number, header_line = lines.pop(0)
        header = header_line.split("\t")
        missing = [column for column in (*layout.text_columns, layout.label_column) if column not in header]
        if missing:
            raise ValueError(f"{path}: line {header_number}: the header has no column {missing[0]!r} "
                             f"(it has: {', '.join(header)}); is this a GLUE {task.folder} file?")
    positions = {column: index for index, column in enumerate(header)}
    return [_tsv_example(line.split("\t"), positions, task, f"{path}: line {number}") for number, line in lines]


def _examples_from_records(records: Iterable[tuple[str, Any]], task: GlueTask) -> list[Example]:
    return [_example_from_record(record, task, where) for where, record in records]


def _read_json(path: Path, task: GlueTask) -> list[Example]:
    """A JSON list of records, or an object of records keyed by id (the layout of shared/data's QNLI subset)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from error
    if isinstance(data, list):
        return _examples_from_records(((f"{path}: record {i}", r) for i, r in enumerate(data, 1)), task)
    if isinstance(data, dict):
        return _examples_from_records(((f"{path}: record {key!r}", r) for key, r in data.items()), task)
    raise ValueError(f"{path}: expected a JSON list of records or an object of records, got {type(data).__name__}")


def _read_jsonl(path: Path, task: GlueTask) -> list[Example]:
    def record(number: int, line: str) -> tuple[str, Any]:
        try:
            return f"{path}: line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number}: not valid JSON ({error.msg})") from error

    lines = _numbered_lines(_read_text(path))
    return _examples_from_records((record(number, line) for number, line in lines if line.strip()), task)


def _read_csv(path: Path, task: GlueTask) -> list[Example]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    return _examples_from_records(((f"{path}: line {reader.line_num}", row) for row in reader), task)


def _read_parquet(path: Path, task: GlueTask) -> list[Example]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        raise ValueError(f"{path}: cannot read it as parquet ({error})") from error
    return _examples_from_records(((f"{path}: record {i}", row) for i, row in enumerate(rows, 1)), task)


_READERS: dict[str, Callable[[Path, GlueTask], list[Example]]] = {
    ".tsv": _read_tsv, ".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".csv": _read_csv,
}


def _read_file(path: Path, task: GlueTask) -> list[Example]:
    """Read and check every record of a file; the format follows the extension (.tsv means the task's GLUE layout)."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_READERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a GLUE {task.folder} data file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; expected GLUE {task.folder} records")
    examples = reader(path, task)
    if not examples:
        raise ValueError(f"{path}: no records; expected GLUE {task.folder} records")
    return examples


def _file_in_folder(folder: Path, task: GlueTask, split: str, bundled: bool) -> Path:
    """`<folder>/train.tsv`, `dev.tsv`, ... (or .jsonl/.json/.parquet); for train, a `train_subset*` as fallback."""
    stem = _FILE_STEMS[split]
    candidates = [folder / f"{stem}{suffix}" for suffix in _FOLDER_SUFFIXES]
    if split == "train":
        candidates += [p for p in sorted(folder.glob(_SUBSET_PATTERN)) if p.suffix in _FOLDER_SUFFIXES]
    for path in candidates:
        if path.is_file():
            if path.name.startswith("train_subset"):
                log.warning("%s has no full train set; training on the subset %s", folder, path)
            return path
    if bundled:
        hint = "the bundled data only has SST-2; pass data_dir=<a folder with the GLUE layout> or no data_dir (hub)"
    else:
        hint = f"pass data_dir=<a folder holding {task.folder}/{stem}.tsv>"
        hint += " or data_dir='bundled'" if task.name == "sst2" else ""
    raise FileNotFoundError(f"expected {candidates[0]} (or {stem}.jsonl/.json/.parquet); {hint}")


def _hub_error_hint(task: GlueTask) -> str:
    bundled = " or data_dir='bundled' (a real SST-2 subset shipped with the package)" if task.name == "sst2" else ""
    return f"offline? pass data_dir=<a folder holding {task.folder}/train.tsv and dev tsv files>{bundled}"


def _load_hub_split(task: GlueTask, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(HUB_DATASET, task.name, split=split)
    except Exception as error:  # network, auth and cache failures all surface differently; all mean "no hub data"
        raise RuntimeError(
            f"could not load GLUE {task.name} split {split!r} from the Hugging Face hub ({HUB_DATASET}): "
            f"{type(error).__name__}: {error}; {_hub_error_hint(task)}"
        ) from error


def _hub_examples(task: GlueTask, split: str) -> list[Example]:
    rows = _load_hub_split(task, split).to_list()
    where = f"{HUB_DATASET}/{task.name} [{split}] record"
    return _examples_from_records(((f"{where} {i}", row) for i, row in enumerate(rows, 1)), task)


# ---------------------------------------------------------------------------------------------------------------------
# Batching


class _PadCollator:
    """Pad tokenized examples to the longest one in the batch; labels get the dtype the loss needs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, label_dtype: torch.dtype) -> None:
        self.tokenizer = tokenizer
        self.label_dtype = label_dtype

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([feature["labels"] for feature in features], dtype=self.label_dtype)
        inputs = [{key: value for key, value in feature.items() if key != "labels"} for feature in features]
        return {**self.tokenizer.pad(inputs, return_tensors="pt"), "labels": labels}


class GLUEDataModule(ResumableTrainPosition, pl.LightningDataModule):
    """One GLUE task: train split plus its validation set(s) (two for MNLI: matched, mismatched).

    Sources, per split: `train_file` / `validation_files`; else `data_dir` (GLUE folder layout, or "bundled" for the
    SST-2 subset shipped with the package); else the Hugging Face hub (nyu-mll/glue).
    """

    def __init__(
        self,
        task: str = "sst2",
        tokenizer_name_or_path: str = "all-MiniLM-L6-v2",
        data_dir: str | None = None,
        train_file: str | None = None,
        validation_files: list[str] | None = None,
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
        self.task = glue_task(task)
        if validation_files is not None and len(validation_files) != len(self.task.val_set_names):
            raise ValueError(
                f"{self.task.name} has {len(self.task.val_set_names)} validation set(s) "
                f"({', '.join(self.task.val_set_names)}); got {len(validation_files)} validation_files"
            )
        self.save_hyperparameters()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_datasets: list[list[dict[str, Any]]] | None = None

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    @property
    def metric(self) -> str:
        return self.task.metric

    @property
    def val_set_names(self) -> list[str]:
        return list(self.task.val_set_names)

    def prepare_data(self) -> None:
        """Download (once per node) what `setup` will read: the tokenizer and any split that comes from the hub."""
        self._load_tokenizer()
        for split in ("train", *self.task.val_set_names):
            if self._local_file(split) is None:
                _load_hub_split(self.task, _HUB_SPLITS[split])

    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize each split once; later calls (other stages) reuse what is there."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._tokenize(self._examples("train", self.hparams.max_train_samples))
        if self.val_datasets is None:
            self.val_datasets = [
                self._tokenize(self._examples(name, self.hparams.max_eval_samples)) for name in self.task.val_set_names
            ]

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup('fit') before train_dataloader()")
        # The order of epoch e is a function of (seed, e), split over ranks, and the position is checkpointed, so a
        # resumed run sees the batches the uninterrupted one would (Lightning keeps this DistributedSampler subclass).
        loader = resumable_train_loader(self.train_dataset, batch_size=self.hparams.batch_size,
                                        shuffle=self.hparams.shuffle, seed=self.hparams.seed, trainer=self.trainer,
                                        **self._loader_kwargs())
        return self._resume_position(loader)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader, or one per validation set in `val_set_names` order (MNLI)."""
        if self.val_datasets is None:
            raise RuntimeError("call setup() before val_dataloader()")
        loaders = [self._loader(dataset, self.hparams.eval_batch_size) for dataset in self.val_datasets]
        return loaders if len(loaders) > 1 else loaders[0]

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation sets: GLUE test labels are hidden."""
        return self.val_dataloader()

    def _local_file(self, split: str) -> Path | None:
        """The file a split ("train" or a validation set name) is read from, or None when it comes from the hub."""
        hparams = self.hparams
        if split == "train" and hparams.train_file:
            return Path(hparams.train_file)
        if split != "train" and hparams.validation_files:
            return Path(hparams.validation_files[self.task.val_set_names.index(split)])
        if hparams.data_dir:
            bundled = hparams.data_dir == BUNDLED
            root = BUNDLED_DIR if bundled else Path(hparams.data_dir)
            return _file_in_folder(root / self.task.folder, self.task, split, bundled)
        return None

    def _examples(self, split: str, max_samples: int | None) -> list[Example]:
        path = self._local_file(split)
        examples = _read_file(path, self.task) if path else _hub_examples(self.task, _HUB_SPLITS[split])
        return examples[:max_samples] if max_samples is not None else examples

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.tokenizer_name_or_path))
        return self.tokenizer

    def _tokenize(self, examples: list[Example]) -> list[dict[str, Any]]:
        """Tokenize a split in one call (pairs truncated longest-first to max_length); padding waits for batches."""
        columns = [list(column) for column in zip(*(texts for texts, _ in examples))]
        encoded = self._load_tokenizer()(*columns, truncation=True, max_length=self.hparams.max_length)
        return [
            {**{key: values[i] for key, values in encoded.items()}, "labels": label}
            for i, (_, label) in enumerate(examples)
        ]

    def _loader(self, dataset: list[dict[str, Any]], batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict[str, Any]:
        label_dtype = torch.float if self.task.num_labels == 1 else torch.long
        return {"collate_fn": _PadCollator(self._load_tokenizer(), label_dtype), "num_workers": self.hparams.num_workers,
                "persistent_workers": self.hparams.num_workers > 0}
