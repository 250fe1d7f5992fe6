"""Instruction tuning data for causal LMs: records {instruction, input, output}, loss on the response only.

The pieces here (record reading and validation, prompt/response encoding with label masking and
counted truncation, padding collators) are shared with the math and commonsense datamodules.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from datamodules.packing import collate_packed, pack_examples
from datamodules.padding import IGNORE_INDEX, pad_sequences
from datamodules.prompts import TEMPLATES, build_prompt
from datamodules.sampling import ResumableTrainPosition, check_sample_limits, resumable_train_loader
from sparse_lightning.models import resolve_model_path

HELDOUT = "heldout"
BUNDLED_ALPACA = Path(__file__).resolve().parent / "bundled" / "alpaca" / "alpaca_500.json"
ALPACA_HUB_NAME = "tatsu-lab/alpaca"


# ---------------------------------------------------------------------------------------------- records


def text_field(value: Any) -> str:
    """Field converter for string fields; anything else is bad data."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__} {value!r:.60}")
    return value


FieldConverters = Mapping[str, Callable[[Any], Any]]
INSTRUCTION_FIELDS: FieldConverters = {"instruction": text_field, "input": text_field, "output": text_field}


def read_records(source: str | Path, fields: FieldConverters) -> list[dict[str, Any]]:
    """Read a .json list, .jsonl or .parquet file (or a hub dataset's train split) and check every record.

    Each required field goes through its converter; bad data raises ValueError naming the file,
    the record's 0-based index and the field.
    """
    records = _read_raw(str(source))
    return [_convert_record(record, index, str(source), fields) for index, record in enumerate(records)]


def _read_raw(source: str) -> list[Any]:
    path = Path(source)
    if path.is_file():
        if path.suffix == ".parquet":
            import datasets

            records = datasets.Dataset.from_parquet(str(path)).to_list()
        else:
            records = _read_json(path)
    elif "/" in source and not path.suffix and not path.exists():
        import datasets

        records = datasets.load_dataset(source, split="train").to_list()
    else:
        raise FileNotFoundError(
            f"{source}: no such file (expected a .json, .jsonl or .parquet file, or a hub dataset name)"
        )
    if not records:
        raise ValueError(f"{source}: contains no records")
    return records


def _read_json(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({error.reason} at byte {error.start}); save the file "
                         "as UTF-8") from error
    if path.suffix == ".jsonl":
        lines = enumerate(text.splitlines(), start=1)
        return [_parse_json(line, f"{path} line {number}") for number, line in lines if line.strip()]
    data = _parse_json(text, str(path)) if text.strip() else []
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    return data


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from error


def _convert_record(record: Any, index: int, source: str, fields: FieldConverters) -> dict[str, Any]:
    where = f"{source}: record {index} (0-based)"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with fields {list(fields)}, got {type(record).__name__}")
    converted = dict(record)
    for field, convert in fields.items():
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r}")
        try:
            converted[field] = convert(record[field])
        except ValueError as error:
            raise ValueError(f"{where}, field {field!r}: {error}") from error
    return converted


def split_heldout(records: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Shuffle with a fixed seed and hold out `fraction` of the records (at least one when fraction > 0)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_heldout = min(len(records) - 1, max(1, round(fraction * len(records)))) if fraction > 0 else 0
    return [records[i] for i in order[n_heldout:]], [records[i] for i in order[:n_heldout]]


# ---------------------------------------------------------------------------------------------- encoding


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (built-in aliases resolved offline); pads with EOS when it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no eos_token; causal-LM fine-tuning ends every response with it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts before any text on its own (LLaMA's BOS, BERT's CLS); empty for GPT-2 style."""
    with_special = tokenizer("a")["input_ids"]
    text_only = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(text_only) + 1):
        if with_special[start : start + len(text_only)] == text_only:
            return with_special[:start]
    return []


@dataclass
class EncodingStats:
    """How many records an encoding pass kept, cut or dropped; logged so truncation is never silent."""

    records: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_empty_output: int = 0

    def summary(self, name: str) -> str:
        kept = self.records - self.dropped_empty_output
        return (
            f"{name}: kept {kept} of {self.records} records; prompts left-truncated: {self.prompt_truncated}, "
            f"responses right-truncated: {self.response_truncated}, dropped (empty output): {self.dropped_empty_output}"
        )


def fit_to_length(
    prefix: list[int], prompt: list[int], response: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Cut prompt and response so that prefix + prompt + response fits in max_length.

    The prompt loses tokens from the left first; it keeps at least half of the room (or all of itself,
    if shorter), and only beyond that is the response cut from the right.
    """
    room = max_length - len(prefix)
    if len(prompt) + len(response) <= room:
        return prompt, response
    min_prompt = min(len(prompt), room // 2)
    kept_prompt = max(room - len(response), min_prompt)
    return prompt[len(prompt) - kept_prompt :], response[: room - kept_prompt]


def encode_for_training(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
) -> tuple[list[dict[str, list[int]]], EncodingStats]:
    """Prompt ids + response ids + EOS, with labels -100 on the prompt; records with an empty output are dropped."""
    stats = EncodingStats(records=len(records))
    usable = [record for record in records if record["output"].strip()]
    stats.dropped_empty_output = len(records) - len(usable)
    prefix = _prefix_for(tokenizer, template)
    prompts = _token_ids(tokenizer, [build_prompt(record, template, tokenizer) for record in usable])
    responses = _token_ids(tokenizer, [record["output"] for record in usable])
    examples = []
    for prompt, response in zip(prompts, responses):
        response = response + [tokenizer.eos_token_id]
        kept_prompt, kept_response = fit_to_length(prefix, prompt, response, max_length)
        stats.prompt_truncated += len(kept_prompt) < len(prompt)
        stats.response_truncated += len(kept_response) < len(response)
        input_ids = prefix + kept_prompt + kept_response
        labels = [IGNORE_INDEX] * (len(prefix) + len(kept_prompt)) + kept_response
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, stats


def encode_for_generation(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
) -> tuple[list[dict[str, Any]], EncodingStats]:
    """Prompt ids (left-truncated to max_length) with the record's gold `answer`, for generate-and-score."""
    stats = EncodingStats(records=len(records))
    prefix = _prefix_for(tokenizer, template)
    prompts = _token_ids(tokenizer, [build_prompt(record, template, tokenizer) for record in records])
    examples = []
    for record, prompt in zip(records, prompts):
        kept_prompt, _ = fit_to_length(prefix, prompt, [], max_length)
        stats.prompt_truncated += len(kept_prompt) < len(prompt)
        examples.append({"input_ids": prefix + kept_prompt, "answer": record["answer"]})
    return examples, stats


def _prefix_for(tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    # A chat template writes its own special tokens into the text; adding BOS again would double it.
    return [] if template == "chat" else special_prefix(tokenizer)


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


# ---------------------------------------------------------------------------------------------- collation


def collate_for_training(examples: Sequence[Mapping[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (padding labelled -100)."""
    input_ids = [example["input_ids"] for example in examples]
    return {
        "input_ids": pad_sequences(input_ids, pad_token_id),
        "attention_mask": pad_sequences([[1] * len(ids) for ids in input_ids], 0),
        "labels": pad_sequences([example["labels"] for example in examples], IGNORE_INDEX),
    }


def collate_for_generation(examples: Sequence[Mapping[str, Any]], pad_token_id: int, dataset: str) -> dict[str, Any]:
    """Left-padded prompts (so generation continues every row at the same position), gold answers, dataset name."""
    input_ids = [example["input_ids"] for example in examples]
    return {
        "input_ids": pad_sequences(input_ids, pad_token_id, left=True),
        "attention_mask": pad_sequences([[1] * len(ids) for ids in input_ids], 0, left=True),
        "answers": [example["answer"] for example in examples],
        "dataset": dataset,
    }


# ---------------------------------------------------------------------------------------------- datamodules


class InstructionDataModule(ResumableTrainPosition, LightningDataModule):
    """Fine-tune a causal LM on instruction records {instruction, input, output} from local files or the hub.

    Training batches: right-padded `input_ids`, `attention_mask`, `labels` (-100 on prompt and padding). With
    `packing=True` each training row holds several examples (up to `max_length` tokens; `batch_size` counts rows)
    and batches add `position_ids` restarting per example (see `datamodules.packing`); evaluation is never packed.
    Validation: one loader over a held-out fraction of the records, same batch format (`val_set_names`).
    """

    def __init__(
        self,
        data_files: str | list[str] | None = None,
        tokenizer_name_or_path: str = "SmolLM2-135M-Instruct",
        template: str = "alpaca",
        max_length: int = 512,
        val_fraction: float = 0.05,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        seed: int = 42,
        packing: bool = False,
    ) -> None:
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        check_sample_limits(max_train_samples=max_train_samples)
        self.save_hyperparameters()
        self.data_files = data_files
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.template = template
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.seed = seed
        self.packing = packing
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_examples: list[dict[str, list[int]]] | None = None
        self._packed_rows: list[dict[str, list[int]]] | None = None
        self.heldout_examples: list[dict[str, list[int]]] = []

    @property
    def val_set_names(self) -> list[str]:
        """Names of the validation loaders, in loader order."""
        return [HELDOUT] if self.val_fraction > 0 else []

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name_or_path)
        needs_training_records = stage in (None, "fit") or (stage == "validate" and self.val_fraction > 0)
        if needs_training_records and self.train_examples is None:
            self._setup_training_data()

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch), split over ranks, its position checkpointed (see `datamodules.sampling`);
        with `packing`, the packed rows are what is shuffled (packed once, so the order stays a function of the seed)."""
        dataset, collate = self.train_examples, collate_for_training
        if self.packing:

            if self._packed_rows is None:
                self._packed_rows, stats = pack_examples(self.train_examples, self.max_length)
                rank_zero_info(stats.summary(f"{type(self).__name__} train"))
            dataset, collate = self._packed_rows, collate_packed
        loader = resumable_train_loader(dataset, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                                        trainer=self.trainer, num_workers=self.num_workers,
                                        collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id))
        return self._resume_position(loader)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loss_loader(self.heldout_examples, self.eval_batch_size)] if self.val_fraction > 0 else []

    def _loss_loader(self, examples: list[dict[str, list[int]]], batch_size: int) -> DataLoader:
        collate = partial(collate_for_training, pad_token_id=self.tokenizer.pad_token_id)
        return DataLoader(examples, batch_size, collate_fn=collate, num_workers=self.num_workers)

    def _train_sources(self) -> list[str]:
        """Files or hub names the training records come from."""
        if self.data_files is None:
            raise ValueError(
                f"{type(self).__name__} needs data_files: a .json/.jsonl/.parquet path, a list of them, or a hub name"
            )
        return [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)

    def _load_train_records(self) -> list[dict[str, Any]]:
        sources = self._train_sources()
        rank_zero_info(f"{type(self).__name__}: training records from {', '.join(map(str, sources))}")
        return [record for source in sources for record in read_records(source, INSTRUCTION_FIELDS)]

    def _setup_training_data(self) -> None:
        train, heldout = split_heldout(self._load_train_records(), self.val_fraction, self.seed)
        if self.max_train_samples is not None:
            train = train[: self.max_train_samples]
        self.train_examples = self._encode_logged("train", train)
        self.heldout_examples = self._encode_logged(HELDOUT, heldout)
        if not self.train_examples:
            raise ValueError(f"{type(self).__name__}: no training records left (every output is empty)")

    def _encode_logged(self, name: str, records: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
        examples, stats = encode_for_training(records, self.tokenizer, self.template, self.max_length)
        rank_zero_info(stats.summary(f"{type(self).__name__} {name}"))
        return examples


class AlpacaDataModule(InstructionDataModule):
    """Stanford Alpaca: `data_files=None` reads the hub's tatsu-lab/alpaca, "bundled" the 500 records shipped here."""

    def _train_sources(self) -> list[str]:
        if self.data_files is None:
            return [ALPACA_HUB_NAME]
        if self.data_files == "bundled":
            return [str(BUNDLED_ALPACA)]
        return super()._train_sources()
