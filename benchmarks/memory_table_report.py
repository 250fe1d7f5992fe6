"""The memory table: measured peaks per phase (benchmarks/memory_table.py) beside `sparse-lightning estimate`'s."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from sparse_lightning.memory_estimate import PHASES, Plan, estimate, load_config, model_shape

MIB = 2**20


def predictions(measured: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The predictor's estimate for every measured configuration: its model's config, dtype, tokens per batch, rank
    count and the budget its fragment set."""
    shapes: dict[str, Any] = {}
    out = {}
    for key, records in measured.items():
        method, ranks = key.split("/")
        first = records[0]
        if first["model"] not in shapes:
            config = load_config(first["model"])
            shapes[first["model"]] = config, model_shape(config)
        config, shape = shapes[first["model"]]
        plan = Plan(method, dtype=first["dtype"], gpus=int(ranks), batch_size=1, seq_len=first["tokens_per_batch"],
                    full_checkpoint=first.get("full_checkpoint", True), **first["budget"])
        predicted = estimate(config, plan, shape)
        # a CPU run holds the device's and the host's memory in one; a GPU run measures the device's alone
        one_memory = first["device"] == "cpu"
        out[key] = {**predicted.as_dict(), "compared": {p: predicted.on_one_memory(p) if one_memory
                                                        else predicted.phases[p] for p in PHASES}}
    return out


def cell(measured: int, predicted: int) -> str:
    return f"{measured / MIB:,.0f} / {predicted / MIB:,.0f} ({predicted / measured:.2f})"


def write_report(measured: dict[str, list[dict[str, Any]]], output: Path, command: str) -> None:
    """OUTPUT (markdown) and its .json: every rank's measurement, the predictions and their components."""
    predicted = predictions(measured)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    rows, errors = [], []
    for key, records in measured.items():
        method, ranks = key.split("/")
        estimate_ = predicted[key]
        # the rank with the highest peak of the phase (rank 0 gathers the checkpoint under FSDP2)
        phase_cells = []
        for phase in PHASES:
            peak = max(r["phases"][phase]["peak"] - r["baseline"] for r in records)
            phase_cells.append(cell(peak, estimate_["compared"][phase]))
            errors.append((estimate_["compared"][phase] / peak - 1, f"{method}/{ranks}/{phase}"))
        baseline = max(r["baseline"] for r in records)
        size = records[0].get("checkpoint_bytes", 0)
        rows.append(f"| {method} | {ranks} | {records[0]['trainable']:,} | {baseline / MIB:,.0f} | "
                    + " | ".join(phase_cells) + f" | {cell(size, estimate_['checkpoint_bytes'])} | "
                    f"{records[0].get('commit', '?')} |")
    worst = max(errors, key=lambda e: abs(e[0]))
    within = sum(abs(e) <= 0.15 for e, _ in errors)
    first = next(iter(measured.values()))[0]
    what = "host memory (RSS)" if first["device"] == "cpu" else "GPU memory (torch allocated)"
    lines = [
        f"# Peak {what} per phase, measured beside `sparse-lightning estimate` ({first['model']}, {first['dtype']}, "
        f"{first['device']}, {first['tokens_per_batch']} tokens per batch per rank)",
        "",
        f"Made by `{command}`; table written on commit {commit}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} "
        "UTC, each row measured on the commit it names (how it measures: the docstring of benchmarks/memory_table.py; "
        "what the predictor counts: sparse_lightning/memory_estimate.py).",
        "",
        "Each phase cell: **measured / predicted MiB (predicted / measured)**, the peak of the phase above the "
        "baseline, on the rank with the higher peak under FSDP2 (2 ranks, gloo, per rank). Baseline: the resident "
        "memory before the model is built (the Python / torch / Lightning / transformers runtime, tokenizer and "
        "data: the constant the predictor leaves out). Checkpoint: `trainer.save_checkpoint` after the fit, bytes "
        "on disk / predicted.",
        "",
        f"Predictor within 15% of the measurement in {within} of {len(errors)} cells; the largest error: "
        f"{worst[0]:+.0%} ({worst[1]}).",
        "",
        "| method | ranks | trainable | baseline MiB | " + " | ".join(PHASES) + " | checkpoint MiB | commit |",
        "|---|---:|---:|---:|" + "---:|" * (len(PHASES) + 1) + "---|",
        *rows,
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(json.dumps({"command": command, "commit": commit, "measured": measured,
                                                       "predicted": predicted}, indent=1))
    print("\n".join(lines))
