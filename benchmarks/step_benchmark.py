"""Step time, peak memory, trainable parameters and optimizer state: full FT vs PEFT LoRA vs sparse methods.

Every method trains the same model on the same batches with AdamW over its trainable parameters
only, in a plain PyTorch loop (forward + backward + optimizer step + zero_grad per timed step).
Every measurement runs in its own subprocess, so peaks never mix and `--repeats` rounds can
interleave the methods (on a shared machine, load drifts; interleaving spreads it evenly):

- time runs: `warmup + steps` steps, the median of the measured ones (pooled over rounds);
- one memory run per method: two steps (the second one holds optimizer state, gradients and
  activations at once). On CPU the peak-RSS mark is reset (`/proc/self/clear_refs`) once the
  model is loaded, the method attached and every weight paged in (transformers may memory-map
  the checkpoint), so "peak increase" is training memory only; glibc's
  mmap threshold is pinned (`MALLOC_MMAP_THRESHOLD_`) so freed tensors leave RSS instead of
  fragmenting the heap (that would add hundreds of MiB of noise, and slow the time runs if done
  there). On GPU it is `torch.cuda.max_memory_allocated` above the allocation after setup.

LoRA's rank is chosen so its trainable count is as close as possible to SIFT's, on the same target
modules. Every method is built by the library's own functions (callbacks' `attach`, and the algorithms in
`sparse_lightning.methods`: SIFT selects with `select_by_gradient` on the first batch, SpIEL's cycle is
`PruneRegrow` run before every step as its callback runs it); selection happens before the memory mark
is reset, so its score buffers are not counted.

    python benchmarks/step_benchmark.py --model minilm --output benchmarks/results/cpu_minilm.md

A new method is one more entry in `METHODS`: a function that makes a loaded model
ready to train and returns it.
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


# ----------------------------------------------------------------------------------------- models


LossFn = Callable[[dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """A model, its real-data batches and the target modules every method trains.

    `load(spec, dtype)` returns the Hugging Face model, its task-head modules (trained densely by the
    sparse methods and LoRA alike) and `loss_for(model) -> loss function` for the model a method returns.
    """

    alias: str
    batch_size: int
    seq_len: int
    targets: tuple[str, ...]
    load: Callable[[ModelSpec, torch.dtype], tuple[nn.Module, tuple[str, ...], Callable[[nn.Module], LossFn]]]
    batches: Callable[[ModelSpec, int], list[dict[str, Tensor]]]


def through_module(module: Any, dtype: torch.dtype):
    """Load with the library's LightningModule; its `compute_loss` runs on whatever model a method returns."""

    def loss_for(model: nn.Module) -> LossFn:
        module.model = model
        return module.compute_loss

    model = module.build_model().to(dtype)  # also narrows module.head_modules to the ones this model has
    return model, tuple(module.head_modules), loss_for


def load_minilm(spec: ModelSpec, dtype: torch.dtype):
    from sparse_lightning.modules import SequenceClassificationModule

    return through_module(SequenceClassificationModule(model_name_or_path=spec.alias, num_labels=2), dtype)


def load_smollm2(spec: ModelSpec, dtype: torch.dtype):
    from sparse_lightning.modules import CausalLMModule

    return through_module(CausalLMModule(model_name_or_path=spec.alias, dtype=str(dtype).removeprefix("torch.")), dtype)


def sst2_batches(spec: ModelSpec, count: int) -> list[dict[str, Tensor]]:
    """The first `count * batch_size` SST-2 training sentences, padded to `seq_len` tokens."""
    from transformers import AutoTokenizer

    from sparse_lightning.models import resolve_model_path

    with open(REPO / "datamodules/bundled/glue/SST-2/train.tsv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[: count * spec.batch_size]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.alias))
    encoded = tokenizer([row["sentence"] for row in rows], padding="max_length", truncation=True,
                        max_length=spec.seq_len, return_tensors="pt")
    labels = torch.tensor([int(row["label"]) for row in rows])
    return [{"input_ids": encoded["input_ids"][i:i + spec.batch_size],
             "attention_mask": encoded["attention_mask"][i:i + spec.batch_size],
             "token_type_ids": encoded["token_type_ids"][i:i + spec.batch_size],
             "labels": labels[i:i + spec.batch_size]}
            for i in range(0, len(rows), spec.batch_size)]


def alpaca_batches(spec: ModelSpec, count: int) -> list[dict[str, Tensor]]:
    """Alpaca records (prompt + response + EOS) concatenated and cut into full `seq_len` rows; labels = inputs
    (the loss covers every token: packed rows have no prompt/response boundary to mask)."""
    from transformers import AutoTokenizer

    from datamodules.prompts import build_prompt
    from sparse_lightning.models import resolve_model_path

    records = json.loads((REPO / "datamodules/bundled/alpaca/alpaca_500.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.alias))
    needed = count * spec.batch_size * spec.seq_len
    stream: list[int] = []
    for record in records:
        stream += tokenizer(build_prompt(record) + record["output"])["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(f"the bundled Alpaca subset has {len(stream)} tokens; {needed} are needed")
    rows = torch.tensor(stream[:needed]).view(count, spec.batch_size, spec.seq_len)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in rows]


BERT_LINEARS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("all-MiniLM-L6-v2", 32, 128, BERT_LINEARS, load_minilm, sst2_batches),
    "smollm2": ModelSpec("SmolLM2-135M-Instruct", 4, 256, LLAMA_PROJECTIONS, load_smollm2, alpaca_batches),
}


# ---------------------------------------------------------------------------------------- methods


@dataclass
class Budget:
    """SIFT's budget (a density or a LoRA-rank-equivalent count) and the LoRA rank matched to it; a method may
    also pick its optimizer and a hook run inside every timed step before the forward (SpIEL's schedule)."""

    density: float | None
    sift_lora_rank: int | None
    notes: dict[str, Any] = field(default_factory=dict)
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW
    before_step: Callable[[int, torch.optim.Optimizer], None] | None = None
    calibration_batches: list[dict[str, Tensor]] = field(default_factory=list)  # what SIFT selects from
    loss_fn: LossFn | None = None


def target_shapes(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    from sparse_lightning.sparse import find_linear_targets

    return [tuple(linear.weight.shape) for linear in find_linear_targets(model, list(targets)).values()]


def matched_lora_rank(model: nn.Module, spec: ModelSpec, budget: Budget) -> int:
    """The rank whose LoRA count r * sum(out + in) is closest to SIFT's sum of k on the same targets."""
    from sparse_lightning.sparse import allocate_budget

    if budget.sift_lora_rank is not None:
        return budget.sift_lora_rank
    shapes = target_shapes(model, spec.targets)
    sift = sum(allocate_budget(shapes, density=budget.density))
    per_rank = sum(out + inp for out, inp in shapes)
    return max(1, min((int(sift / per_rank), int(sift / per_rank) + 1), key=lambda r: abs(r * per_rank - sift)))


def setup_full(model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget) -> nn.Module:
    model.requires_grad_(True)
    return model


def setup_lora(model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget) -> nn.Module:
    """As `SparseFineTuningModule.configure_model` does it: freeze, then PEFT on the targets (heads trained)."""
    from sparse_lightning.modules.lora import LoRASettings, apply_lora

    rank = matched_lora_rank(model, spec, budget)
    budget.notes["lora_rank"] = rank
    model.requires_grad_(False)
    return apply_lora(model, LoRASettings(r=rank, alpha=2 * rank), list(spec.targets), list(heads))


def setup_sift(model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget) -> nn.Module:
    """`GradientTopKCallback.attach` + `freeze_except(heads)`, then the real selection
    (`sparse_lightning.methods.select_by_gradient`) on one batch, outside the timed steps."""
    from sparse_lightning.callbacks import GradientTopKCallback
    from sparse_lightning.methods import select_by_gradient
    from sparse_lightning.sparse import freeze_except

    callback = GradientTopKCallback(density=None if budget.sift_lora_rank else budget.density,
                                    lora_rank=budget.sift_lora_rank, target_modules=list(spec.targets))
    callback.attach(model)
    freeze_except(model, heads)
    select_by_gradient(model, budget.calibration_batches, budget.loss_fn)
    return model


def setup_random_mask(model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget) -> nn.Module:
    """`RandomMaskCallback.attach` (SIFT's count, fixed random entries) + `freeze_except(heads)`."""
    from sparse_lightning.callbacks import RandomMaskCallback
    from sparse_lightning.sparse import freeze_except

    RandomMaskCallback(density=None if budget.sift_lora_rank else budget.density, lora_rank=budget.sift_lora_rank,
                       target_modules=list(spec.targets)).attach(model)
    freeze_except(model, heads)
    return model


def setup_spiel(model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget, regrowth: str) -> nn.Module:
    """`PruneRegrowCallback` with SIFT's count and the published cycle (S=20, A=5); its algorithm
    (`sparse_lightning.methods.PruneRegrow`) runs before every timed step as the callback runs it: a run of
    `warmup + steps` >= 25 steps holds the statistics windows and a reselection."""
    from sparse_lightning.callbacks import PruneRegrowCallback
    from sparse_lightning.sparse import allocate_budget, freeze_except, sparse_delta_layers
    from sparse_lightning.sparse.optim import SM3

    shapes = target_shapes(model, spec.targets)
    count = sum(allocate_budget(shapes, lora_rank=budget.sift_lora_rank) if budget.sift_lora_rank
                else allocate_budget(shapes, density=budget.density))
    callback = PruneRegrowCallback(num_params=count, target_modules=list(spec.targets), regrowth=regrowth,
                                   reselection_until=10**6)
    callback.attach(model)
    freeze_except(model, heads)
    if regrowth == "momentum":
        budget.optimizer = SM3
    layers = sparse_delta_layers(model)

    def before_step(step: int, optimizer: torch.optim.Optimizer) -> None:
        if step == 0:
            callback.cycle.start(layers, optimizer, next(model.parameters()).device)
        callback.cycle.before_step(layers, step, optimizer)

    budget.before_step = before_step
    return model


def setup_s2ft(model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget) -> nn.Module:
    """`S2FTStructureCallback(train=[down]).attach` (the paper's choice for grouped-query models) with as many
    FFN channels per layer as makes its block count closest to the matched LoRA's count on the targets; random
    selection (a step costs the same whichever channels are chosen); then `freeze_except(heads)`."""
    from sparse_lightning.callbacks import S2FTStructureCallback
    from sparse_lightning.sparse import freeze_except
    from sparse_lightning.structure import find_groups

    lora = matched_lora_rank(model, spec, budget) * sum(out + inp for out, inp in target_shapes(model, spec.targets))
    channel_groups = [g for g in find_groups(model) if g.kind == "channels"]
    per_channel = model.get_submodule(channel_groups[0].roles["down"]).out_features
    count = max(1, round(lora / (per_channel * len(channel_groups))))
    budget.notes["s2ft_channels"] = count
    S2FTStructureCallback(train=["down"], num_channels=count).attach(model)
    freeze_except(model, heads)
    return model


#: name -> function(model, spec, head_modules, budget) returning the model ready to train.
METHODS: dict[str, Callable[[nn.Module, ModelSpec, tuple[str, ...], Budget], nn.Module]] = {
    "full": setup_full,
    "lora": setup_lora,
    "sift": setup_sift,
    "random_mask": setup_random_mask,
    "spiel_ag": lambda *args: setup_spiel(*args, regrowth="gradient"),
    "spiel_ma": lambda *args: setup_spiel(*args, regrowth="momentum"),
    "s2ft": setup_s2ft,
}


# ----------------------------------------------------------------------------------------- worker


def proc_status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM, which ru_maxrss reports) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as error:
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): Linux >= 4.0 is needed") from error


def tensor_bytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, Tensor) else 0


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Load, attach `args.method`, train `warmup + steps` steps; report times (or the memory peak)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = MODELS[args.model]
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in spec.batches(spec, args.warmup + args.steps)]

    model, heads, loss_for = spec.load(spec, getattr(torch, args.dtype))
    model = model.to(device)
    budget = Budget(args.density, args.sift_lora_rank, calibration_batches=batches[:1], loss_fn=loss_for(model))
    model = METHODS[args.method](model, spec, heads, budget).to(device)
    loss_fn = loss_for(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = budget.optimizer(params, lr=args.lr)

    with torch.no_grad():  # weights may be memory-mapped from the checkpoint: page them in now, not in step 1
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.sum()
    torch.manual_seed(0)  # the same dropout masks for every method, whatever its setup drew
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        after_setup = torch.cuda.memory_allocated()
    else:
        after_setup = proc_status_kib("VmRSS") * 1024
        reset_peak_rss()

    profiler = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        profiler = profile(activities=activities, record_shapes=True,
                           schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1))
        profiler.start()

    times, cpu_times, losses = [], [], []
    for step, batch in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        if budget.before_step is not None:
            budget.before_step(step, optimizer)
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
        if profiler is not None:
            profiler.step()

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result: dict[str, Any] = {
        **budget.notes,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "optimizer_state_bytes": sum(tensor_bytes(v) for state in optimizer.state.values() for v in state.values()),
        "step_times_s": times[args.warmup:], "cpu_times_s": cpu_times[args.warmup:],
        "warmup_times_s": times[: args.warmup], "losses": losses,
        "peak_increase_bytes": peak - after_setup, "peak_abs_bytes": peak, "after_setup_bytes": after_setup,
    }
    if profiler is not None:
        profiler.stop()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        result["profile"] = profiler.key_averages().table(sort_by=sort, row_limit=args.profile_rows,
                                                          max_name_column_width=48)
        result["profile_mm"] = matmuls_by_shape(profiler, sort, args.steps)
    return result


def matmuls_by_shape(profiler: Any, sort: str, steps: int) -> str:
    """`aten::mm` grouped by operand shapes, per step: tells forward, input-grad, weight-grad and
    adapter GEMMs apart (a weight gradient is [out, tokens] @ [tokens, in])."""
    rows = [e for e in profiler.key_averages(group_by_input_shape=True) if e.key == "aten::mm"]
    rows.sort(key=lambda e: getattr(e, sort), reverse=True)
    lines = ["| operands | calls/step | ms/step |", "|---|---:|---:|"]
    lines += [f"| {' @ '.join(str(list(shape)) for shape in e.input_shapes[:2])} | {e.count / steps:g} "
              f"| {getattr(e, sort) / 1e3 / steps:,.1f} |" for e in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- driver


def worker(args: argparse.Namespace, model: str, method: str, measure: str) -> dict[str, Any]:
    """One worker in a fresh interpreter; it prints its result as the last line of stdout."""
    steps, warmup = (1, 1) if measure == "memory" else (args.steps, args.warmup)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--methods", method,
               "--steps", str(steps), "--warmup", str(warmup), "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads), "--lr", str(args.lr), "--density", str(args.density)]
    if args.sift_lora_rank is not None:
        command += ["--sift-lora-rank", str(args.sift_lora_rank)]
    if args.profile and measure == "time":
        command += ["--profile", "--profile-rows", str(args.profile_rows)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    if measure == "memory":
        env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    completed = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{model}/{method} ({measure} run) failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def benchmark(args: argparse.Namespace, model: str, methods: list[str]) -> list[dict[str, Any]]:
    """Memory runs, then `repeats` interleaved rounds of time runs; one merged result per method."""
    results = {}
    for method in methods:
        memory = worker(args, model, method, "memory")
        kept = {k: v for k, v in memory.items() if k not in ("step_times_s", "cpu_times_s", "warmup_times_s", "losses")}
        results[method] = {"model": model, "method": method, **kept, "step_times_s": [], "cpu_times_s": [],
                           "round_medians_s": []}
        log(f"[{model}/{method}] peak +{memory['peak_increase_bytes'] / MIB:,.0f} MiB")
    for round_ in range(args.repeats):
        for method in methods:
            timed = worker(args, model, method, "time")
            result = results[method]
            result["step_times_s"] += timed["step_times_s"]
            result["cpu_times_s"] += timed["cpu_times_s"]
            result["round_medians_s"].append(statistics.median(timed["step_times_s"]))
            result["losses"] = timed["losses"]
            if "profile" in timed:
                result["profile"], result["profile_mm"] = timed["profile"], timed["profile_mm"]
            log(f"[{model}/{method}] round {round_ + 1}: median step {result['round_medians_s'][-1]:.3f} s")
    for result in results.values():
        result["median_step_s"] = statistics.median(result["step_times_s"])
        result["median_cpu_s"] = statistics.median(result["cpu_times_s"])
        result["mean_cpu_s"] = statistics.mean(result["cpu_times_s"])  # SpIEL's windows are a quarter of its steps
    return list(results.values())


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ratio(value: float, reference: dict[str, Any] | None, key: str) -> str:
    return f"{value / reference[key]:.2f}x" if reference and reference[key] > 0 else "-"


def markdown_table(model: str, results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One row per method; ratios to LoRA and to full FT. CPU time is the process's own (time.process_time):
    on a shared machine it is far steadier than wall time, and with one thread it is the step's work."""
    spec = MODELS[model]
    by_name = {r["method"]: r for r in results}
    lora, full = by_name.get("lora"), by_name.get("full")
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    rounds = f" x {args.repeats} interleaved rounds" if args.repeats > 1 else ""
    lines = [
        f"**{spec.alias}**: batch {spec.batch_size} x {spec.seq_len} tokens, {args.device}, {args.dtype}, "
        f"{args.threads} thread(s); step = forward + backward + AdamW step, median of {args.steps} steps "
        f"after {args.warmup} warmup{rounds}",
        "",
    ]
    columns = [("median_step_s", "wall s/step", "{:.3f}"), ("median_cpu_s", "CPU s/step", "{:.3f}"),
               ("mean_cpu_s", "mean CPU s/step", "{:.3f}"),
               ("peak_increase_bytes", f"{memory} increase (MiB)", "{:,.0f}")]
    if args.device == "cuda":  # host CPU time says nothing about GPU work
        columns = [column for column in columns if "cpu" not in column[0]]
    header = ["method", "trainable params"] + [h for _, title, _ in columns for h in (title, "vs LoRA", "vs full")]
    header += ["absolute peak (MiB)", "optimizer state (MiB)"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in results:
        name = r["method"] + (f" (r={r['lora_rank']})" if "lora_rank" in r else "")
        name += f" ({r['s2ft_channels']} channels/layer)" if "s2ft_channels" in r else ""
        cells = [name, f"{r['trainable_params']:,}"]
        for key, _, fmt in columns:
            scale = MIB if key.endswith("bytes") else 1
            cells += [fmt.format(r[key] / scale), ratio(r[key], lora, key), ratio(r[key], full, key)]
        cells += [f"{r['peak_abs_bytes'] / MIB:,.0f}", f"{r['optimizer_state_bytes'] / MIB:,.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    first = {r["method"]: round(r["losses"][0], 5) for r in results}
    same = "identical" if len(set(first.values())) == 1 else "DIFFERENT"
    lines += ["", f"First-step loss (zero-initialised deltas/adapters, same batch and dropout): {same} {first}."]
    if args.repeats > 1:
        lines.append("Per-round wall medians (s): " + "; ".join(
            f"{r['method']} " + ", ".join(f"{m:.2f}" for m in r["round_medians_s"]) for r in results) + ".")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all", choices=[*MODELS, "all"])
    parser.add_argument("--methods", default="full,lora,sift", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per time run")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps before them")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of time runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight and compute dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--density", type=float, default=0.01, help="SIFT density per target weight")
    parser.add_argument("--sift-lora-rank", type=int, default=None,
                        help="give SIFT a LoRA-rank budget instead of --density (LoRA then uses this rank)")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over the measured steps: top ops, and matmuls by shape")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown table path (a .json with raw numbers beside it)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(argparse.Namespace(**vars(args), method=args.methods))))
        return
    models = list(MODELS) if args.model == "all" else [args.model]
    all_results = {model: benchmark(args, model, args.methods.split(",")) for model in models}
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {platform.machine()} "
              f"{os.cpu_count()} cores, command: `python {' '.join(sys.argv)}`")
    tables = "\n\n".join(markdown_table(model, results, args) for model, results in all_results.items())
    profiles = "\n\n".join(f"### profile {r['model']}/{r['method']} (last round)\n\n```\n{r['profile']}```\n\n"
                           f"aten::mm by operand shapes:\n\n{r['profile_mm']}"
                           for results in all_results.values() for r in results if "profile" in r)
    print(f"{header}\n\n{tables}" + (f"\n\n{profiles}" if profiles else ""))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"{header}\n\n{tables}\n" + (f"\n{profiles}\n" if profiles else ""))
        args.output.with_suffix(".json").write_text(json.dumps(
            {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, "results": all_results}, indent=1))


if __name__ == "__main__":
    main()
