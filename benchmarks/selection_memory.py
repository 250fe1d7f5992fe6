"""Extra peak host memory of data-driven selection (SIFT, S2FT) on SmolLM2-135M, as a multiple of the parameter bytes.

Each case runs in a fresh subprocess: load SmolLM2-135M-Instruct in fp32, build 4 calibration batches of 1 x 64
tokens (random ids, seed 0: activations stay small, so what is measured is what selection holds), attach the method's
deltas, page every weight in with one forward and backward (transformers memory-maps fp32 safetensors; the first pass
would otherwise count ~1x the model as "selection"), then reset the kernel's peak-RSS mark (`/proc/self/clear_refs`)
and run the selection through the library's public path. "Extra peak" is VmHWM during selection minus VmRSS just
before it; glibc's mmap threshold is pinned so freed buffers leave RSS (as in step_benchmark.py).

Cases:
- `sift`: `select_by_gradient(model, batches, loss_fn)` with the library's defaults, density 0.01 on the seven
  LLaMA projections (GradientTopKCallback's defaults);
- `sift-dense-sum`: the all-at-once dense sum (`summed_weight_gradients` over every layer, then `select_top_k`),
  what `select_by_gradient` computed before selection memory was bounded;
- `s2ft-gradient`, `s2ft-activation`: `S2FTStructureCallback(select_by=..., calibration_batches=N).attach(model,
  calibration)` with its default budgets and projections (o, down), selection, co-permutation and blocks included;
- `<case>-checkpointed`: the same with the model's gradient checkpointing on (`enable_activation_checkpointing`, what
  the task modules' `gradient_checkpointing=True` calls); its floor is `forward-backward-checkpointed`. Since a83317a
  the scoring passes checkpoint either way, so these equal the plain cases.

`forward-backward` runs in `scoring_mode` too (eval mode, dropout off; since a83317a every layer recomputes, as in
every scoring pass): a checkpointed training step's passes on the same batches.

`--label` names the library under test (run once with this checkout first on PYTHONPATH, once with another, e.g. the
commit before), and rows accumulate in `--json`; the markdown table is rewritten from all of them:

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/old/checkout python benchmarks/selection_memory.py --label before \\
        --cases sift,s2ft-gradient,s2ft-activation --json benchmarks/results/selection_memory.json
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/selection_memory.py --label after \\
        --json benchmarks/results/selection_memory.json --output benchmarks/results/selection_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES = ["forward-backward", "sift", "sift-dense-sum", "s2ft-gradient", "s2ft-activation"]
CHECKPOINTED = "-checkpointed"
BATCH_COUNTS = [1, 4]
MODEL = "SmolLM2-135M-Instruct"
TOKENS = 64


NOTES = """Extra peak host memory (VmHWM) of the selection above the RSS just before it, in MiB and as a multiple of the
model's parameter bytes (513 MiB), one fresh process per row (`benchmarks/selection_memory.py`, whose docstring says
what each case runs). "before" is the library at 1165ebd (every target weight's fp32 sum held at once), "after" this
checkout (SIFT: one batch's top-k inside backward, several batches summed a group of layers at a time within
`score_memory=0.125`; S2FT's gradient scores likewise). `forward-backward` is one plain forward and backward per batch
with SIFT's deltas attached: what a training step on the same batches costs, and what any selection from gradients
must pay at least once; at 1 x 64 tokens SmolLM2's activations and logits are 0.22x its parameter bytes. "Above the
floor" subtracts it (SIFT rows). Under 2-rank FSDP2 (gloo) every rank scores its own batches, each row is one rank,
and the floor includes FSDP2's unsharded block weights. "row-sharded" is the library after SIFT's sums were cut by rows
over ranks (each rank holds 1/N of every sum, the budget a fraction of that share; `scoring/row_sharded_sums.py`): its 2-rank
rows against the "after" ones, which held whole sums on every rank. `-checkpointed` cases run with the model's
gradient checkpointing on, against their own floor, `forward-backward-checkpointed`. "scoring-checkpointed" is the
library after scoring passes checkpoint activations whether or not the model does (`modes.scoring_mode`): its plain
cases are the earlier labels' `-checkpointed` ones, now the default. CPU seconds are the selection's own, one thread
(a shared machine: +-10%).

Why the 2-rank floor is 0.47x, and why it does not carry to the models users train: FSDP2 gathers a unit's weights
into one all-gather buffer and copies them out into the unsharded parameters, so a unit costs twice its size while it
is gathered. SmolLM2's largest unit is the root, which holds the tied 49,152 x 576 embedding (108.0 MiB fp32, 21% of
the model), and a block is 13.5 MiB: 2 x 108.0 + 2 x 13.5 = 243 MiB, the measured floor to the MiB. That is a property
of FSDP2 with one large tied matrix at 2 ranks, not of the selection (above the floor SIFT adds 0.08x). On LLaMA shapes
(untied; the embedding and head are units of their own, `fsdp2.end_units`) the largest unit is a small share of the
model, and the predictor (`sparse-lightning estimate --model 8b --method sift --gpus 2,8 --calibration_batches 4
--seq_len 64`, bf16) gives a selection of 0.26x (2 GPUs) and 0.20x (8 GPUs) of the parameter bytes above the loaded
model at 8B, and 0.18x / 0.10x at 70B.

    OMP_NUM_THREADS=1 PYTHONPATH=<a checkout of 1165ebd> python benchmarks/selection_memory.py --label before \\
        --cases sift,s2ft-gradient,s2ft-activation --json benchmarks/results/selection_memory.json
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/selection_memory.py --label after \\
        --json benchmarks/results/selection_memory.json --output benchmarks/results/selection_memory.md
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/selection_memory.py --label after --ranks 2 \\
        --cases forward-backward,sift --json benchmarks/results/selection_memory.json \\
        --output benchmarks/results/selection_memory.md
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/selection_memory.py --label row-sharded --ranks 2 \\
        --cases forward-backward,sift --json benchmarks/results/selection_memory.json
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/selection_memory.py --label row-sharded \\
        --cases forward-backward-checkpointed,sift-checkpointed --json benchmarks/results/selection_memory.json \\
        --output benchmarks/results/selection_memory.md
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/selection_memory.py --label row-sharded --ranks 2 \\
        --batches 4 --cases forward-backward-checkpointed,sift-checkpointed \\
        --json benchmarks/results/selection_memory.json --output benchmarks/results/selection_memory.md
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/selection_memory.py --label scoring-checkpointed \\
        --cases forward-backward,sift,s2ft-gradient --batches 1,4 --json benchmarks/results/selection_memory.json
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/selection_memory.py --label scoring-checkpointed --ranks 2 \\
        --batches 4 --cases forward-backward,sift --json benchmarks/results/selection_memory.json \\
        --output benchmarks/results/selection_memory.md
"""


def status_bytes(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def measure(case: str, batch_count: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """One case in this process (a fresh child, or one rank of it): the selection's extra peak RSS and CPU seconds.
    On several ranks (gloo) the model is sharded with FSDP2 after attaching, as the library shards it, and each rank
    scores its own batches."""
    import torch
    from transformers import AutoModelForCausalLM

    import sparse_lightning
    from sparse_lightning.callbacks import GradientTopKCallback, S2FTStructureCallback
    from sparse_lightning.methods import Calibration
    from sparse_lightning.modes import enable_activation_checkpointing, scoring_mode
    from sparse_lightning.models import resolve_model_path
    from sparse_lightning.sparse.inject import freeze_except

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
    model.eval()
    label, case = case, case.removesuffix(CHECKPOINTED)
    if label != case:
        enable_activation_checkpointing(model)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, model.config.vocab_size, (batch_count, 1, TOKENS), generator=generator)
    calibration = Calibration.from_batches(model, [{"input_ids": i, "labels": i} for i in ids])
    batches, loss_fn = calibration.batches(batch_count), calibration.loss_fn

    if case == "forward-backward" or case.startswith("sift"):
        GradientTopKCallback(density=0.01).attach(model)
        freeze_except(model, [])
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            from sparse_lightning.modules.fsdp2 import fully_shard_model

            fully_shard_model(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)))
        loss_fn(batches[0]).backward()  # pages every weight in; the selection's own passes come after the reset
        model.zero_grad(set_to_none=True)
        if case == "forward-backward":

            def select() -> None:
                with scoring_mode(model):
                    for batch in batches:
                        loss_fn(batch).backward()
                model.zero_grad(set_to_none=True)
        elif case == "sift":
            from sparse_lightning.methods.sift import select_by_gradient

            def select() -> None:
                select_by_gradient(model, batches, loss_fn)
        else:
            from sparse_lightning.methods.sift import select_top_k, summed_weight_gradients, unselected_layers

            def select() -> None:
                layers = unselected_layers(model)
                scores = summed_weight_gradients(model, layers, batches, loss_fn)
                for name, layer in layers.items():
                    select_top_k(layer, scores[name].abs_())
    else:
        model.requires_grad_(False)
        with torch.no_grad():
            loss_fn(batches[0])  # pages every weight in
        callback = S2FTStructureCallback(select_by=case.removeprefix("s2ft-"), calibration_batches=batch_count)

        def select() -> None:
            callback.attach(model, calibration)

    Path("/proc/self/clear_refs").write_text("5")
    before = status_bytes("VmRSS")
    cpu = time.process_time()
    select()
    cpu = time.process_time() - cpu
    extra = status_bytes("VmHWM") - before
    return {"case": label, "batches": batch_count, "ranks": world, "rank": rank, "extra_peak_mib": extra / 2**20,
            "ratio": extra / parameter_bytes, "parameter_mib": parameter_bytes / 2**20, "cpu_s": cpu,
            "library": str(Path(sparse_lightning.__file__).resolve().parents[1])}


def commit_of(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def rank_worker(rank: int, case: str, batch_count: int, world: int, output: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        (output / f"rank{rank}.json").write_text(json.dumps(measure(case, batch_count, rank, world)))
    finally:
        dist.destroy_process_group()


def child(case: str, batch_count: int, world: int) -> list[dict[str, Any]]:
    if world == 1:
        return [measure(case, batch_count)]
    import tempfile

    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_worker, args=(case, batch_count, world, Path(folder)), nprocs=world, join=True)
        return [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(world)]


def run_child(case: str, batch_count: int, world: int) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--child", case, str(batch_count), str(world)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{case} with {batch_count} batch(es) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def key(row: dict[str, Any]) -> tuple:
    return row["label"], row["case"], row["batches"], row.get("ranks", 1), row.get("rank", 0)


def table(rows: list[dict[str, Any]]) -> str:
    """One line per run; for SIFT, "above the floor" subtracts the plain forward+backward of the same batches on the
    same ranks (`forward-backward`, SIFT's deltas attached), which every training step on those batches pays."""
    def floor_key(r: dict[str, Any]) -> tuple:
        return r["case"].endswith(CHECKPOINTED), r["batches"], r.get("ranks", 1), r.get("rank", 0)

    floors = {floor_key(r): r for r in rows if r["case"].startswith("forward-backward")}  # the last row measured
    floors.update({(r["label"], *floor_key(r)): r for r in rows if r["case"].startswith("forward-backward")})
    lines = ["| library | case | ranks | calibration batches | extra peak (MiB) | x parameter bytes "
             "| above the floor (MiB) | x parameter bytes | selection CPU s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (not r["case"].startswith("forward-backward"), r["case"], r.get("ranks", 1),
                                         r["batches"], r["label"] != "before", r.get("rank", 0))):
        ranks = r.get("ranks", 1)
        where = "1" if ranks == 1 else f"{ranks} (FSDP2), rank {r['rank']}"
        floor = floors.get((r["label"], *floor_key(r)), floors.get(floor_key(r)))
        above = ("-", "-") if floor is None or not r["case"].startswith("sift") else (
            f"{r['extra_peak_mib'] - floor['extra_peak_mib']:.0f}", f"{r['ratio'] - floor['ratio']:.3f}")
        lines.append(f"| {r['label']} ({r['commit']}) | {r['case']} | {where} | {r['batches']} "
                     f"| {r['extra_peak_mib']:.0f} | {r['ratio']:.3f} | {above[0]} | {above[1]} | {r['cpu_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("CASE", "BATCHES", "RANKS"), help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=1, help="CPU ranks (gloo); above 1 the model is FSDP2-sharded")
    parser.add_argument("--label", default="after", help="name of the library under test in the table")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, among {CASES}, each also with "
                                                                 f"{CHECKPOINTED!r} appended")
    parser.add_argument("--batches", default=",".join(map(str, BATCH_COUNTS)), help="calibration batch counts")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/selection_memory.json"))
    parser.add_argument("--output", type=Path, help="write the markdown table here too")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    for case in args.cases.split(","):
        for count in map(int, args.batches.split(",")):
            for row in run_child(case, count, args.ranks):
                row = {**row, "label": args.label, "commit": commit_of(row["library"])}
                print(f"{args.label:8s} {case:16s} {count} batch(es), rank {row['rank']} of {row['ranks']}: "
                      f"+{row['extra_peak_mib']:.0f} MiB = {row['ratio']:.3f}x parameter bytes, "
                      f"{row['cpu_s']:.1f} s CPU", flush=True)
                rows = [r for r in rows if key(r) != key(row)] + [row]
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    if args.output:
        args.output.write_text(f"# Selection memory, SmolLM2-135M fp32, batches of 1 x {TOKENS} tokens\n\n{NOTES}\n"
                               f"{table(rows)}\n")


if __name__ == "__main__":
    main()
