"""Peak memory per phase of a real fit, per method, beside what `sparse-lightning estimate` predicts.

Every method's shipped fragment (configs/method/smollm2/<method>.yaml) runs through `sparse-lightning fit` (the CLI
with configs/model/smollm2.yaml and configs/task/alpaca.yaml: SmolLM2-135M-Instruct in fp32 on the CPU, the bundled
Alpaca records packed into rows of 64 tokens, 2 rows per batch per rank, 3 optimizer steps, no validation), in one
process and on 2 FSDP2 ranks (configs/strategy/fsdp2.yaml, gloo). A callback appended to the trainer reads the
kernel's peak-RSS mark (`VmHWM`, reset through `/proc/self/clear_refs` at each phase's start) of every rank:

- baseline: the resident memory when the trainer calls `setup`: the Python, torch, Lightning, transformers and PEFT
  runtime (PEFT imported up front for every method), the tokenizer and the tokenized data; nothing of the model yet.
  Subtracted from every phase below (the predictor counts tensors only), and printed.
- load: `setup` to `on_fit_start`: build the model, attach the method (S2FT selects here), shard, build the optimizer.
- selection: `on_fit_start` to the first training batch: SIFT scores its calibration batches here.
- step: the 3 optimizer steps (SpIEL: 6, five statistics-window steps, then the first, full reselection).
- save: `trainer.save_checkpoint` after the fit, and the checkpoint's size on disk.

glibc's mmap threshold is pinned (`MALLOC_MMAP_THRESHOLD_=65536`, as step_benchmark.py does) so freed tensors leave
the resident set instead of staying in the heap, and each configuration runs in fresh processes. transformers maps a
checkpoint stored in the dtype it loads, so the callback reads every weight once at the end of load: its pages count
there (where a GPU's load copies them), not in whichever phase touches them first.

    OMP_NUM_THREADS=1 python benchmarks/memory_table.py [--methods full,lora,...] [--ranks 1,2] \\
        [--output benchmarks/results/memory_table.md]

writes OUTPUT (markdown) and OUTPUT with .json (every rank's numbers, the predictions and their components).
`--model DIR --device cuda --dtype bfloat16 --ranks 1 --seq-len 1024` measures torch's peak allocated GPU memory per
phase instead (benchmarks/gpu.sh, SECTIONS=memory, on a ~1B LLaMA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sparse_lightning.memory_estimate import METHODS, PHASES  # noqa: E402

MIB = 2**20
#: optimizer steps: the second holds the optimizer state with the gradients and activations; SpIEL's shipped cycle
#: (S=20, A=5) reselects everything before step 6 (window steps 1-5), so SpIEL runs 6
STEPS = {"spiel_ag": 6, "spiel_ma": 6}
DEFAULT_STEPS = 3


def proc_status_bytes(key: str) -> int:
    return 1024 * int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def fit_arguments(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """`sparse-lightning fit` arguments: the shipped fragments, small batches, no validation, no logger."""
    fit = ["fit", "--config", "configs/model/smollm2.yaml", "--config", "configs/task/alpaca.yaml",
           "--config", f"configs/method/smollm2/{args.methods}.yaml", "--model.model_name_or_path", args.model,
           "--model.dtype", args.dtype]
    if int(args.ranks) > 1:
        fit += ["--config", "configs/strategy/fsdp2.yaml", "--trainer.devices", args.ranks,
                "--trainer.strategy.init_args.data_parallel_size", args.ranks]
    return fit + [
        "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu", "--data.data_files", "bundled",
        "--data.packing", "true", "--data.max_length", str(args.seq_len), "--data.batch_size", str(args.batch_size),
        "--data.val_fraction", "0",
        "--trainer.max_steps", str(STEPS.get(args.methods, DEFAULT_STEPS)), "--trainer.accumulate_grad_batches", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false", "--trainer.logger", "false", "--trainer.enable_progress_bar",
        "false", "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(run_dir)]


class HostMeter:
    """Resident host memory (the kernel's peak-RSS mark, reset per phase)."""

    def current(self) -> int:
        return proc_status_bytes("VmRSS")

    def peak(self) -> int:
        return proc_status_bytes("VmHWM")

    def reset(self) -> None:
        reset_peak()


class CudaMeter:
    """Memory allocated on this rank's GPU by torch (the CUDA context and the allocator's cache are not counted)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda

    def current(self) -> int:
        return self.cuda.memory_allocated()

    def peak(self) -> int:
        return self.cuda.max_memory_allocated()

    def reset(self) -> None:
        self.cuda.reset_peak_memory_stats()


def run_worker(args: argparse.Namespace) -> None:
    """One fit (Lightning relaunches this same command once per extra rank); every rank writes rank<r>.json."""
    import torch
    from lightning.pytorch import Callback

    from sparse_lightning.cli import SaveConfigToRunDirectory, SparseLightningCLI
    from sparse_lightning.modules import SparseFineTuningModule

    torch.set_num_threads(1)
    import peft  # noqa: F401 - LoRA's import (~60 MB of code) belongs to the runtime baseline, not to its load

    class PhaseMemory(Callback):
        """Peak RSS of each phase (the mark is reset when a phase starts) and the resident memory at its end."""

        def __init__(self) -> None:
            self.record: dict[str, Any] = {"phases": {}, "model": args.model, "dtype": args.dtype,
                                           "device": args.device}
            self.phase: str | None = None
            self.meter = CudaMeter() if args.device == "cuda" else HostMeter()

        def begin(self, phase: str | None) -> None:
            if self.phase is not None:
                self.record["phases"][self.phase] = {"peak": self.meter.peak(), "end": self.meter.current(),
                                                     "cpu_s": time.process_time() - self.cpu}
            self.phase = phase
            self.cpu = time.process_time()
            self.meter.reset()

        def setup(self, trainer, pl_module, stage: str) -> None:
            self.record["baseline"] = self.meter.current()
            self.begin("load")

        def on_fit_start(self, trainer, pl_module) -> None:
            # transformers memory-maps a checkpoint stored in the dtype it loads: read every weight once, so its
            # pages count here, where a GPU's load copies them, not in whichever phase touches them first
            with torch.no_grad():
                for tensor in [*pl_module.parameters(), *pl_module.buffers()]:
                    getattr(tensor, "to_local", lambda: tensor)().sum()
            self.begin("selection")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            if batch_idx == 0:
                self.record["tokens_per_batch"] = int(batch["input_ids"].numel())
                self.begin("step")

        def on_train_end(self, trainer, pl_module) -> None:
            self.begin(None)
            model = pl_module.model
            local = lambda t: getattr(t, "to_local", lambda: t)()  # noqa: E731 - FSDP2 DTensor -> this rank's shard
            self.record |= {
                "budget": budget_of(pl_module),
                # checkpoints hold the frozen base too: asked for, or a library from before delta checkpoints
                "full_checkpoint": bool(pl_module.hparams.get("full_checkpoint", True)),
                "rank": trainer.global_rank, "world_size": trainer.world_size, "steps": trainer.global_step,
                "parameters": sum(p.numel() for p in model.parameters()),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "local_parameter_bytes": sum(local(p).numel() * p.element_size() for p in model.parameters()),
                "optimizer_state_bytes": sum(local(v).numel() * v.element_size() for opt in trainer.optimizers
                                             for state in opt.state.values() for v in state.values()
                                             if torch.is_tensor(v)),
            }

    memory = PhaseMemory()
    output = args.scratch
    run_dir = output / "run"
    cli = SparseLightningCLI(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True,
                             args=fit_arguments(args, run_dir), trainer_defaults={"callbacks": [memory]},
                             save_config_callback=SaveConfigToRunDirectory)
    trainer = cli.trainer
    memory.begin("save")
    checkpoint = run_dir / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    memory.begin(None)
    if trainer.global_rank == 0:
        memory.record["checkpoint_bytes"] = checkpoint.stat().st_size
    memory.record["method"] = args.methods
    memory.record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                             cwd=REPO).stdout.strip()
    output.mkdir(parents=True, exist_ok=True)
    (output / f"rank{trainer.global_rank}.json").write_text(json.dumps(memory.record, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def budget_of(module) -> dict[str, Any]:
    """The run's budget as the predictor takes it: LoRA's rank, an element-sparse density or count, S2FT's
    trained count (its channels times the hidden size times the layers)."""
    if module.hparams.lora is not None:
        return {"lora_rank": module.hparams.lora["r"]}
    method = module.sparse_method()
    if method is None:
        return {}
    if method.method == "s2ft":
        return {"num_params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    return {key: getattr(method, key) for key in ("density", "num_params", "lora_rank", "calibration_batches",
                                                  "score_memory") if getattr(method, key, None) is not None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(args: argparse.Namespace, method: str, ranks: int) -> list[dict[str, Any]]:
    """One configuration in fresh processes; every rank's record."""
    output = args.scratch / f"{method}_{ranks}"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--methods", method, "--ranks", str(ranks),
               "--scratch", str(output), "--model", args.model, "--device", args.device, "--dtype", args.dtype,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} on {ranks} rank(s) failed:\n{done.stdout[-3000:]}")
    return [json.loads((output / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ranks", default="1,2", help="comma-separated: 1 (one process), 2 (FSDP2 on 2 CPU ranks)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="alias or local causal-LM directory")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: peak host RSS; cuda: torch's "
                        "peak allocated GPU memory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the base's dtype")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per batch per rank")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per packed row")
    parser.add_argument("--jobs", type=int, default=1, help="configurations measured at once (each in its own "
                        "processes, so each one's peak is its own; only the wall time changes)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/memory_table.md")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/memory_table"))
    parser.add_argument("--report-only", metavar="COMMAND", help="rewrite OUTPUT from SCRATCH/measured.json (kept by "
                        "the last measuring run), naming COMMAND as the command that measured it")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    raw = args.scratch / "measured.json"
    if args.report_only:
        from benchmarks.memory_table_report import write_report

        return write_report(json.loads(raw.read_text()), args.output, args.report_only)
    args.scratch.mkdir(parents=True, exist_ok=True)
    # a run measures the configurations it names and keeps the others' last measurement (each row names its commit)
    measured = json.loads(raw.read_text()) if raw.is_file() else {}
    def run(method: str, ranks: int) -> None:
        started = time.time()
        records = measure(args, method, ranks)
        with lock:
            measured[f"{method}/{ranks}"] = records
            raw.write_text(json.dumps(measured))
        peaks = ", ".join(f"{p} {max(r['phases'][p]['peak'] - r['baseline'] for r in records) / MIB:,.0f}"
                          for p in PHASES)
        print(f"[{method}, {ranks} rank(s)] peak above baseline, MiB: {peaks} ({time.time() - started:.0f} s)",
              flush=True)

    lock = threading.Lock()
    configurations = [(m, int(r)) for r in args.ranks.split(",") for m in args.methods.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:  # a process's own peak RSS does not depend on its neighbours
        for future in [pool.submit(run, *configuration) for configuration in configurations]:
            future.result()
    from benchmarks.memory_table_report import write_report

    write_report(measured, args.output, " ".join(["python", "benchmarks/memory_table.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
