"""Host memory at the start of training: one process against each rank of a 2-rank FSDP2 run (CPU, gloo).

Each run is the library's public path: `CausalLMModule` + `RandomMaskCallback` (no selection pass, so the load is
all that happens before training) + a Lightning `Trainer`, one training step on 1 x 64 random tokens. At
`on_train_start` every rank reads its peak resident memory since the process started (`VmHWM` of
`/proc/self/status`, which counts file pages a checkpoint's memory map touched too) and its current RSS; the
ratio column divides each rank's peak by the one-process peak. The FSDP2 runs are launched as a fresh 2-process
job (Lightning relaunches this script per rank), so no run inherits another's peak.

    OMP_NUM_THREADS=1 python benchmarks/load_memory.py --model SmolLM2-135M-Instruct \\
        --output benchmarks/results/load_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def status_mib(key: str) -> float:
    """A `/proc/self/status` field (kB) in MiB."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024 / MIB


def fit_once(model: str, strategy: str, output: Path) -> None:
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

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
            self.record["step_peak_mib"] = status_mib("VmHWM")
            output.mkdir(parents=True, exist_ok=True)
            (output / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))

    class Tokens(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
            rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
            return DataLoader(rows, batch_size=1)

    pl.seed_everything(0, verbose=False)
    if strategy.startswith("fsdp2"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        devices, chosen = 2, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        devices, chosen = 1, "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=chosen, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RandomMaskCallback(density=0.01), Memory()], default_root_dir=str(output))
    trainer.fit((FullLoad if strategy == "fsdp2-full" else CausalLMModule)(model), datamodule=Tokens())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str, strategy: str, output: Path) -> list[dict]:
    """A fresh process (group) per run, so each peak is that run's own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, __file__, "--worker", strategy, "--model", model, "--scratch", str(output)]
    subprocess.run(command, env=env, check=True)
    return [json.loads(p.read_text()) for p in sorted(output.glob("rank*.json"))]


def table(model: str, single: dict, full: list[dict], ranks: list[dict], command: str) -> str:
    lines = [f"# Host memory at the start of training: 1 process vs 2-rank FSDP2 ({model}, CPU)", "",
             f"Command: `{command}`", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch on CPU, gloo; random mask (density 0.01), one "
             "step of 1 x 64 tokens; peak = VmHWM at `on_train_start`.", "",
             "| run | rank | RSS before load | peak at train start | / one process | load: peak - before | "
             "/ one process | parameters held | peak after step 1 | / one process |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    load = {id(r): r["peak_mib"] - r["before_load_mib"] for r in [single, *full, *ranks]}
    runs = (("1 process", [single]), ("FSDP2, 2 ranks, whole model on each (before)", full),
            ("FSDP2, 2 ranks, by shards", ranks))
    for name, records in runs:
        for r in records:
            lines.append(f"| {name} | {r['rank']} | {r['before_load_mib']:,.0f} | {r['peak_mib']:,.0f} | "
                         f"{r['peak_mib'] / single['peak_mib']:.2f}x | {load[id(r)]:,.0f} | "
                         f"{load[id(r)] / load[id(single)]:.2f}x | {r['parameter_mib']:,.0f} | "
                         f"{r['step_peak_mib']:,.0f} | {r['step_peak_mib'] / single['step_peak_mib']:.2f}x |")
    lines += ["", "MiB throughout. \"Parameters held\" counts this rank's local tensors (its FSDP2 shard).", "",
              f"Reading it: before any model exists a process already holds {single['before_load_mib']:,.0f} MiB "
              "(torch, Lightning, transformers, the process group), and one process's peak at the start of training "
              f"is only {load[id(single)]:,.0f} MiB above that: `from_pretrained` leaves the fp32 weights in the "
              "safetensors file's memory map, and they become resident when the first step reads them (peak after "
              f"step 1: {single['step_peak_mib']:,.0f} MiB). An FSDP2 rank must own its shard in its own memory, so "
              "the fair per-rank figure is the load column: what the load adds, against the "
              f"{single['parameter_mib']:,.0f} MiB of parameters."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--output", type=Path, help="write the table here (and the records beside it, .json)")
    parser.add_argument("--worker", choices=["single", "fsdp2-full", "fsdp2"], help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fit_once(args.model, args.worker, args.scratch)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        single = launch(args.model, "single", Path(scratch) / "single")[0]
        full = launch(args.model, "fsdp2-full", Path(scratch) / "fsdp2-full")
        ranks = launch(args.model, "fsdp2", Path(scratch) / "fsdp2")
    command = "OMP_NUM_THREADS=1 python benchmarks/load_memory.py " + " ".join(sys.argv[1:])
    text = table(args.model, single, full, ranks, command)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps({"single": single, "fsdp2_full_load": full, "fsdp2": ranks}, indent=1))


if __name__ == "__main__":
    main()
