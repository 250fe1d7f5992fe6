"""Checkpoint size per method: a delta checkpoint (the default) against a full one (`--model.full_checkpoint true`).

Each row is a short `sparse-lightning fit` (the public CLI, one thread, the real configs: model + task + method
fragments) that saves one checkpoint after a few optimizer steps; the table gives the bytes of that checkpoint file
written both ways, and what the delta checkpoint holds. Writes benchmarks/results/checkpoint_size.md.

    python benchmarks/checkpoint_size.py                       # MiniLM on SST-2 (the quick start), every method
    python benchmarks/checkpoint_size.py --models minilm smollm2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparse_lightning.registry import METHODS  # noqa: E402  (every method: configs/method/<model>/<name>.yaml)

STEPS = 3
#: model -> (the CLI overrides that keep a run to a few small steps)
OVERRIDES = {
    "minilm": ["--trainer.limit_val_batches", "1"],
    "smollm2": ["--data.data_files", "bundled", "--data.max_length", "64", "--data.batch_size", "1",
                "--trainer.accumulate_grad_batches", "1", "--trainer.limit_val_batches", "1",
                "--trainer.num_sanity_val_steps", "0"],
}
TASKS = {"minilm": "sst2", "smollm2": "alpaca"}


def configs(model: str, method: str) -> list[str]:
    """The composition model + task + method (MiniLM's SIFT row is the quick start)."""
    return [f"configs/model/{model}.yaml", f"configs/task/{TASKS[model]}.yaml", f"configs/method/{model}/{method}.yaml"]


_TRAINABLE = re.compile(r"\] trainable params: ([\d,]+)")  # the module's own line, not the model summary's


def fit(model: str, method: str, full: bool, root: Path) -> tuple[Path, int, list[str]]:
    """One short run; returns its checkpoint, the trainable count it reported, and the command."""
    command = ["sparse-lightning", "fit", *[arg for config in configs(model, method) for arg in ("--config", config)],
               "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS), *OVERRIDES[model],
               "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
               "--model.full_checkpoint", str(full).lower()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "sparse_lightning.cli", *command[1:]], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    (checkpoint,) = root.rglob("*.ckpt")
    trainable = int(_TRAINABLE.search(result.stdout + result.stderr).group(1).replace(",", ""))
    return checkpoint, trainable, command


def holds(checkpoint: Path) -> str:
    """What the checkpoint's state dict and optimizer state hold, in tensor entries."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    weights = sum(t.numel() for t in content["state_dict"].values())
    optimizer = sum(t.numel() for opt in content.get("optimizer_states", []) for slot in opt["state"].values()
                    for t in slot.values() if torch.is_tensor(t) and t.dim() > 0)
    return f"{weights:,} / {optimizer:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm"], choices=list(OVERRIDES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "checkpoint_size.md")
    args = parser.parse_args()
    rows = []
    example = None
    for model in args.models:
        for method in args.methods:
            sizes = {}
            with tempfile.TemporaryDirectory(prefix="ckpt-size-") as work:
                for full in (True, False):
                    checkpoint, trainable, command = fit(model, method, full, Path(work) / str(full))
                    sizes[full] = checkpoint.stat().st_size
                    if not full:
                        content = holds(checkpoint)
                        example = example or command
            rows.append(f"| {model} | {method} | {' + '.join(configs(model, method))} | {trainable:,} | {sizes[True] / 1e6:,.1f} | {sizes[False] / 1e6:,.2f} "
                        f"| {sizes[True] / sizes[False]:,.0f}x | {content} |")
            print(rows[-1], flush=True)
    command_line = re.sub(r"default_root_dir \S+", "default_root_dir DIR", " ".join(example))
    command_line = command_line.replace(" --model.full_checkpoint false", "")
    lines = [
        "# Checkpoint size: what trains vs. the whole model",
        "",
        f"`python benchmarks/checkpoint_size.py --models {' '.join(args.models)}`: for each method, a {STEPS}-step "
        "`sparse-lightning fit` (the repository's model + task + method configs, one thread) that saves one "
        "checkpoint (MiniLM's SIFT row is the quick start: `configs/model/minilm.yaml` + `configs/task/sst2.yaml` + "
        "`configs/method/minilm/sift.yaml`), run once with `--model.full_checkpoint true` (the whole model, as every checkpoint was before) "
        "and once by default (a delta checkpoint: what trains, its optimizer state, RNG, data position and a "
        "fingerprint of the base). A row's command, e.g.:",
        "",
        f"    {command_line}",
        "",
        "| model | method | configs | trainable | full checkpoint (MB) | delta checkpoint (MB) | smaller | delta holds: "
        "weights / optimizer entries |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "MB = 10^6 bytes of the `.ckpt` file. Full fine-tuning trains every weight, so its delta checkpoint is the whole "
        "model. SpIEL-MA's SM3 keeps row and column accumulators (fewer entries than AdamW's two per value).",
        "",
    ]
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
