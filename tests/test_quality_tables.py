"""benchmarks/quality.py's GLUE summary: LoRA at the sparse count is its own row and its own reference column, the
gaps are means over the tasks every row has, and the matched plan really trains LoRA r=1 with the pooler."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
quality = pytest.importorskip("quality")


def result(method: str, task: str, seed: int, value: float, tag: str = "chosen", trainable: int = 1000) -> dict:
    main = quality.TASKS[task].main
    return {"method": method, "task": task, "seed": seed, "tag": tag, "final": {main: value},
            "trainable_params": trainable, "cpu_seconds": 60.0, "wall_seconds": 90.0}


def test_matched_lora_is_a_row_and_a_reference() -> None:
    results = [result("full", t, 42, 0.90) for t in ("mrpc", "rte")]
    results += [result("lora", t, 42, 0.80) for t in ("mrpc", "rte")]
    results += [result("lora", t, 42, 0.70, tag="matched", trainable=190_082) for t in ("mrpc", "rte")]
    results += [result("sift", "mrpc", s, v) for s, v in ((42, 0.74), (43, 0.76))] + [result("sift", "rte", 42, 0.75)]
    table = quality.glue_summary(results, "python benchmarks/quality.py table")
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header.endswith("| vs LoRA | vs LoRA r=1 | vs full |")
    main_table = table.split(header)[1].split("\n\n")[0].splitlines()[2:]
    rows = {line.split(" | ")[0][2:]: line for line in main_table}
    assert rows["lora_matched"].startswith("| lora_matched | 190,082 | 70.0 | 70.0 | 70.0 | -10.0 | +0.0 | -20.0 |")
    assert rows["sift"].endswith("| 75.0 ± 1.4 | 75.0 | 75.0 | -5.0 | +5.0 | -15.0 |")
    assert "glue-lora-matched" in table
    assert "(9 runs, 0.15 core-hours; wall time summed over runs 0.23 h," in table


def test_glue_table_takes_only_the_tables_schedule() -> None:
    plain, longer = result("sift", "cola", 44, 0.05), result("sift", "cola", 44, 0.2)
    tuned = result("sift", "cola", 44, 0.1, tag="lcount")
    longer["max_steps"] = 600
    assert quality.glue_results([plain, longer, tuned]) == [plain]


def test_lora_ranks_plan_gives_rows_r8_and_r16() -> None:
    specs = quality.plan_runs("glue-lora-ranks")
    assert len(specs) == 30 and {s.tag for s in specs} == {"r8", "r16"} and specs[0].task == "cola"
    lora = quality.build_config(specs[1])["model"]["init_args"]["lora"]
    assert (lora["r"], lora["alpha"], lora["modules_to_save"]) == (16, 32, ["classifier", "pooler"])
    rows = quality.glue_results([result("lora", "cola", 42, 0.3, tag="r16"), result("lora", "cola", 42, 0.1, tag="x")])
    assert [quality.glue_row(r) for r in rows] == ["lora_r16"]
    # a rank under way (CoLA only) is a row without a mean; it does not shrink the others' mean to CoLA
    results = [result(m, t, 42, v) for m, v in (("full", 0.9), ("lora", 0.8)) for t in ("mrpc", "cola")]
    table = quality.glue_summary(results + [result("lora", "cola", 42, 0.5, tag="r16")], "table")
    assert "| lora | 1000 | 80.0 | 80.0 | 80.0 | +0.0 | -10.0 |" in table.replace("1,000", "1000")
    assert "| lora_r16 | 1000 | - | 50.0 | - | - | - |" in table.replace("1,000", "1000")


def test_matched_plan_trains_rank_one_lora_with_the_pooler() -> None:
    specs = quality.plan_runs("glue-lora-matched")
    assert len(specs) == 15 and {s.method for s in specs} == {"lora"} and {s.tag for s in specs} == {"matched"}
    lora = quality.build_config(specs[0])["model"]["init_args"]["lora"]
    assert (lora["r"], lora["alpha"]) == (1, 2)
    assert lora["modules_to_save"] == ["classifier", "pooler"]
