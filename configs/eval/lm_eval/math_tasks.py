"""Data, prompt and scoring for the local lm-eval math tasks (sl_math_*): the LLM-Adapters test files in
`shared/data/math_reasoning`, the Alpaca prompt the training configs use, and the project's own answer
extraction (`sparse_lightning.eval.is_correct`), so lm-eval scores exactly what `sparse-lightning validate` does.

The data directory is `metadata.data_dir` (`sparse-lightning evaluate --data_dir`), else `$SPARSE_LIGHTNING_MATH_DATA`,
else `../shared/data/math_reasoning` beside the repository (where every config of this project looks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "math_reasoning"


def resolve_data_dir(given: str | None = None) -> Path:
    return Path(given or os.environ.get("SPARSE_LIGHTNING_MATH_DATA") or DEFAULT_DATA_DIR).expanduser()


def load(dataset: str, data_dir: str | None = None, **_: Any):
    """lm-eval `custom_dataset`: a DatasetDict with one `test` split of {instruction, input, answer, dataset}."""
    import datasets

    from sparse_lightning.eval import normalize_answer

    path = resolve_data_dir(data_dir) / "dataset" / dataset / "test.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; point --data_dir (or $SPARSE_LIGHTNING_MATH_DATA) at the "
                                "math_reasoning folder of shared/data (it holds dataset/<name>/test.json)")
    records = json.loads(path.read_text(encoding="utf-8"))
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "answer": normalize_answer(r["answer"]),
             "dataset": dataset} for r in records]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc: dict[str, Any]) -> str:
    from datamodules.prompts import build_prompt

    return build_prompt(doc, "alpaca")


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from sparse_lightning.eval import is_correct

    return {"acc": float(is_correct(doc["dataset"], results[0], doc["answer"]))}
