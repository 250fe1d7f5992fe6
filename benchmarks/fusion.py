"""Fusing deltas: a math delta and a commonsense delta on one base, each alone and summed, on the same test subsets.

One base model stays in memory; `MultiDelta` loads both deltas, fuses them (the sum; entries both changed are added
and counted) and switches which one is merged between evaluations, each a `sparse-lightning evaluate` run in memory
(`evaluate_in_memory`, the shipped `sl_math_*` / `sl_commonsense_*` lm-eval tasks, greedy, the first `--limit`
examples of each). The question: does the fused delta keep each skill, and what does each delta do to the other's
task?  `benchmarks/fusion.sh` trains the two deltas and runs this.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fusion.py --delta math=runs/sift-math-issue12/delta \\
        --delta commonsense=runs/sift-commonsense-issue12/delta --tasks sl_math_addsub,sl_commonsense_boolq \\
        --limit 100 --output benchmarks/results/fusion.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparse_lightning.evaluate import evaluate_in_memory, load_model
from sparse_lightning.export import delta_base_model
from sparse_lightning.multi_delta import MultiDelta


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def accuracy(results: dict, task: str) -> float:
    return results["results"][task]["acc,none"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delta", action="append", required=True, metavar="NAME=DIR",
                        help="a delta (ours, S2FT, or a PEFT SHiRA/Super-Tuning adapter); give two or more")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. sl_math_addsub")
    parser.add_argument("--weights", action="append", default=[], metavar="W,W,...",
                        help="also a fused delta with these per-delta scales (repeatable; e.g. 0.5,0.5 averages)")
    parser.add_argument("--limit", type=int, default=100, help="the first N examples of each task")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", type=Path, required=True, help="a .md table; the .json beside it")
    args = parser.parse_args(argv)
    deltas = dict(item.split("=", 1) for item in args.delta)
    if len(deltas) < 2:
        raise SystemExit("--delta: give at least two NAME=DIR deltas to fuse")
    tasks = [t for t in args.tasks.split(",") if t]

    bases = {name: delta_base_model(Path(path)) for name, path in deltas.items()}
    if len(set(bases.values())) != 1:
        raise SystemExit(f"the deltas name different base models: {bases}")
    base_name = next(iter(bases.values()))
    model, tokenizer_dir, _ = load_model(base_name)
    multi = MultiDelta(model)
    for name, path in deltas.items():
        multi.load(name, path)
    weighted = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the overlap is reported in the table
        report = multi.fuse(list(deltas), "fused")
        for text in args.weights:
            scales = [float(w) for w in text.split(",")]
            weighted[f"fused x({', '.join(f'{w:g}' for w in scales)})"] = scales
            multi.fuse(list(deltas), list(weighted)[-1], weights=scales)

    rows = []
    for state in [None, *deltas, "fused", *weighted]:
        start_wall, start_cpu = time.perf_counter(), cpu_seconds()
        multi.activate(state)
        results = evaluate_in_memory(model, tokenizer_dir, tasks, limit=args.limit, batch_size=args.batch_size,
                                     device="cpu")
        row = {"model": state or "base", "accuracy": {t: accuracy(results, t) for t in tasks},
               "n": {t: results["n-samples"][t]["effective"] for t in tasks},
               "wall_s": time.perf_counter() - start_wall, "cpu_s": cpu_seconds() - start_cpu}
        rows.append(row)
        print(json.dumps(row), flush=True)
    multi.activate(None)

    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fusion.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    summary = {
        "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)",
        "base_model": base_name, "deltas": deltas, "tasks": tasks, "limit": args.limit,
        "weighted": weighted,
        "entries": {name: sum(multi.entries(name).values()) for name in [*deltas, "fused"]},
        "overlapping_entries": report.overlapping,
        "weights_with_overlap": sum(1 for count in report.overlaps.values() if count),
        "weights": len(report.entries), "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    args.output.write_text(markdown(summary))
    print(markdown(summary))


def markdown(s: dict) -> str:
    tasks = s["tasks"]
    names = list(s["deltas"])
    lines = [
        "# Fusing a math delta and a commonsense delta (issue 12)", "",
        f"Base {s['base_model']}; deltas {', '.join(f'`{n}` = {p}' for n, p in s['deltas'].items())}. "
        f"The first {s['limit']} examples of each task, greedy, scored by lm-eval on the model in memory "
        f"(`MultiDelta` switches the merged delta between evaluations). {s['date']}, {s['machine']}.", "",
        "```bash", s["command"], "```", "",
        "| model | " + " | ".join(tasks) + " | mean | CPU s |",
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    for row in s["rows"]:
        accs = [row["accuracy"][t] for t in tasks]
        lines.append(f"| {row['model']} | " + " | ".join(f"{a:.2f}" for a in accs)
                     + f" | {sum(accs) / len(accs):.3f} | {row['cpu_s']:.0f} |")
    entries = s["entries"]
    lines += ["", "Changed entries: " + ", ".join(f"{n} {entries[n]:,}" for n in names)
              + f"; fused {entries['fused']:,}: {s['overlapping_entries']:,} entries changed by both (their values "
              f"added) in {s['weights_with_overlap']} of {s['weights']} weights. `fused` is the plain sum; "
              "`fused x(w, ...)` scales each delta first (`MultiDelta.fuse(..., weights=...)`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
