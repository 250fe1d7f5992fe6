"""Host memory of a fit: one process against each rank of a 2-rank FSDP2 run (CPU, gloo), like with like.

Each run is the library's public path: `CausalLMModule` + `RandomMaskCallback` (no selection pass, so the load is
all that happens before training) + a Lightning `Trainer`, one training step on 1 x 64 random tokens. Three runs:
one process; FSDP2 with every rank loading the whole model by `from_pretrained` (the path before loading by shards,
kept here as the comparison); FSDP2 loading by shards (modules/sharded_loading.py). Every rank records its RSS
before `configure_model`, its peak (`VmHWM` of `/proc/self/status`, which counts the file pages a checkpoint's
memory map made resident too) at `on_train_start`, the same peak once every parameter it holds has been read (one
process: `from_pretrained` leaves the weights in the file's memory map, and they are resident only once read; a
rank's shard is its own memory already), after the first step, and the bytes of the parameters it holds.

Each run goes under two allocators: glibc's default, whose dynamic mmap threshold keeps the freed buffers of
FSDP2's per-block all-gathers (CPU runs only: on a GPU they are device memory) in its heap, so RSS grows through
the step; and the same with `MALLOC_MMAP_THRESHOLD_` fixed, so freed buffers go back to the system and the peak is
what the run holds. Each run is a fresh launch (Lightning relaunches this script per rank), so no run inherits
another's peak; `--repeats` launches each run again and the table reports medians.

`--init_delta_density D` starts every run from an `init_delta`: a random-mask delta of the model at density D with
N(0, 0.01) values, exported once before the runs (`export_model`), which a process merges into its whole model and a
rank loading by shards adds to its own rows (modules/row_updates.py).

    OMP_NUM_THREADS=1 python benchmarks/load_memory.py --model SmolLM2-135M-Instruct --repeats 3 \\
        --output benchmarks/results/load_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def status_mib(key: str) -> float:
    """A `/proc/self/status` field (kB) in MiB."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024 / MIB


def fit_once(model: str, strategy: str, output: Path, init_delta: str | None = None) -> None:
    """One training step; every rank writes `rank<r>.json` with its memory. `fsdp2-full` loads the whole model on
    every rank with `from_pretrained` (the path before loading by shards), for comparison."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from sparse_lightning.callbacks import RandomMaskCallback
    from sparse_lightning.models import resolve_model_path
    from sparse_lightning.modules import CausalLMModule

    class FullLoad(CausalLMModule):
        def load_pretrained(self, auto_class, model_name_or_path: str, **kwargs):
            return auto_class.from_pretrained(resolve_model_path(model_name_or_path), **kwargs)

    torch.set_num_threads(1)

    class Memory(pl.Callback):
        def __init__(self) -> None:
            self.record: dict = {}

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            self.record["before_load_mib"] = status_mib("VmRSS")  # imports, process group, datamodule: no model yet

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            local = [getattr(p, "to_local", lambda p=p: p)() for p in pl_module.parameters()]
            self.record.update(rank=trainer.global_rank, world_size=trainer.world_size,
                               peak_mib=status_mib("VmHWM"), rss_mib=status_mib("VmRSS"),
                               parameter_mib=sum(t.numel() * t.element_size() for t in local) / MIB)
            with torch.no_grad():  # every page of every parameter read once: the weights resident, as a step reads them
                for tensor in local:
                    tensor.sum()
            self.record["resident_peak_mib"] = status_mib("VmHWM")

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
            self.record["step_peak_mib"] = status_mib("VmHWM")
            output.mkdir(parents=True, exist_ok=True)
            (output / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(resolve_model_path(model)).vocab_size

    class Tokens(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            ids = torch.randint(0, min(1000, vocab), (8, 64), generator=torch.Generator().manual_seed(0))
            rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
            return DataLoader(rows, batch_size=1)

    pl.seed_everything(0, verbose=False)
    if strategy != "single":
        from lightning.pytorch.strategies import ModelParallelStrategy

        devices, chosen = 2, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        devices, chosen = 1, "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=chosen, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RandomMaskCallback(density=0.01), Memory()], default_root_dir=str(output))
    module = (FullLoad if strategy == "fsdp2-full" else CausalLMModule)(model, init_delta=init_delta)
    trainer.fit(module, datamodule=Tokens())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Allocator settings: glibc's default, and the mmap threshold fixed (freed large buffers return to the system).
ALLOCATORS = {"glibc": {}, "fixed-mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def make_init_delta(model: str, density: float, output: Path) -> int:
    """Export a random-mask delta of `model` at `density` with N(0, 0.01) values to `output`; its entry count."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoModelForCausalLM

    from sparse_lightning.callbacks import RandomMaskCallback
    from sparse_lightning.export import export_model
    from sparse_lightning.models import resolve_model_path
    from sparse_lightning.sparse import sparse_delta_layers

    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model)).requires_grad_(False)
    RandomMaskCallback(density=density).attach(hf_model)  # only the deltas train: no dense parameter in the export
    layers = sparse_delta_layers(hf_model).values()
    for layer in layers:
        layer.delta_values.data.normal_(0.0, 0.01)
    export_model(hf_model, output, base_model=model)
    return sum(layer.delta_values.numel() for layer in layers)


def launch(model: str, strategy: str, allocator: str, output: Path, init_delta: Path | None = None) -> list[dict]:
    """A fresh process (group) per run, so each peak is that run's own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **ALLOCATORS[allocator]}
    command = [sys.executable, __file__, "--worker", strategy, "--model", model, "--scratch", str(output)]
    command += ["--init_delta", str(init_delta)] if init_delta else []
    subprocess.run(command, env=env, check=True)
    return [json.loads(p.read_text()) for p in sorted(output.glob("rank*.json"))]


FIELDS = ("before_load_mib", "peak_mib", "resident_peak_mib", "parameter_mib", "step_peak_mib")
RUNS = (("single", "1 process"), ("fsdp2-full", "FSDP2, 2 ranks, whole model on each (before)"),
        ("fsdp2", "FSDP2, 2 ranks, by shards"))


def per_rank(repeats: list[list[dict]]) -> list[dict]:
    """Each rank's median of every field over the repeats, and the range of its step-1 peak."""
    ranks = []
    for records in zip(*repeats):
        row = {key: statistics.median(r[key] for r in records) for key in FIELDS}
        row["step_range"] = (min(r["step_peak_mib"] for r in records), max(r["step_peak_mib"] for r in records))
        ranks.append({"rank": records[0]["rank"], **row})
    return ranks


def table(model: str, rows: dict[tuple[str, str], list[dict]], repeats: int, command: str, start: str = "") -> str:
    lines = [f"## {model}{start}: 1 process vs 2-rank FSDP2 (CPU)", "", f"Command: `{command}`", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch on CPU, gloo; random mask (density 0.01), one "
             f"step of 1 x 64 tokens; medians of {repeats} fresh launch(es) per run. Peaks are VmHWM since the process "
             "started: at `on_train_start`; at `on_train_start` once every parameter held has been read (\"weights "
             "resident\"); after step 1. Each ratio divides by the one-process figure under the same allocator.", "",
             "| allocator | run | rank | RSS before load | peak at train start | weights resident | / one process | "
             "parameters held | peak after step 1 (min-max) | / one process |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for allocator in ALLOCATORS:
        one = rows.get((allocator, "single"), [None])[0]
        for key, name in RUNS:
            for r in rows.get((allocator, key), []):
                low, high = r["step_range"]
                resident = f"{r['resident_peak_mib'] / one['resident_peak_mib']:.2f}x" if one else "-"
                step = f"{r['step_peak_mib'] / one['step_peak_mib']:.2f}x" if one else "-"
                lines.append(f"| {allocator} | {name} | {r['rank']} | {r['before_load_mib']:,.0f} | "
                             f"{r['peak_mib']:,.0f} | {r['resident_peak_mib']:,.0f} | {resident} | "
                             f"{r['parameter_mib']:,.0f} | {r['step_peak_mib']:,.0f} ({low:,.0f}-{high:,.0f}) | {step} |")
    lines += ["", "MiB throughout. \"Parameters held\" counts this rank's local tensors (its FSDP2 shard). "
              "`fixed-mmap`: `MALLOC_MMAP_THRESHOLD_=65536`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="an alias or a local model directory")
    parser.add_argument("--repeats", type=int, default=3, help="fresh launches per run (medians are reported)")
    parser.add_argument("--runs", default=",".join(key for key, _ in RUNS), help="comma-separated runs")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help="comma-separated allocator settings")
    parser.add_argument("--output", type=Path, help="write the table here (and the records beside it, .json)")
    parser.add_argument("--append", action="store_true", help="add the table to --output instead of replacing it")
    parser.add_argument("--init_delta_density", type=float, help="start every run from a random-mask init_delta "
                        "of this density")
    parser.add_argument("--init_delta", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=[key for key, _ in RUNS], help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fit_once(args.model, args.worker, args.scratch, args.init_delta)
        return
    import tempfile

    runs = [(allocator, key) for allocator in args.allocators.split(",") for key in args.runs.split(",")]
    records: dict[tuple[str, str], list[list[dict]]] = {run: [] for run in runs}
    start = ""
    with tempfile.TemporaryDirectory() as scratch:
        init_delta = None
        if args.init_delta_density:
            init_delta = Path(scratch) / "init_delta"
            entries = make_init_delta(args.model, args.init_delta_density, init_delta)
            start = f", from an init_delta ({entries:,} random-mask entries, density {args.init_delta_density})"
        for repeat in range(args.repeats):
            for allocator, key in runs:
                records[(allocator, key)].append(launch(args.model, key, allocator,
                                                        Path(scratch) / f"{allocator}-{key}-{repeat}", init_delta))
    rows = {run: per_rank(found) for run, found in records.items()}
    command = "OMP_NUM_THREADS=1 python benchmarks/load_memory.py " + " ".join(sys.argv[1:])
    text = table(Path(args.model).name, rows, args.repeats, command, start)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        before = args.output.read_text() + "\n" if args.append and args.output.is_file() else ""
        args.output.write_text(before + text)
        started = "-init_delta" if args.init_delta_density else ""
        records_file = args.output.with_name(f"{args.output.stem}-{Path(args.model).name}{started}.json")
        records_file.write_text(json.dumps({"medians": {"/".join(k): v for k, v in rows.items()},
                                            "runs": {"/".join(k): v for k, v in records.items()}}, indent=1))


if __name__ == "__main__":
    main()
