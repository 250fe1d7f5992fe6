"""Quality benchmark (issue 14): every method against LoRA and full fine-tuning on GLUE, resumable.

For each (task, method, seed, overrides) the driver writes one self-contained YAML config into
`benchmarks/results/quality/runs/<name>/quality_config.yaml`: the benchmark's schedule and task, the method's
shipped MiniLM recipe `configs/method/minilm/<method>.yaml` stacked on it as a later `--config` would be, the run's
seed and learning rate, then the run's overrides (named by its tag; "chosen" = none). It runs the real CLI

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/sparse-lightning fit --config <that yaml>

as a child process with this tree's library first on PYTHONPATH (`--code COMMIT` trains a commit instead; log in
`train.log`, CSVLogger metrics in `metrics.csv`), and writes `result.json`: the metrics at every validation, the
final ones, the trainable count the module printed, the child's CPU time (user + sys, every attempt), the wall time
and the code's id. A run whose `result.json` exists is skipped (so is a default recipe already trained under another
name), so the driver can be killed at any moment and started again; an interrupted run resumes from its last checkpoint (every ~40 steps) with the same code
(benchmarks/child_run.py). Only one training job runs at a time per lock file (`--lock`, default
`benchmarks/results/quality/.lock`); the lock is inherited by the child, so it stays held even if the driver is
killed while the child runs.

Usage:
    .venv/bin/python benchmarks/quality.py run --plan glue                    # 7 methods x 5 tasks x 3 seeds
    .venv/bin/python benchmarks/quality.py run --tasks mrpc,rte --methods lora,sift --seeds 42,43,44 \
        [--lr sift=2e-3 --lr lora=1e-3] [--steps 300] [--tag NAME --set dotted.key=value ...]
    .venv/bin/python benchmarks/quality.py list --plan glue                   # what is done / queued
    .venv/bin/python benchmarks/quality.py config --tasks rte --methods s2ft  # print the config a run would use
    .venv/bin/python benchmarks/quality.py table                              # -> benchmarks/results/quality/*.md|json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import inspect
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from child_run import CLI, add_checkpointing, checkpoint_interval, child_env, measured, run_child, save_record

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the registry of this tree, whatever the venv's editable install points at
from sparse_lightning import registry  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "quality"
RUNS = OUT / "runs"
DATA_DIR = (REPO.parent / "shared" / "data" / "glue").resolve()

# The library under test: the working tree by default (`--code worktree`); `--code COMMIT` trains that commit instead,
# extracted with `git archive` into SNAPSHOTS and put first on PYTHONPATH (the tables' older runs were pinned that
# way: each result.json records its commit). The recipes are always this tree's configs/method/minilm/ fragments.
SNAPSHOTS = Path(os.environ.get("QUALITY_SNAPSHOTS", "/tmp/sparse_lightning_quality"))

MODEL = "all-MiniLM-L6-v2"
#: The recipes: configs/method/<FRAGMENTS>/<method>.yaml, the shipped MiniLM defaults chosen on the MRPC sweep
#: (mrpc.md): every run is one of them plus the run's overrides (a tag names them; "chosen" has none).
FRAGMENTS = "minilm"

# ---------------------------------------------------------------------------------------------------------------------
# Schedule (the same for every method and task)

SCHEDULE = {
    "max_steps": 300,
    "batch_size": 32,
    "val_every": 100,        # optimizer steps (= batches, no accumulation); the whole dev set each time
    "warmup_ratio": 0.06,
    "lr_schedule": "linear",
    "dropout": 0.0,
}
CHECKPOINT_EVERY = 40  # optimizer steps between the resume checkpoints (~1 min; off the validation steps)

# ---------------------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    name: str
    max_length: int
    metrics: tuple[str, ...]        # reported, the first is the headline metric
    main: str


TASKS: dict[str, Task] = {
    "mrpc": Task("mrpc", 128, ("accuracy", "f1"), "accuracy"),
    "rte": Task("rte", 128, ("accuracy",), "accuracy"),
    "stsb": Task("stsb", 128, ("pearson", "spearman"), "pearson"),
    "sst2": Task("sst2", 64, ("accuracy",), "accuracy"),
    "cola": Task("cola", 64, ("matthews",), "matthews"),
}

# ---------------------------------------------------------------------------------------------------------------------
# Methods: the registry's, baselines first (the tables' order); each recipe is its shipped fragment

METHODS = (*registry.names(sparse=False)[::-1], *registry.names(sparse=True))
# LoRA at the sparse methods' count (r=1) and at its own larger ranks (issue 28: the reference is LoRA's best
# setting), alpha = 2r as chosen, pooler trained as in the fragment: overrides of the LoRA fragment, named by tag.
LORA_MATCHED = {"model.init_args.lora.r": 1, "model.init_args.lora.alpha": 2}
LORA_RANKS = {f"r{r}": {"model.init_args.lora.r": r, "model.init_args.lora.alpha": 2 * r} for r in (8, 16)}


def fragment(method: str) -> dict[str, Any]:
    """The shipped recipe of `method` for MiniLM (configs/method/minilm/<method>.yaml), as parsed YAML."""
    return yaml.safe_load(registry.method(method).fragment(FRAGMENTS).read_text(encoding="utf-8"))


def fragment_lr(method: str) -> float:
    return float(fragment(method)["model"]["init_args"]["optimizer"]["init_args"]["lr"])


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` stacked on `base` as a later `--config` is: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def seeded(callbacks: list[dict[str, Any]], method: str, seed: int) -> list[dict[str, Any]]:
    """Every seed draws its own random choices: a method callback that takes a `seed` (SpIEL's random start, the
    random mask, S2FT's random selection) gets the run's."""
    callback = registry.method(method).callback
    if callback is None or "seed" not in inspect.signature(callback).parameters:
        return callbacks
    return [{**c, "init_args": {**c.get("init_args", {}), "seed": seed}} for c in callbacks]


def recipe_overrides(record: dict[str, Any]) -> dict[str, Any]:
    """A result's overrides that its method's fragment does not already say. Runs before the fragments were read
    spelt their recipe as overrides of an older base (e.g. SIFT's calibration_batches 8); the same recipe now has
    none, so both group as one in the tables."""
    recipe = fragment(record["method"])
    missing = object()

    def says(key: str, value: Any) -> bool:
        node: Any = recipe
        for part in key.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                node = missing
                break
        return node is not missing and node == value

    return {key: value for key, value in record.get("overrides", {}).items() if not says(key, value)}


# ---------------------------------------------------------------------------------------------------------------------
# One run


@dataclass
class RunSpec:
    task: str
    method: str
    seed: int
    lr: float | None = None                                  # None: the method's default
    steps: int | None = None                                 # None: SCHEDULE["max_steps"]
    tag: str = ""                                            # names an override set
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys -> values
    diagnose: bool = False                                   # add TrainingDiagnostics (quality_diagnostics.py)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else fragment_lr(self.method)

    @property
    def max_steps(self) -> int:
        return self.steps or SCHEDULE["max_steps"]

    @property
    def name(self) -> str:
        parts = [self.task, self.method, f"lr{self.learning_rate:g}"]
        if self.max_steps != SCHEDULE["max_steps"]:
            parts.append(f"steps{self.max_steps}")
        if self.tag:
            parts.append(self.tag)
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    @property
    def run_dir(self) -> Path:
        return RUNS / self.name


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    node = config
    *path, last = key.split(".")
    for part in path:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _rel(path: Path) -> str:
    """Paths in the config are relative to the repository root (the child runs there)."""
    return os.path.relpath(Path(path).resolve(), REPO)


def build_config(spec: RunSpec, data_dir: Path = DATA_DIR) -> dict[str, Any]:
    """The run's whole config: the benchmark's schedule and task, the method's shipped fragment stacked on it (as a
    later `--config`), the run's seed and learning rate, then its overrides."""
    task = TASKS[spec.task]
    run_dir = spec.run_dir
    config: dict[str, Any] = {
        "seed_everything": spec.seed,
        "trainer": {
            "max_steps": spec.max_steps,
            "val_check_interval": SCHEDULE["val_every"],
            "check_val_every_n_epoch": None,   # val_check_interval counts optimizer steps across epochs
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 10,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": _rel(run_dir), "name": "", "version": ""}},
        },
        "model": {
            "class_path": "sparse_lightning.modules.SequenceClassificationModule",
            "init_args": {
                "model_name_or_path": MODEL,
                "warmup_ratio": SCHEDULE["warmup_ratio"],
                "lr_schedule": SCHEDULE["lr_schedule"],
                "model_kwargs": {"hidden_dropout_prob": SCHEDULE["dropout"],
                                 "attention_probs_dropout_prob": SCHEDULE["dropout"]},
                "optimizer": {"class_path": registry.ADAMW, "init_args": {"weight_decay": 0.0}},
            },
        },
        "data": {
            "class_path": "datamodules.glue.GLUEDataModule",
            "init_args": {
                "task": task.name,
                "tokenizer_name_or_path": MODEL,
                "data_dir": _rel(data_dir),
                "batch_size": SCHEDULE["batch_size"],
                "max_length": task.max_length,
                "seed": spec.seed,
            },
        },
    }
    config = merged(config, fragment(spec.method))
    config["trainer"]["callbacks"] = seeded(config["trainer"].get("callbacks", []), spec.method, spec.seed)
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = spec.learning_rate
    if spec.diagnose:
        config["trainer"]["callbacks"].append({"class_path": "benchmarks.quality_diagnostics.TrainingDiagnostics",
                                               "init_args": {"out": _rel(run_dir)}})
    every = checkpoint_interval(CHECKPOINT_EVERY, spec.max_steps,
                                set(range(SCHEDULE["val_every"], spec.max_steps + 1, SCHEDULE["val_every"])))
    add_checkpointing(config["trainer"], run_dir, every)
    for key, value in spec.overrides.items():
        _set_dotted(config, key, value)
    return config


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def worktree_code() -> str:
    """This tree's library as an id a run records (and resumes only with): the last commit that changed the library
    (commits to docs, tests or benchmarks leave it, so a run resumes across them), plus a hash of the uncommitted
    changes to the library, if any."""
    library = ("sparse_lightning", "datamodules")
    changes = _git("diff", "HEAD", "--", *library) + _git("ls-files", "--others", "--exclude-standard", "--", *library)
    commit = _git("log", "-1", "--format=%H", "--", *library)
    return f"{commit}+{hashlib.sha1(changes.encode()).hexdigest()[:10]}" if changes else commit


def code_snapshot(code: str) -> tuple[Path, str]:
    """(directory to put first on PYTHONPATH, the code's id): this tree for 'worktree', else the commit's
    `git archive` under SNAPSHOTS."""
    if code == "worktree":
        return REPO, worktree_code()
    commit = _git("rev-parse", "--verify", f"{code}^{{commit}}")
    target = SNAPSHOTS / commit
    if not (target / ".complete").exists():
        partial = SNAPSHOTS / f".{commit}.{os.getpid()}"
        partial.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
        (partial / ".complete").write_text(commit + "\n")
        try:
            partial.rename(target)
        except OSError:  # another driver made it first
            subprocess.run(["rm", "-rf", str(partial)], check=True)
    return target, commit


def run_one(spec: RunSpec, lock_path: Path, data_dir: Path, driver_command: str, code: str) -> dict[str, Any] | None:
    run_dir = spec.run_dir
    result_path = run_dir / "result.json"
    if result_path.exists():
        return None
    snapshot, commit = code_snapshot(code)
    config_path = run_dir / "quality_config.yaml"
    header = (f"# issue 14 quality benchmark: {spec.name}\n"
              f"# written by: {driver_command}\n"
              f"# library code: {commit} (PYTHONPATH={snapshot})\n"
              f"# run: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/sparse-lightning fit --config {config_path.relative_to(REPO)}\n")

    def write_config() -> None:
        config_path.write_text(header + yaml.safe_dump(build_config(spec, data_dir), sort_keys=False))

    command = [str(CLI), "fit", "--config", str(config_path)]
    outcome = run_child(spec.name, run_dir, command, child_env(snapshot), lock_path, commit, write_config)
    if outcome is None:
        return None
    record = {
        "name": spec.name, "task": spec.task, "method": spec.method, "seed": spec.seed, "lr": spec.learning_rate,
        "max_steps": spec.max_steps, "tag": spec.tag, "overrides": spec.overrides,
        "schedule": {**SCHEDULE, "max_steps": spec.max_steps, "max_length": TASKS[spec.task].max_length},
        **measured(run_dir, outcome, command), "code_commit": commit, "driver_command": driver_command,
    }
    return save_record(run_dir, record)


# ---------------------------------------------------------------------------------------------------------------------
# Plans


#: The MRPC tuning plans ran (all done) with the recipes of their time, written in this script as overrides of an older
#: base: a rerun could not rebuild them. Their runs stay in runs/ (each with its whole config).
RETIRED_PLANS = {"mrpc-sweep": "7875a9a", "mrpc-followup": "7875a9a", "mrpc-followup2": "7875a9a",
                 "glue-candidates": "3aebd3e"}  # issue 28: its SIFT and SpIEL-AG recipes are the defaults now
#: The seeds every plan trains; a cell with more (RTE, issue 28: its 277 dev pairs make one seed's SE ~3 points) says so.
PLAN_SEEDS = (42, 43, 44)
PLANS = ("glue", "glue-lora-matched", "glue-lora-ranks", "cola-long", "mrpc-long", "cola-global")
#: Issue 28, H5: SIFT's budget given to the largest |gradient| entries of all targets together (tag "global").
SIFT_GLOBAL = {"trainer.callbacks.0.init_args.allocation": "global"}


def plan_runs(name: str) -> list[RunSpec]:
    if name == "glue":
        # The chosen defaults on every task, seed by seed (a whole seed is a complete table); MRPC last in each seed,
        # since the sweep already ran its configurations (at an older commit).
        order = ["sst2", "stsb", "rte", "cola", "mrpc"]
        return [RunSpec(task, method, seed, tag="chosen") for seed in PLAN_SEEDS for task in order
                for method in METHODS]
    if name == "glue-lora-matched":
        # LoRA at the sparse methods' trainable count and budget split: r=1 (alpha 2, the chosen alpha/r) in the
        # encoder, pooler and classifier dense: 41,472 + 148,610 = 190,082 trainable (the sparse rows: 201,722).
        return [RunSpec(task, "lora", seed, tag="matched", overrides=dict(LORA_MATCHED))
                for seed in PLAN_SEEDS for task in ["sst2", "stsb", "rte", "cola", "mrpc"]]
    if name == "glue-lora-ranks":
        # LoRA r=8 and r=16 (tags r8, r16), the chosen lr and alpha/r, pooler trained, on the per-task schedule
        # (TASK_STEPS); seed by seed, CoLA and MRPC first.
        return [RunSpec(task, "lora", seed, steps=TASK_STEPS.get(task), tag=tag, overrides=dict(extra))
                for seed in PLAN_SEEDS for task in ["cola", "mrpc", "sst2", "stsb", "rte"]
                for tag, extra in LORA_RANKS.items()]
    if name == "cola-long":
        # Issue 28, H1 (300 steps is too short on CoLA): every method's chosen recipe but the random mask's, and LoRA
        # r=16, at 600 steps, seed by seed (a whole seed is a complete row set).
        methods = [m for m in METHODS if m != "random_mask"]
        return [spec for seed in PLAN_SEEDS for spec in
                [RunSpec("cola", m, seed, tag="chosen", steps=600) for m in methods]
                + [RunSpec("cola", "lora", seed, tag="r16", steps=600, overrides=dict(LORA_RANKS["r16"]))]]
    if name == "mrpc-long":
        # Issue 28: does 600 steps help on the other tuning task as on CoLA? The methods in question first (LoRA's
        # default, SIFT, SpIEL-AG), then the rest, full FT last, seed by seed.
        methods = [m for m in METHODS if m not in ("full", "random_mask")] + ["full"]
        return [RunSpec("mrpc", m, seed, tag="chosen", steps=600) for seed in PLAN_SEEDS for m in methods]
    if name == "cola-global":
        # Issue 28, H5 (the gradient sits in the top layers and FFN out-projections, so a per-weight density spreads
        # SIFT's budget thin): the SIFT recipe with a global top-k, CoLA at 600 steps as plan cola-long, seed by seed.
        return [RunSpec("cola", "sift", seed, tag="global", steps=600, overrides=dict(SIFT_GLOBAL))
                for seed in PLAN_SEEDS]
    if name in RETIRED_PLANS:
        raise SystemExit(f"plan {name} is done and retired: it ran with the recipes of commit {RETIRED_PLANS[name]} "
                         f"(git show {RETIRED_PLANS[name]}:benchmarks/quality.py); its runs are in {_rel(RUNS)}")
    raise SystemExit(f"unknown plan {name!r}; known: {', '.join(PLANS)}")


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def specs_from_args(args: argparse.Namespace) -> list[RunSpec]:
    if args.plan:
        specs = plan_runs(args.plan)
        if args.tasks:  # a plan restricted to some tasks (e.g. a second driver on another core)
            specs = [s for s in specs if s.task in args.tasks.split(",")]
    else:
        tasks = (args.tasks or "mrpc").split(",")
        methods = args.methods.split(",")
        seeds = [int(s) for s in args.seeds.split(",")]
        lrs: dict[str, list[float]] = {}
        for item in args.lr or []:
            method, _, values = item.partition("=")
            lrs[method] = [float(v) for v in values.split(",")]
        specs = [RunSpec(task, method, seed, lr, tag="chosen") for seed in seeds for task in tasks
                 for method in methods for lr in lrs.get(method, [None])]
    if args.set and not args.tag:
        raise SystemExit("--set changes the recipe: name the change with --tag NAME (run names carry it)")
    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    for spec in specs:
        if args.steps:
            spec.steps = args.steps
        if args.tag:
            spec.tag = args.tag
        spec.diagnose = args.diagnose
        spec.overrides.update(overrides)
    for spec in specs:
        if spec.task not in TASKS:
            raise SystemExit(f"unknown task {spec.task!r}; known: {', '.join(TASKS)}")
        if spec.method not in METHODS:
            raise SystemExit(f"unknown method {spec.method!r}; known: {', '.join(METHODS)}")
    return specs


# ---------------------------------------------------------------------------------------------------------------------
# Tables


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def method_recipe(config: dict[str, Any]) -> dict[str, Any]:
    """What a run's config says about its method: the module's arguments (optimizer and rate, LoRA) and the library's
    method callbacks with every argument resolved (an argument left out and one set to its default are the same
    recipe), without their seed; the benchmark's schedule, logger and checkpointing are not part of it."""
    callbacks = []
    for c in config["trainer"].get("callbacks", []):
        if c["class_path"].startswith("sparse_lightning."):
            module, _, name = c["class_path"].rpartition(".")
            parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
            arguments = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
            arguments.update(c.get("init_args", {}))
            arguments.pop("seed", None)
            callbacks.append({"class_path": c["class_path"], "init_args": arguments})
    return {"model": config["model"]["init_args"], "callbacks": callbacks}


def load_results() -> list[dict[str, Any]]:
    """Every finished run's result.json, with the method recipe its stored config trained ("recipe")."""
    results = []
    for path in sorted(RUNS.glob("*/result.json")):
        config = yaml.safe_load((path.parent / "quality_config.yaml").read_text(encoding="utf-8"))
        results.append({**json.loads(path.read_text()), "recipe": method_recipe(config)})
    return results


def at_default(result: dict[str, Any]) -> bool:
    """Whether a run trained its method's shipped recipe as it is now (the config plan `glue` would write today),
    whatever its tag: a recipe tried under a tag and then made the default is the default's run, and a run tagged
    "chosen" under an older default is not."""
    return result["recipe"] == default_recipe(result["task"], result["method"], result.get("max_steps"))


@functools.cache
def default_recipe(task: str, method: str, steps: int | None) -> dict[str, Any]:
    return method_recipe(build_config(RunSpec(task, method, 0, steps=steps)))


def make_tables(table_command: str) -> list[Path]:
    results = load_results()
    written = []
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_task.setdefault(r["task"], []).append(r)
    summary: dict[str, Any] = {"command": table_command, "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "schedule": SCHEDULE, "tasks": {}}
    for task_name, rows in sorted(by_task.items()):
        task = TASKS[task_name]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in rows:
            key = (r["method"], r["lr"], r["max_steps"], r.get("tag", ""), json.dumps(recipe_overrides(r), sort_keys=True))
            groups.setdefault(key, []).append(r)
        order = {m: i for i, m in enumerate(METHODS)}
        keys = sorted(groups, key=lambda k: (order.get(k[0], 99), k[1], k[2], k[3], k[4]))
        cpu = sum(r["cpu_seconds"] for r in rows)
        wall = sum(r["wall_seconds"] for r in rows)
        drivers = sorted({r["driver_command"] for r in rows})
        steps_seen = sorted({v["step"] for r in rows for v in r["validations"]})
        entries = []
        lines = [
            f"# {task_name.upper()}: quality benchmark (issue 14)",
            "",
            f"all-MiniLM-L6-v2, GLUE {task_name} dev set (whole), batch {SCHEDULE['batch_size']}, max_length "
            f"{task.max_length}, AdamW (SM3 for SpIEL-MA), warmup {SCHEDULE['warmup_ratio']:.0%}, linear decay, "
            f"dropout off, validation every {SCHEDULE['val_every']} steps; one thread per run (OMP_NUM_THREADS=1), "
            f"one run at a time on a 2-core CPU. Final = the last validation (no best-checkpoint selection).",
            "",
            f"Runs: {len(rows)}; CPU time {cpu / 3600:.2f} core-hours (child getrusage, user+sys), "
            f"wall {wall / 3600:.2f} h. Library code: "
            + ", ".join(sorted({str(r.get("code_commit", "?"))[:10] for r in rows})) + ".",
            "",
            "Made by:",
            "",
            "```bash",
            *drivers,
            table_command,
            "```",
            "",
        ]
        metric_cols = " | ".join(f"{m} (final)" for m in task.metrics)
        lines += [f"| method | lr | steps | tag | trainable | seeds | {metric_cols} | {task.main} at each validation "
                  f"| CPU min/run |",
                  "|---|---:|---:|---|---:|---|" + "---:|" * len(task.metrics) + "---|---:|"]
        for key in keys:
            group = sorted(groups[key], key=lambda r: r["seed"])
            method, lr, steps, tag, _ = key
            overrides = json.dumps(group[0].get("overrides", {}), sort_keys=True)  # as its runs recorded them
            trainable = sorted({r["trainable_params"] for r in group if r["trainable_params"]})
            finals = {m: [r["final"][m] for r in group if m in r["final"]] for m in task.metrics}
            per_step: dict[int, list[float]] = {}
            per_step_all: dict[int, dict[str, list[float]]] = {}
            for r in group:
                for v in r["validations"]:
                    if task.main in v:
                        per_step.setdefault(v["step"], []).append(v[task.main])
                    for m in task.metrics:
                        if m in v:
                            per_step_all.setdefault(v["step"], {}).setdefault(m, []).append(v[m])
            curve = " / ".join(f"{statistics.fmean(per_step[s]):.3f}" for s in sorted(per_step))
            cpu_run = statistics.fmean(r["cpu_seconds"] for r in group) / 60
            tag_text = tag + (f" {overrides}" if overrides != "{}" else "")
            lines.append(
                f"| {method} | {lr:g} | {steps} | {tag_text} | {', '.join(f'{t:,}' for t in trainable)} | "
                f"{','.join(str(r['seed']) for r in group)} | "
                + " | ".join(_fmt(finals[m]) for m in task.metrics)
                + f" | {curve} | {cpu_run:.1f} |")
            entries.append({
                "method": method, "lr": lr, "max_steps": steps, "tag": tag, "overrides": json.loads(overrides),
                "trainable_params": trainable, "seeds": [r["seed"] for r in group],
                "final": {m: {"mean": statistics.fmean(finals[m]) if finals[m] else None,
                              "std": statistics.stdev(finals[m]) if len(finals[m]) > 1 else None,
                              "values": finals[m]} for m in task.metrics},
                "per_validation": {str(s): {m: statistics.fmean(v) for m, v in ms.items()}
                                   for s, ms in sorted(per_step_all.items())},
                "cpu_seconds": [r["cpu_seconds"] for r in group], "wall_seconds": [r["wall_seconds"] for r in group],
                "runs": [r["name"] for r in group],
            })
        lines += ["", f"Validation steps (as logged by Lightning): {', '.join(map(str, steps_seen))}.", ""]
        lines += ["Per run (every validation, all metrics):", "",
                  "| run | trainable | " + " | ".join(f"{m} @ each validation" for m in task.metrics)
                  + " | CPU s | wall s |",
                  "|---|---:|" + "---|" * len(task.metrics) + "---:|---:|"]
        for r in sorted(rows, key=lambda r: (order.get(r["method"], 99), r["lr"], r["seed"], r["name"])):
            cells = [" / ".join(f"{v[m]:.4f}" for v in r["validations"] if m in v) for m in task.metrics]
            lines.append(f"| {r['name']} | {r['trainable_params']:,} | " + " | ".join(cells)
                         + f" | {r['cpu_seconds']:.0f} | {r['wall_seconds']:.0f} |")
        md = OUT / f"{task_name}.md"
        md.write_text("\n".join(lines) + "\n")
        written.append(md)
        summary["tasks"][task_name] = {"runs": len(rows), "core_hours": cpu / 3600, "wall_hours": wall / 3600,
                                       "driver_commands": drivers, "metrics": list(task.metrics),
                                       "entries": entries}
    for name, task_steps in (("glue.md", None), ("glue_per_task_schedule.md", TASK_STEPS)):
        glue = glue_summary(glue_results(results, task_steps), table_command, task_steps)
        if glue:
            (OUT / name).write_text(glue)
            written.append(OUT / name)
    js = OUT / "quality.json"
    js.write_text(json.dumps(summary, indent=1))
    written.append(js)
    return written


def _mean_std(values: list[float]) -> str:
    """x100, one decimal; '± std' over seeds where there are several."""
    if not values:
        return "-"
    v = [100 * x for x in values]
    return f"{statistics.fmean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")


#: Issue 28's per-task schedule, the same for every method: CoLA's curves still climb at 300 steps and every method
#: gains at 600 (plan cola-long); MRPC overfits at 600 (dev loss 0.45 -> 0.83 for LoRA, plan mrpc-long), so the
#: other tasks keep the table's 300.
TASK_STEPS = {"cola": 600}


def glue_results(results: list[dict[str, Any]], task_steps: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The runs of the GLUE table on its schedule (`task_steps` gives some tasks another length): every method at its
    default now, its default before issue 28 changed it (tag "chosen", an older recipe), LoRA at the sparse count and
    at larger ranks. One run per row, task and seed: a recipe run twice under two names counts once."""
    steps = task_steps or {}
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: r.get("tag") != "chosen"):  # the plan's own run first, then a retagged one
        if (r.get("tag") in ("chosen", "matched", *LORA_RANKS) or at_default(r)) and \
                r.get("max_steps", SCHEDULE["max_steps"]) == steps.get(r["task"], SCHEDULE["max_steps"]):
            rows.setdefault((glue_row(r), r["task"], r["seed"]), r)
    return list(rows.values())


def glue_row(result: dict[str, Any]) -> str:
    """The GLUE table's row of a run: 'lora_matched' (LoRA at the sparse count), 'lora_r8' / 'lora_r16', its method
    (at its default now), or '<method>_before' (tagged "chosen" under an older default)."""
    tag = result.get("tag")
    if tag == "matched":
        return "lora_matched"
    if tag in LORA_RANKS:
        return f"lora_{tag}"
    return result["method"] if at_default(result) else f"{result['method']}_before"


GLUE_ROWS = (*registry.names(sparse=False)[::-1], *(f"lora_{tag}" for tag in LORA_RANKS), "lora_matched",
             *(row for m in registry.names(sparse=True) for row in (m, f"{m}_before")))
GLUE_REFERENCES = {"lora": "LoRA", "lora_matched": "LoRA r=1", "full": "full"}
LORA_ROWS = ("lora", *(f"lora_{tag}" for tag in LORA_RANKS))


def time_spent(results: Iterable[dict[str, Any]]) -> str:
    """CPU and wall time of a table's runs: both, since runs shared the two cores and wall alone overstates cost."""
    results = list(results)
    cpu, wall = (sum(r[key] for r in results) / 3600 for key in ("cpu_seconds", "wall_seconds"))
    return f"{cpu:.2f} core-hours; wall time summed over runs {wall:.2f} h, two at a time on a shared 2-core machine"


def glue_summary(results: list[dict[str, Any]], table_command: str, task_steps: dict[str, int] | None = None) -> str:
    """The GLUE table of the chosen defaults: per method and task the headline metric (mean +- std over seeds), the
    mean over the tasks every method has, the gaps to LoRA (r=5 and at the sparse count) and to full fine-tuning
    (points, x100); then the tasks' second metrics (MRPC F1, STS-B Spearman). `task_steps`: the tasks run longer."""
    if not results:
        return ""
    cell: dict[tuple[str, str, str], list[float]] = {}
    for r in results:
        for metric, value in r["final"].items():
            cell.setdefault((glue_row(r), r["task"], metric), []).append(value)
    tasks = [t for t in ("sst2", "mrpc", "stsb", "rte", "cola") if any(k[1] == t for k in cell)]
    methods = [m for m in GLUE_ROWS if any(k[0] == m for k in cell)]
    # the mean is over the tasks every row with all tasks has; a row still missing some (a plan under way) gets none
    whole = [m for m in methods if all((m, t, TASKS[t].main) in cell for t in tasks)] or methods
    complete = [t for t in tasks if all((m, t, TASKS[t].main) in cell for m in whole)]
    means = {m: statistics.fmean(statistics.fmean(cell[(m, t, TASKS[t].main)]) for t in complete)
             if complete and all((m, t, TASKS[t].main) in cell for t in complete) else None for m in methods}
    references = [ref for ref in GLUE_REFERENCES if ref in methods]
    # issue 28 measures against LoRA at its best rank: the LoRA row with the highest mean, once there is a choice
    ranked = [m for m in LORA_ROWS if means.get(m) is not None]
    best_lora = max(ranked, key=means.__getitem__) if len(ranked) > 1 else None
    labels = {**GLUE_REFERENCES, "best": f"LoRA's best ({best_lora})"}
    if best_lora:
        references.append("best")
    means["best"] = means.get(best_lora)
    trainable = {m: sorted({r["trainable_params"] for r in results if glue_row(r) == m and r["trainable_params"]})
                 for m in methods}
    seconds = [(t, m) for t in tasks for m in TASKS[t].metrics[1:]]
    cpu = sum(r["cpu_seconds"] for r in results)
    seeds = sorted({r["seed"] for r in results})
    longer = ", ".join(f"{task} {steps}" for task, steps in (task_steps or {}).items())
    retagged = sorted({(r["method"], r["tag"]) for r in results if r.get("tag") not in ("chosen", "matched", *LORA_RANKS)})
    schedule = f"{SCHEDULE['max_steps']} steps of {SCHEDULE['batch_size']}" + (
        f" ({longer} steps: a per-task schedule, the same for every method; issue 28)" if longer else "")
    lines = [
        "# GLUE with the chosen defaults (issue 14" + (", schedule per task: issue 28)" if longer else ")"), "",
        f"all-MiniLM-L6-v2, every method at its chosen default (its MiniLM method config, "
        f"`configs/method/minilm/<method>.yaml`), {schedule}, final dev metric x 100: "
        + ", ".join(f"{t} {TASKS[t].main}" for t in tasks)
        + f". Seeds so far: {', '.join(map(str, seeds))}; mean ± std over seeds where a cell has more than one. "
        f"{len(results)} runs, {cpu / 3600:.2f} core-hours (one thread each). Tuned on MRPC (issue 14) and MRPC "
        "and CoLA (issue 28); SST-2, STS-B and RTE check the choice. Trainable: with a 2-label classifier (STS-B's "
        "single output trains 385 fewer). `lora` is the chosen LoRA (r=5, pooler trained); `lora_matched` is LoRA "
        "at the sparse methods' count and split before issue 28 (r=1, alpha 2, pooler trained; plan "
        "`glue-lora-matched`)" + ("; `<method>_before` is a method's default before issue 28 changed it (its runs "
                                  "tagged chosen, an older recipe)" if any(m.endswith("_before") for m in methods)
                                  else "") + ".", "",
        "```bash", "python benchmarks/quality.py run --plan glue",
        *(["python benchmarks/quality.py run --plan cola-long"] if longer else []),
        *(["python benchmarks/quality.py run --plan glue-lora-matched"] if "lora_matched" in methods else []),
        *(["python benchmarks/quality.py run --plan glue-lora-ranks"] if any(m.startswith("lora_r") for m in methods)
          else []),
        table_command, "```", "",
        *(["Runs of today's defaults made under a tag by an earlier plan (the same configs plan `glue` writes now): "
           + ", ".join(f"{m} ({t})" for m, t in retagged) + ".", ""] if retagged else []),
        f"Seeds: {', '.join(map(str, seeds))} ({len(results)} run{'s' if len(results) != 1 else ''}, "
        f"{time_spent(results)}).", "",
        "| method | trainable | " + " | ".join(tasks) + f" | mean ({', '.join(complete) or '-'}) | "
        + " | ".join(f"vs {labels[ref]}" for ref in references) + " |",
        "|---|---:|" + "---:|" * (len(tasks) + 1 + len(references)),
    ]
    for m in methods:
        mean = means[m]
        gaps = [f"{100 * (mean - means[ref]):+.1f}" if mean is not None and means.get(ref) is not None else "-"
                for ref in references]
        lines.append(f"| {m} | {f'{max(trainable[m]):,}' if trainable[m] else '-'} | "
                     + " | ".join(_mean_std(cell.get((m, t, TASKS[t].main), [])) for t in tasks)
                     + f" | {'-' if mean is None else f'{100 * mean:.1f}'} | " + " | ".join(gaps) + " |")
    counts = {(m, t): len(cell.get((m, t, TASKS[t].main), [])) for m in methods for t in tasks}
    usual = len([s for s in seeds if s in PLAN_SEEDS]) or len(seeds)
    other = [f"{m} ({', '.join(f'{t} {counts[(m, t)]}' for t in tasks if counts[(m, t)] not in (0, usual))})"
             for m in methods if any(counts[(m, t)] not in (0, usual) for t in tasks)]
    if other:
        lines += ["", f"Cells on other than {usual} seeds (task, seeds): " + "; ".join(other) + "."]
    if best_lora:
        lines += ["", f"Per task, points from LoRA's best row ({best_lora}; issue 28 asks for within 3 on every task "
                  "and within 1 on the mean):", "", "| method | " + " | ".join(complete) + " | mean |",
                  "|---|" + "---:|" * (len(complete) + 1)]
        for m in (m for m in methods if m != best_lora and means[m] is not None):
            gaps = [100 * (statistics.fmean(cell[(m, t, TASKS[t].main)])
                           - statistics.fmean(cell[(best_lora, t, TASKS[t].main)])) for t in complete]
            mean_gap = 100 * (means[m] - means["best"])
            lines.append(f"| {m} | " + " | ".join(f"{g:+.1f}" for g in gaps) + f" | {mean_gap:+.1f} |")
    if seconds:
        lines += ["", "The tasks' second metrics (same runs):", "",
                  "| method | " + " | ".join(f"{t} {metric}" for t, metric in seconds) + " |",
                  "|---|" + "---:|" * len(seconds)]
        lines += [f"| {m} | " + " | ".join(_mean_std(cell.get((m, t, metric), [])) for t, metric in seconds) + " |"
                  for m in methods]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------


def done_under_another_name(specs: list[RunSpec]) -> dict[str, str]:
    """Plan runs of a default recipe already trained under another name (e.g. tried under a tag, then made the
    default): spec name -> that run's name. The table counts that run; training it again would repeat it."""
    wanted = {(s.task, s.method, s.seed, s.max_steps): s.name for s in specs
              if not s.overrides and s.lr is None and not s.diagnose}
    if not wanted:
        return {}
    return {wanted[key]: r["name"] for r in load_results()
            if (key := (r["task"], r["method"], r["seed"], r["max_steps"])) in wanted and at_default(r)
            and r["name"] != wanted[key]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["run", "list", "table", "config"])
    parser.add_argument("--plan", help=" | ".join(PLANS))
    parser.add_argument("--tasks", help="comma-separated (default mrpc); with --plan, only these of the plan's")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--lr", action="append", help="METHOD=LR[,LR...] (repeatable); default: the "
                        "method config's")
    parser.add_argument("--steps", type=int, help=f"max optimizer steps (default {SCHEDULE['max_steps']})")
    parser.add_argument("--tag", default="", help="names the override set in the run name (without --plan, default "
                        "'chosen': the method configs as shipped)")
    parser.add_argument("--set", action="append", help="dotted.config.key=YAML value (repeatable), e.g. "
                        "trainer.callbacks.0.init_args.calibration_batches=4; use with --tag")
    parser.add_argument("--diagnose", action="store_true", help="log per-group gradient / update norms and the "
                        "sparse selection into the run directory (benchmarks/quality_diagnostics.py)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--lock", type=Path, default=OUT / ".lock",
                        help="one training job at a time per lock; a second driver with another lock runs a second "
                             "job beside the first, taking the runs the first has not claimed")
    parser.add_argument("--code", default="worktree", help="library code to train: 'worktree' (this tree, the "
                        f"default) or a commit (git archive into {SNAPSHOTS}); the recipes are this tree's either way")
    args = parser.parse_args(argv)
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    if args.mode == "table":
        for path in make_tables(command):
            print(f"wrote {path.relative_to(REPO)}")
        return
    specs = specs_from_args(args)
    if args.mode == "config":
        for spec in specs:
            print(f"# {spec.name}\n" + yaml.safe_dump(build_config(spec, args.data_dir), sort_keys=False))
        return
    same = done_under_another_name(specs)  # reads every finished run: only list and run need it
    if args.mode == "list":
        for spec in specs:
            state = ("done" if (spec.run_dir / "result.json").exists() or spec.name in same else
                     "failed" if (spec.run_dir / "error.json").exists() else
                     "started" if (spec.run_dir / "train.log").exists() else "queued")
            print(f"{state:7s} {spec.name}" + (f" (as {same[spec.name]})" if spec.name in same else ""))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    args.lock.parent.mkdir(parents=True, exist_ok=True)
    todo = [s for s in specs if not (s.run_dir / "result.json").exists() and s.name not in same]
    print(f"[quality] {len(specs)} runs in the plan, {len(specs) - len(todo)} done, {len(todo)} to run", flush=True)
    for spec in todo:
        run_one(spec, args.lock, args.data_dir, command, args.code)


if __name__ == "__main__":
    main()
