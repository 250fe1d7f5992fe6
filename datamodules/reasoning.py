"""Math and commonsense reasoning in LLM-Adapters' format: train on the rationale, evaluate by generate-and-score.

`data_dir` mirrors LLM-Adapters: `dataset/<name>/test.json` per evaluation set, training files in
`ft-training_set/` (math) or per-task `dataset/<name>/train.json` (commonsense, when commonsense_170k
is missing). Real copies: ../shared/data/math_reasoning and ../shared/data/commonsense_reasoning.
"""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.instruction import (
    InstructionDataModule,
    collate_for_generation,
    encode_for_generation,
    read_records,
    text_field,
)
from datamodules.sampling import check_sample_limits
from sparse_lightning.eval import COMMONSENSE_DATASETS, MATH_DATASETS, canonical_dataset_name, normalize_answer

EVAL_FIELDS = {"instruction": text_field, "input": text_field, "answer": normalize_answer}
# hellaswag's shared copy is rebuilt from HellaSwag validation and named test_reconstructed.json.
TEST_FILE_NAMES = ("test.json", "test_reconstructed.json")


def question_key(instruction: str) -> str:
    """Whitespace-normalised, case-folded question, so trivially reformatted duplicates still match."""
    return " ".join(instruction.split()).casefold()


class ReasoningDataModule(InstructionDataModule):
    """Shared base: training on {instruction, input, output}, one generation loader per evaluation set.

    Validation loaders (`val_set_names`): the held-out loss split when `val_fraction > 0`, then one
    loader per evaluation set; test loaders (`test_set_names`) are the evaluation sets only. Generation
    batches hold left-padded `input_ids` and `attention_mask`, `answers` (normalised gold strings) and
    `dataset` (the set's canonical name).
    """

    family = "reasoning"
    all_eval_datasets: tuple[str, ...] = ()

    def __init__(
        self,
        data_dir: str | None = None,
        train_files: str | list[str] | None = None,
        eval_datasets: list[str] | None = None,
        max_eval_samples_per_dataset: int | None = None,
        drop_train_overlap: bool = True,
        tokenizer_name_or_path: str = "SmolLM2-135M-Instruct",
        template: str = "alpaca",
        max_length: int = 512,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        seed: int = 42,
        packing: bool = False,
    ) -> None:
        super().__init__(
            data_files=train_files,
            tokenizer_name_or_path=tokenizer_name_or_path,
            template=template,
            max_length=max_length,
            val_fraction=val_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            max_train_samples=max_train_samples,
            seed=seed,
            packing=packing,
        )
        check_sample_limits(max_eval_samples_per_dataset=max_eval_samples_per_dataset)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.eval_datasets = self._canonical_eval_datasets(eval_datasets)
        self.max_eval_samples_per_dataset = max_eval_samples_per_dataset
        self.drop_train_overlap = drop_train_overlap
        self.eval_examples: dict[str, list[dict[str, Any]]] | None = None

    @property
    def val_set_names(self) -> list[str]:
        return super().val_set_names + self.eval_datasets

    @property
    def test_set_names(self) -> list[str]:
        """Names of the test loaders (the evaluation sets), in loader order."""
        return list(self.eval_datasets)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.eval_examples is None:
            self.eval_examples = {name: self._encode_eval_set(name) for name in self.eval_datasets}

    def val_dataloader(self) -> list[DataLoader]:
        return super().val_dataloader() + self.test_dataloader()

    def test_dataloader(self) -> list[DataLoader]:
        return [self._generation_loader(name) for name in self.eval_datasets]

    def _generation_loader(self, name: str) -> DataLoader:
        collate = partial(collate_for_generation, pad_token_id=self.tokenizer.pad_token_id, dataset=name)
        examples = self.eval_examples[name]
        return DataLoader(examples, self.eval_batch_size, collate_fn=collate, num_workers=self.num_workers)

    def _canonical_eval_datasets(self, names: list[str] | None) -> list[str]:
        if names is None:
            return list(self.all_eval_datasets)
        canonical = [canonical_dataset_name(name) for name in names]
        foreign = [name for name in canonical if name not in self.all_eval_datasets]
        if foreign:
            valid = ", ".join(self.all_eval_datasets)
            raise ValueError(f"{type(self).__name__} evaluates {self.family} sets ({valid}), not {foreign}")
        return canonical

    def _require_data_dir(self, needed_for: str) -> Path:
        if self.data_dir is None:
            raise ValueError(
                f"{type(self).__name__} needs data_dir for {needed_for}: a folder in LLM-Adapters' layout "
                f"(dataset/<name>/test.json), e.g. ../shared/data/{self.family}_reasoning; or pass train_files "
                "(local files or hub names) with eval_datasets=[]"
            )
        return self.data_dir

    def _test_file(self, name: str) -> Path:
        folder = self._require_data_dir(f"the {name} test set") / "dataset" / name
        for file_name in TEST_FILE_NAMES:
            if (folder / file_name).is_file():
                return folder / file_name
        raise FileNotFoundError(
            f"no {' or '.join(TEST_FILE_NAMES)} in {folder}; choose the sets to evaluate with eval_datasets"
        )

    @cached_property
    def _full_eval_records(self) -> dict[str, list[dict[str, Any]]]:
        """Every record of each selected evaluation set (the overlap filter checks all of them)."""
        return {name: read_records(self._test_file(name), EVAL_FIELDS) for name in self.eval_datasets}

    def _encode_eval_set(self, name: str) -> list[dict[str, Any]]:
        records = self._full_eval_records[name][: self.max_eval_samples_per_dataset]
        examples, stats = encode_for_generation(records, self.tokenizer, self.template, self.max_length)
        rank_zero_info(stats.summary(f"{type(self).__name__} eval {name}"))
        return examples

    def _train_sources(self) -> list[str]:
        if self.data_files is None:
            return [str(path) for path in self._default_train_files(self._require_data_dir("default training files"))]
        files = [self.data_files] if isinstance(self.data_files, str) else self.data_files
        return [str(self.data_dir / f) if self.data_dir and (self.data_dir / f).is_file() else f for f in files]

    def _default_train_files(self, data_dir: Path) -> list[Path]:
        """The training files used when train_files is None; each task family knows its own."""
        raise NotImplementedError

    def _load_train_records(self) -> list[dict[str, Any]]:
        records = super()._load_train_records()
        if not self.drop_train_overlap or not self.eval_datasets:
            return records
        questions = {question_key(r["instruction"]) for rs in self._full_eval_records.values() for r in rs}
        kept = [record for record in records if question_key(record["instruction"]) not in questions]
        rank_zero_info(
            f"{type(self).__name__}: dropped {len(records) - len(kept)} of {len(records)} training records whose "
            f"question appears in an evaluation set ({', '.join(self.eval_datasets)})"
        )
        if not kept:
            raise ValueError(
                f"every one of the {len(records)} training records appears in the evaluation sets; train on data cut "
                "from other splits (e.g. math_10k), or set drop_train_overlap=False for a pipeline smoke test only"
            )
        return kept


class MathDataModule(ReasoningDataModule):
    """Math word problems: gsm8k, AddSub, MultiArith, SingleEq, SVAMP, AQuA, mawps.

    Default training file: ft-training_set/math_10k.json, else math_data.json (which is cut from the
    test sets: with drop_train_overlap=True nothing of it survives when all sets are evaluated).
    """

    family = "math"
    all_eval_datasets = MATH_DATASETS

    def _default_train_files(self, data_dir: Path) -> list[Path]:
        candidates = [data_dir / "ft-training_set" / name for name in ("math_10k.json", "math_data.json")]
        for path in candidates:
            if path.is_file():
                return [path]
        raise FileNotFoundError(f"none of {[str(p) for p in candidates]} exists; pass train_files")


class CommonsenseDataModule(ReasoningDataModule):
    """Commonsense QA: boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa.

    Default training file: commonsense_170k.json (in data_dir or its ft-training_set/), else every
    per-task dataset/<name>/train.json that exists.
    """

    family = "commonsense"
    all_eval_datasets = COMMONSENSE_DATASETS

    def _default_train_files(self, data_dir: Path) -> list[Path]:
        for path in (data_dir / "commonsense_170k.json", data_dir / "ft-training_set" / "commonsense_170k.json"):
            if path.is_file():
                return [path]
        per_task = [data_dir / "dataset" / name / "train.json" for name in COMMONSENSE_DATASETS]
        found = [path for path in per_task if path.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no commonsense_170k.json and no dataset/<name>/train.json in {data_dir}; pass train_files"
            )
        return found
