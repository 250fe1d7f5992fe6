"""Data, prompt and scoring for the local lm-eval reasoning tasks (sl_math_*, sl_commonsense_*): the LLM-Adapters
test files in `shared/data/{math,commonsense}_reasoning`, the Alpaca prompt the training configs use, and the
project's own answer extraction (`sparse_lightning.eval.is_correct`), so lm-eval scores exactly what
`sparse-lightning validate` does.

The data directory is `metadata.data_dir` (`sparse-lightning evaluate --data_dir`: the family's folder, or the
shared data folder holding both), else `$SPARSE_LIGHTNING_MATH_DATA` / `$SPARSE_LIGHTNING_COMMONSENSE_DATA`, else
`../shared/data/<family>_reasoning` beside the repository (where every config of this project looks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
FOLDERS = {"math": "math_reasoning", "commonsense": "commonsense_reasoning"}


def resolve_data_dir(family: str = "math", given: str | None = None) -> Path:
    folder = FOLDERS[family]
    env = os.environ.get(f"SPARSE_LIGHTNING_{family.upper()}_DATA")
    root = Path(given or env or SHARED_DATA / folder).expanduser()
    if not (root / "dataset").is_dir() and (root / folder / "dataset").is_dir():
        root = root / folder  # the shared data folder, which holds both families
    return root


def load(dataset: str, family: str = "math", data_dir: str | None = None, **_: Any):
    """lm-eval `custom_dataset`: a DatasetDict with one `test` split of {instruction, input, answer, dataset}."""
    import datasets

    from sparse_lightning.eval import normalize_answer

    from datamodules.reasoning import TEST_FILE_NAMES

    folder = resolve_data_dir(family, data_dir) / "dataset" / dataset
    path = next((folder / name for name in TEST_FILE_NAMES if (folder / name).is_file()), folder / TEST_FILE_NAMES[0])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; point --data_dir (or $SPARSE_LIGHTNING_{family.upper()}_DATA) "
                                f"at the {FOLDERS[family]} folder of shared/data (it holds dataset/<name>/test.json)")
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
