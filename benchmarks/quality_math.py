"""Quality benchmark, math half (issue 14): every method on SmolLM2-135M-Instruct, resumable.

Each run composes the shipped configs exactly as a user would,

    sparse-lightning fit --config configs/model/smollm2.yaml --config configs/task/math.yaml \
                         --config configs/method/smollm2/<method>.yaml

with the benchmark's test sets (AddSub, SingleEq, MultiArith, SVAMP: the first 200 of each, greedy) in place of the
task's, so `drop_train_overlap` leaves 1,258 of the 3,260 training records. The CLI's `--print_config` writes the
whole configuration into `benchmarks/results/quality/math_runs/<name>/quality_config.yaml`, which is then trained
(`fit`) or, for the untrained model, scored (`validate`). 200 steps of 8, one validation at the end, one seed; the
learning rates are the method configs' (untuned on math: no tuning budget is left after GLUE). A run costs ~1.5
core-hours, so `--methods` says which: the table holds the untrained model (`base`) and LoRA (the reference), SIFT,
S2FT (whose paper's headline is math) and SpIEL-AG (the best sparse method on GLUE), ~7 core-hours; full FT (the
costliest step, 1.6x LoRA's), the random mask and SpIEL-MA (the two weakest on GLUE) were left out of issue 14's
~4 core-hour budget. Runs, locks, code and result.json work as in quality.py (the same helpers; this tree's library
by default, `--code COMMIT` for another): kill the driver at any moment and start it again.

Usage:
    .venv/bin/python benchmarks/quality_math.py run --methods base,lora,sift,s2ft,spiel_ag \
        [--lock benchmarks/results/quality/.lock2]
    .venv/bin/python benchmarks/quality_math.py table        # -> benchmarks/results/quality/math.md|json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_run import (CLI, add_checkpointing, checkpoint_interval, child_env, measured, run_child,  # noqa: E402
                       save_record)
from quality import METHODS as GLUE_METHODS  # noqa: E402
from quality import OUT, REPO, code_snapshot, time_spent  # noqa: E402

RUNS = OUT / "math_runs"
DATA_DIR = (REPO.parent / "shared" / "data" / "math_reasoning").resolve()
EVAL_SETS = ["AddSub", "SingleEq", "MultiArith", "SVAMP"]
SEED = 42
# One SmolLM2 step of 8 costs ~20 CPU s at one thread, so a run is ~70 CPU min of training and ~20-30 of generation:
# all seven methods would be ~11 core-hours. "base" is the untrained model (validated, not trained).
METHODS = ("base", *GLUE_METHODS)
CHECKPOINT_EVERY = 25  # optimizer steps between the resume checkpoints (~8 CPU min; a run is 200)


def run_dir(method: str) -> Path:
    return RUNS / f"math-{method}-s{SEED}"


def compose(method: str, snapshot: Path | None) -> dict[str, Any]:
    """The CLI's own composition of the shipped configs (from the pinned code), with the benchmark's settings."""
    root = snapshot or REPO
    configs = ["configs/model/smollm2.yaml", "configs/task/math.yaml"]
    if method != "base":
        configs.append(f"configs/method/smollm2/{method}.yaml")
    command = [str(CLI), "fit", *[a for c in configs for a in ("--config", str(root / c))], "--print_config"]
    printed = subprocess.run(command, cwd=REPO, env=child_env(snapshot), check=True, capture_output=True, text=True)
    config = yaml.safe_load(printed.stdout)
    config["seed_everything"] = SEED
    config["trainer"].update(enable_checkpointing=False, enable_progress_bar=False)
    if method != "base":
        trainer = config["trainer"]
        every = checkpoint_interval(CHECKPOINT_EVERY, trainer["max_steps"], {trainer["val_check_interval"]})
        add_checkpointing(trainer, run_dir(method), every)
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(run_dir(method).relative_to(REPO)), "name": "",
                                                 "version": ""}}
    data = config["data"]["init_args"]
    data.update(data_dir=str(DATA_DIR), eval_datasets=EVAL_SETS)
    return config


def run_method(method: str, lock_path: Path, driver_command: str, code: str) -> dict[str, Any] | None:
    directory = run_dir(method)
    if (directory / "result.json").exists():
        return None
    snapshot, commit = code_snapshot(code)
    config_path = directory / "quality_config.yaml"
    stage = "validate" if method == "base" else "fit"
    header = (f"# issue 14 quality benchmark (math): {directory.name}\n# written by: {driver_command}\n"
              f"# library code: {commit}\n"
              f"# run: OMP_NUM_THREADS=1 .venv/bin/sparse-lightning {stage} --config {config_path.relative_to(REPO)}\n")

    def write_config() -> None:
        config_path.write_text(header + yaml.safe_dump(compose(method, snapshot), sort_keys=False))

    command = [str(CLI), stage, "--config", str(config_path)]
    outcome = run_child(directory.name, directory, command, child_env(snapshot), lock_path, commit, write_config)
    if outcome is None:
        return None
    record = {"name": directory.name, "task": "math", "method": method, "seed": SEED, "eval_sets": EVAL_SETS,
              "stage": stage, **measured(directory, outcome, command), "code_commit": commit,
              "driver_command": driver_command}
    return save_record(directory, record)


def make_table(table_command: str) -> list[Path]:
    results = {r["method"]: r for r in (json.loads(p.read_text()) for p in sorted(RUNS.glob("*/result.json")))}
    if not results:
        return []
    cpu = sum(r["cpu_seconds"] for r in results.values())
    columns = [f"{name}/accuracy" for name in EVAL_SETS]
    lines = [
        "# SmolLM2 math with the shipped defaults (issue 14)", "",
        "SmolLM2-135M-Instruct, `configs/model/smollm2.yaml` + `configs/task/math.yaml` + "
        "`configs/method/smollm2/<method>.yaml` (learning rates as shipped, not tuned on math), 200 steps of 8 on the "
        "1,258 training records left after dropping every question of the four test sets, seed 42. Accuracy x 100 "
        "on the first 200 of each test set, greedy, up to 160 new tokens, answer extracted from the reply. "
        f"{len(results)} runs, {cpu / 3600:.2f} core-hours (one thread each).", "",
        "```bash", f"python benchmarks/quality_math.py run --methods {','.join(m for m in METHODS if m in results)}",
        table_command, "```", "",
        f"Seed: {SEED} ({len(results)} run{'s' if len(results) != 1 else ''}, {time_spent(results.values())}).", "",
        *([f"Not run: {', '.join(missing)} (issue 14 gives the math table ~4 core-hours; GLUE's three seeds came "
           "first).", ""] if (missing := [m for m in METHODS if m not in results]) else []),
        "| method | trainable | lr | " + " | ".join(EVAL_SETS)
        + " | mean | vs LoRA | vs full | held-out loss | CPU min |",
        "|---|---:|---:|" + "---:|" * (len(EVAL_SETS) + 5),
    ]
    means = {m: sum(r["final"].get(c, 0.0) for c in columns) / len(columns) for m, r in results.items()}
    for method in [m for m in METHODS if m in results]:
        r = results[method]
        config = yaml.safe_load((run_dir(method) / "quality_config.yaml").read_text())
        lr = config["model"]["init_args"]["optimizer"]["init_args"]["lr"] if method != "base" else None
        gaps = [f"{100 * (means[method] - means[ref]):+.1f}" if ref in means else "-" for ref in ("lora", "full")]
        loss = r["final"].get("heldout/loss")
        trainable = "-" if method == "base" else f"{r['trainable_params']:,}"
        lines.append(f"| {method} | {trainable} | {'-' if lr is None else f'{lr:g}'} | "
                     + " | ".join(f"{100 * r['final'].get(c, float('nan')):.1f}" for c in columns)
                     + f" | {100 * means[method]:.1f} | " + " | ".join(gaps)
                     + f" | {'-' if loss is None else f'{loss:.3f}'} | {r['cpu_seconds'] / 60:.0f} |")
    md = OUT / "math.md"
    md.write_text("\n".join(lines) + "\n")
    js = OUT / "math.json"
    js.write_text(json.dumps({"command": table_command, "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "eval_sets": EVAL_SETS, "runs": results}, indent=1))
    return [md, js]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["run", "table"])
    parser.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)} (needed to run)")
    parser.add_argument("--lock", type=Path, default=OUT / ".lock", help="one training job at a time per lock")
    parser.add_argument("--code", default="worktree", help="library code to train: 'worktree' (default) or a commit")
    args = parser.parse_args(argv)
    command = "python benchmarks/quality_math.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.mode == "table":
        for path in make_table(command):
            print(f"wrote {path.relative_to(REPO)}")
        return
    if not args.methods:
        raise SystemExit("say which methods to run: --methods base,lora,... (a run costs ~1.5 core-hours)")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    RUNS.mkdir(parents=True, exist_ok=True)
    for method in methods:
        run_method(method, args.lock, command, args.code)


if __name__ == "__main__":
    main()
