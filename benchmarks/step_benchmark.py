"""Step time, peak memory, trainable parameters and optimizer state: the floor, full FT, PEFT LoRA and SHiRA, the
sparse methods.

The **floor** is the same model and batch with every weight frozen and a backward that computes input gradients
only, through every layer (what any method that trains every layer must pay); every other time is read against it.

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
  there). On GPU it is `torch.cuda.max_memory_allocated` above the allocation after setup, read from the time
  run itself (no separate memory run).
- SpIEL's time runs always cover exactly one reselection cycle (see `run_lengths`); read their mean;
- `--interleave`: the time runs of every method in one process, stepping in turn with the floor, so load on a
  shared machine falls on every method alike and each step has a floor step beside it (`run_interleaved`);
- `--in-process` (GPU): every run in the driver process.

LoRA's rank is chosen so its trainable count is as close as possible to SIFT's, on the same target
modules; SHiRA (PEFT's) and every element-sparse method train exactly SIFT's k per target weight. Every method is
built by the library's own functions (`prepare_model`, and the algorithms in `sparse_lightning.methods`: SIFT selects with `select_by_gradient` on the first batch, SpIEL's cycle is
`PruneRegrow` run before every step as its callback runs it); selection happens before the memory mark
is reset, so its score buffers are not counted.

    python benchmarks/step_benchmark.py --model smollm2 --methods all --threads 1 --interleave \
        --output benchmarks/results/cpu_smollm2_floor_interleaved.md

Every method of `sparse_lightning.registry` runs here as the library prepares it (`prepare_model`), at the budget
`library_method` gives its kind; the floor and PEFT's SHiRA are this benchmark's own rows (`OWN_METHODS`).
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
from dataclasses import dataclass, field, replace
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
    """A model, its batches and the target modules every method trains.

    `load(spec, dtype, device)` returns the Hugging Face model, its task-head modules (trained densely by the
    sparse methods, LoRA and SHiRA alike) and `loss_for(model) -> loss function` for the model a method returns.
    `config` is the architecture of a model built from a config with random weights (None: pretrained weights).
    """

    alias: str
    batch_size: int
    seq_len: int
    targets: tuple[str, ...]
    load: Callable[[ModelSpec, torch.dtype, torch.device],
                   tuple[nn.Module, tuple[str, ...], Callable[[nn.Module], LossFn]]]
    batches: Callable[[ModelSpec, int], list[dict[str, Tensor]]]
    config: dict[str, Any] | None = None


def through_module(module: Any, dtype: torch.dtype):
    """Load with the library's LightningModule; its `compute_loss` runs on whatever model a method returns."""

    def loss_for(model: nn.Module) -> LossFn:
        module.model = model
        return module.compute_loss

    model = module.build_model().to(dtype)  # also narrows module.head_modules to the ones this model has
    return model, tuple(module.head_modules), loss_for


def load_minilm(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    from sparse_lightning.modules import SequenceClassificationModule

    return through_module(SequenceClassificationModule(model_name_or_path=spec.alias, num_labels=2), dtype)


def load_smollm2(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    from sparse_lightning.modules import CausalLMModule

    return through_module(CausalLMModule(model_name_or_path=spec.alias, dtype=str(dtype).removeprefix("torch.")), dtype)


def load_llama_from_config(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """A LLaMA built from `spec.config` with random weights, directly on `device` (speed does not depend on the
    values); the loss is `CausalLMModule.compute_loss`, as for SmolLM2."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparse_lightning.modules import CausalLMModule

    class FromConfig(CausalLMModule):
        def build_model(self) -> nn.Module:
            torch.manual_seed(0)
            with torch.device(device):
                return AutoModelForCausalLM.from_config(LlamaConfig(**spec.config), dtype=dtype)

    return through_module(FromConfig(model_name_or_path=spec.alias), dtype)


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
    (the loss covers every token: packed rows have no prompt/response boundary to mask). The 500 bundled records
    hold ~55k SmolLM2 tokens; a run that needs more (large GPU batches, SpIEL's 26 steps) repeats the stream,
    which changes no cost."""
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
    stream *= -(-needed // len(stream))  # repeat when short
    rows = torch.tensor(stream[:needed]).view(count, spec.batch_size, spec.seq_len)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in rows]


def random_token_batches(spec: ModelSpec, count: int) -> list[dict[str, Tensor]]:
    """Uniformly random token ids (seeded) for a model with random weights; labels = inputs."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(spec.config["vocab_size"], (count, spec.batch_size, spec.seq_len), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in rows]


BERT_LINEARS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Llama-3.2-1B's shapes (16 layers, hidden 2048, FFN 8192, 32 query / 8 KV heads, 128,256-token tied vocabulary:
#: 1.24B parameters), random weights.
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
            "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "attention_dropout": 0.0}
#: The same architecture at toy size: the CPU dry run of the GPU script and tests/test_benchmark_methods.py.
LLAMA_TINY = {**LLAMA_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}

MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("all-MiniLM-L6-v2", 32, 128, BERT_LINEARS, load_minilm, sst2_batches),
    "smollm2": ModelSpec("SmolLM2-135M-Instruct", 4, 256, LLAMA_PROJECTIONS, load_smollm2, alpaca_batches),
    "llama1b": ModelSpec("LLaMA-shaped 1.24B (Llama-3.2-1B config, random weights)", 4, 1024, LLAMA_PROJECTIONS,
                         load_llama_from_config, random_token_batches, LLAMA_1B),
    "llama_tiny": ModelSpec("tiny LLaMA (random weights)", 2, 32, LLAMA_PROJECTIONS, load_llama_from_config,
                            random_token_batches, LLAMA_TINY),
}
#: What `--model all` runs (the CPU tables of record).
DEFAULT_MODELS = ("minilm", "smollm2")


# ---------------------------------------------------------------------------------------- methods


@dataclass
class Budget:
    """SIFT's budget (a density or a LoRA-rank-equivalent count) and the LoRA rank matched to it; a method may
    also pick its optimizer (None: nothing trains, no optimizer step) and a hook run inside every timed step before
    the forward (SpIEL's schedule)."""

    density: float | None
    sift_lora_rank: int | None
    notes: dict[str, Any] = field(default_factory=dict)
    optimizer: Callable[..., torch.optim.Optimizer] | None = torch.optim.AdamW
    before_step: Callable[[int, torch.optim.Optimizer], None] | None = None
    calibration_batches: list[dict[str, Tensor]] = field(default_factory=list)  # what SIFT selects from
    loss_fn: LossFn | None = None


def target_shapes(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    from sparse_lightning.sparse import find_linear_targets

    return [tuple(linear.weight.shape) for linear in find_linear_targets(model, list(targets)).values()]


def sift_counts(model: nn.Module, spec: ModelSpec, budget: Budget) -> dict[str, int]:
    """SIFT's k per target weight (module name -> k), as its callback allocates them."""
    from sparse_lightning.sparse import allocate_budget, find_linear_targets

    linears = find_linear_targets(model, list(spec.targets))
    shapes = [tuple(linear.weight.shape) for linear in linears.values()]
    counts = (allocate_budget(shapes, lora_rank=budget.sift_lora_rank) if budget.sift_lora_rank
              else allocate_budget(shapes, density=budget.density))
    return dict(zip(linears, counts))


def matched_lora_rank(model: nn.Module, spec: ModelSpec, budget: Budget) -> int:
    """The rank whose LoRA count r * sum(out + in) is closest to SIFT's sum of k on the same targets."""
    from sparse_lightning.sparse import allocate_budget

    if budget.sift_lora_rank is not None:
        return budget.sift_lora_rank
    shapes = target_shapes(model, spec.targets)
    sift = sum(allocate_budget(shapes, density=budget.density))
    per_rank = sum(out + inp for out, inp in shapes)
    return max(1, min((int(sift / per_rank), int(sift / per_rank) + 1), key=lambda r: abs(r * per_rank - sift)))


def setup_floor(model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget) -> nn.Module:
    """Every weight frozen (heads too), and the input embeddings' output made a leaf that requires grad (a forward
    hook, what HF's `enable_input_require_grads` does): every later activation then requires grad, so
    `loss.backward()` runs the backward of every layer (attention, norms, MLP, the tied LM head, the loss) but,
    with no parameter requiring grad, autograd asks each op for its input gradient only: no weight-gradient GEMM,
    no embedding-gradient scatter, no optimizer step. The one thing a method training every layer would not need
    is the first layer's own input gradient (its q/k/v and first norm backward: ~1/(7 x layers) of the
    input-gradient GEMMs), so the floor is a slight over-estimate of the minimum, never an under-estimate
    of what such a method pays."""
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    budget.optimizer = None
    return model


def library_method(name: str, model: nn.Module, spec: ModelSpec, budget: Budget) -> Any:
    """The registry method `name` at the benchmark's budget, as `prepare_model` takes it: element-sparse methods train
    SIFT's k per target weight (SpIEL as one global count, with the published cycle S=20, A=5), S2FT as many down
    channels per layer as makes its count closest to the matched LoRA's (the paper's choice for grouped-query
    models; random selection: a step costs the same whichever channels are chosen), LoRA the matched rank on the
    same targets; full fine-tuning is None."""
    from sparse_lightning.modules.prepare import method_from_name
    from sparse_lightning.registry import method
    from sparse_lightning.structure import find_groups

    row, targets = method(name), list(spec.targets)
    if row.element_sparse and row.reselects:
        count = sum(sift_counts(model, spec, budget).values())
        return method_from_name(name, num_params=count, target_modules=targets, reselection_until=10**6)
    if row.element_sparse:
        return method_from_name(name, density=None if budget.sift_lora_rank else budget.density,
                                lora_rank=budget.sift_lora_rank, target_modules=targets)
    rank = matched_lora_rank(model, spec, budget)
    if row.structured:
        lora = rank * sum(out + inp for out, inp in target_shapes(model, spec.targets))
        channel_groups = [g for g in find_groups(model) if g.kind == "channels"]
        per_channel = model.get_submodule(channel_groups[0].roles["down"]).out_features
        budget.notes["s2ft_channels"] = max(1, round(lora / (per_channel * len(channel_groups))))
        return method_from_name(name, train=["down"], num_channels=budget.notes["s2ft_channels"])
    if row.sparse:
        raise ValueError(f"{name}: the step benchmark has no budget rule for this kind of method yet")
    if name == "lora":
        budget.notes["lora_rank"] = rank
        return method_from_name(name, r=rank, alpha=2 * rank, target_modules=targets)
    return method_from_name(name)


def setup_library_method(name: str, model: nn.Module, spec: ModelSpec, heads: tuple[str, ...],
                         budget: Budget) -> nn.Module:
    """`prepare_model` (what trains, as `sparse-lightning fit` decides it), then what the method's callback would run
    at the start of training: SIFT's selection (`select_by_gradient`) on one batch and SpIEL's cycle
    (`PruneRegrow`, before every timed step), outside and inside the timed steps as under a Trainer."""
    from sparse_lightning.methods import select_by_gradient
    from sparse_lightning.modules.prepare import prepare_model
    from sparse_lightning.registry import method
    from sparse_lightning.sparse import sparse_delta_layers

    row = method(name)
    callback = library_method(name, model, spec, budget)
    model = prepare_model(model, callback, heads=heads)
    budget.optimizer = row.optimizer_class()
    if row.element_sparse and row.data_driven:
        select_by_gradient(model, budget.calibration_batches, budget.loss_fn)
    if row.reselects:
        layers = sparse_delta_layers(model)

        def before_step(step: int, optimizer: torch.optim.Optimizer) -> None:
            if step == 0:
                callback.cycle.start(layers, optimizer, next(model.parameters()).device)
            callback.cycle.before_step(layers, step, optimizer)

        budget.before_step = before_step
    return model


def setup_shira(model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget) -> nn.Module:
    """PEFT's own SHiRA (`ShiraConfig` + `get_peft_model`, its random mask, its forward and backward) on the same
    targets, heads in `modules_to_save`, with exactly SIFT's k entries per target weight.

    PEFT sizes SHiRA like LoRA: r * (out + in) entries per weight, and refuses a mask of any other size. With a
    LoRA-rank budget (`--sift-lora-rank r`) that is SIFT's count already and PEFT builds it as is. With a density
    budget (1% of each weight) no integer r gives SIFT's per-weight k, so SHiRA is built at the matched LoRA rank
    and each layer's `shira_indices` / `shira_weight` are then redrawn at SIFT's k (uniformly random positions, as
    PEFT's `random_mask` draws them, zero values): the training step that runs is PEFT's code, unchanged."""
    from peft import ShiraConfig, get_peft_model
    from peft.tuners.shira.layer import ShiraLayer

    counts = sift_counts(model, spec, budget)
    rank = matched_lora_rank(model, spec, budget)
    linears = {id(model.get_submodule(name)): k for name, k in counts.items()}
    model.requires_grad_(False)
    config = ShiraConfig(r=rank, target_modules=list(spec.targets), modules_to_save=list(heads) or None,
                         random_seed=0)
    model = get_peft_model(model, config)
    generator, redrawn = torch.Generator().manual_seed(0), 0
    layers = [m for m in model.modules() if isinstance(m, ShiraLayer)]
    for layer in layers:
        k = linears[id(layer.get_base_layer())]
        weight = layer.shira_weight["default"]
        if weight.numel() != k:
            flat = torch.randperm(layer.out_features * layer.in_features, generator=generator)[:k]
            layer.shira_indices["default"] = torch.stack([flat // layer.in_features, flat % layer.in_features]).to(
                dtype=layer.shira_indices["default"].dtype, device=weight.device)
            layer.shira_weight["default"] = nn.Parameter(torch.zeros(k, dtype=weight.dtype, device=weight.device))
            redrawn += 1
    if len(layers) != len(counts):
        raise RuntimeError(f"PEFT SHiRA adapted {len(layers)} layers, SIFT targets {len(counts)}")
    budget.notes["shira"] = f"PEFT r={rank}" + (f", {redrawn} of {len(layers)} layers resized to SIFT's k" if redrawn
                                               else ": PEFT's own count is SIFT's")
    return model


#: The benchmark's own rows (the floor, PEFT's SHiRA): name -> function(model, spec, head_modules, budget) returning
#: the model ready to train. Every method of `sparse_lightning.registry` runs too (`setup_library_method`).
OWN_METHODS: dict[str, Callable[[nn.Module, ModelSpec, tuple[str, ...], Budget], nn.Module]] = {
    "floor": setup_floor,
    "shira": setup_shira,
}


def method_names() -> list[str]:
    """Every method this benchmark runs: its own rows, then the registry's."""
    from sparse_lightning.registry import METHODS

    return [*OWN_METHODS, *METHODS]


def setup(name: str, model: nn.Module, spec: ModelSpec, heads: tuple[str, ...], budget: Budget) -> nn.Module:
    if name in OWN_METHODS:
        return OWN_METHODS[name](model, spec, heads, budget)
    return setup_library_method(name, model, spec, heads, budget)


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


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """`MODELS[args.model]`, with `--batch-size` / `--seq-len` when given."""
    spec = MODELS[args.model]
    return replace(spec, batch_size=args.batch_size or spec.batch_size, seq_len=args.seq_len or spec.seq_len)


@dataclass
class Prepared:
    """A method ready to train: its model, loss, optimizer (None for the floor) and budget (hooks, notes)."""

    method: str
    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer | None
    budget: Budget
    params: list[nn.Parameter]


def prepare(args: argparse.Namespace, method: str, spec: ModelSpec, batches: list[dict[str, Tensor]],
            device: torch.device) -> Prepared:
    """Load the model, attach `method` (SIFT selects on the first batch here), build its optimizer, page every
    weight in."""
    torch.manual_seed(0)
    model, heads, loss_for = spec.load(spec, getattr(torch, args.dtype), device)
    model = model.to(device)
    budget = Budget(args.density, args.sift_lora_rank, calibration_batches=batches[:1], loss_fn=loss_for(model))
    model = setup(method, model, spec, heads, budget).to(device)
    if getattr(args, "quantize", None):  # as the module does: after the method attached, heads and LM head kept
        from sparse_lightning.sparse.quantized import quantize_frozen_linears

        quantize_frozen_linears(model, args.quantize, keep=(*heads, "lm_head"))
    if getattr(args, "gradient_checkpointing", False):
        from sparse_lightning.modes import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    loss_fn = loss_for(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = budget.optimizer(params, lr=args.lr) if budget.optimizer is not None else None
    with torch.no_grad():  # weights may be memory-mapped from the checkpoint: page them in now, not in step 1
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.sum()
    return Prepared(method, model, loss_fn, optimizer, budget, params)


def train_step(prepared: Prepared, step: int, batch: dict[str, Tensor], device: torch.device) -> float:
    """One timed step: SpIEL's schedule (if any), forward, backward, optimizer step, zero_grad."""
    if prepared.budget.before_step is not None:
        prepared.budget.before_step(step, prepared.optimizer)
    loss = prepared.loss_fn(batch)
    loss.backward()
    if prepared.optimizer is not None:
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.detach()


def describe(prepared: Prepared) -> dict[str, Any]:
    optimizer = prepared.optimizer
    state = optimizer.state.values() if optimizer is not None else []
    from sparse_lightning.sparse.quantized import QuantizedLinear

    model = prepared.model
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return {
        **prepared.budget.notes,
        "trainable_params": sum(p.numel() for p in prepared.params),
        "total_params": sum(p.numel() for p in model.parameters()) + quantized,
        "weight_bytes": sum(tensor_bytes(t) for t in itertools.chain(model.parameters(), model.buffers())),
        "optimizer_state_bytes": sum(tensor_bytes(v) for per_param in state for v in per_param.values()),
    }


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Load, attach `args.method`, train `warmup + steps` steps; report times (or the memory peak)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = model_spec(args)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in spec.batches(spec, args.warmup + args.steps)]
    prepared = prepare(args, args.method, spec, batches, device)
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
        loss = train_step(prepared, step, batch, device)
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
        **describe(prepared),
        "step_times_s": times[args.warmup:], "cpu_times_s": cpu_times[args.warmup:],
        "warmup_times_s": times[: args.warmup], "losses": losses,
        "peak_increase_bytes": peak - after_setup, "peak_abs_bytes": peak, "after_setup_bytes": after_setup,
    }
    if profiler is not None:
        profiler.stop()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = profiler.key_averages()
        result["profile"] = averages.table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=48)
        result["profile_ops"] = {e.key: [getattr(e, sort) / 1e3 / args.steps, e.count / args.steps]
                                 for e in averages}  # op -> [self ms/step, calls/step]
        result["profile_mm"] = matmuls_by_shape(profiler, sort, args.steps)
    return result


def spiel_step_kind(step: int) -> str:
    """'window' (statistics observed), 'reselect' (slots move before this step) or 'plain', on the published cycle."""
    from sparse_lightning.methods.reselection_schedule import ReselectionSchedule

    schedule = ReselectionSchedule()
    return "reselect" if schedule.reselects_at(step) else "window" if schedule.in_window(step) else "plain"


def interleaved_lengths(args: argparse.Namespace, method: str) -> tuple[int, int]:
    """(steps, warmup) in `--interleave` mode. SpIEL: warmup 1, then steps 1..9 of its first cycle: four window
    steps (1-4), the reselection before step 5 (the first one, which replaces every slot: dearer than the later 20%
    ones, so the estimate errs high) and four plain steps (6-9); `amortised_cycle` weighs them as one cycle does."""
    return (9, 1) if reselects(method) else (args.steps, args.warmup)


def amortised_cycle(times: list[float], kinds: list[str]) -> float:
    """One published cycle (S=20, A=5) from measured step kinds: (A window + (S - A) plain + the reselection's extra
    over a plain step) / S."""
    from sparse_lightning.methods.reselection_schedule import ReselectionSchedule

    schedule = ReselectionSchedule()
    by_kind = {kind: [t for t, k in zip(times, kinds) if k == kind] for kind in ("window", "plain", "reselect")}
    window, plain = statistics.median(by_kind["window"]), statistics.median(by_kind["plain"])
    extra = statistics.mean(by_kind["reselect"]) - plain
    a, s = schedule.accumulation_steps, schedule.interval
    return (a * window + (s - a) * plain + extra) / s


def run_interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Every method of `args.methods` in this process, each with its own model, stepping in turn: step 0 of every
    method, then step 1 of every method, and so on (the floor steps in every round). Load on a shared machine then
    falls on every method alike, and each step has a floor step beside it: `paired_floor_cpu_s` holds, per measured
    step, the floor's CPU time in the same round. Same batch and dropout seed for every method at each step."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = model_spec(args)
    methods = args.methods.split(",")
    if methods[0] != "floor":
        methods = ["floor"] + [m for m in methods if m != "floor"]
    lengths = {m: interleaved_lengths(args, m) for m in methods}
    rounds = max(steps + warmup for steps, warmup in lengths.values())
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in spec.batches(spec, rounds)]
    prepared = {}
    for method in methods:
        prepared[method] = prepare(args, method, spec, batches, device)
        log(f"[{args.model}/{method}] ready")
    gc.collect()
    records: dict[str, dict[str, list[Any]]] = {m: {"wall": [], "cpu": [], "loss": []} for m in methods}
    for step in range(rounds):
        for method in methods:
            steps, warmup = lengths[method]
            if step >= steps + warmup and method != "floor":
                continue
            torch.manual_seed(step)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = train_step(prepared[method], step, batches[step], device)
            records[method]["wall"].append(time.perf_counter() - start)
            records[method]["cpu"].append(time.process_time() - cpu_start)
            records[method]["loss"].append(loss.item())
        log(f"[{args.model}] round {step + 1}/{rounds}: " + ", ".join(
            f"{m} {records[m]['cpu'][-1]:.2f}" for m in methods if len(records[m]["cpu"]) == step + 1))
    results = {}
    floor_cpu, floor_wall = records["floor"]["cpu"], records["floor"]["wall"]
    for method in methods:
        steps, warmup = lengths[method]
        measured = range(warmup, steps + warmup)
        result = {**describe(prepared[method]), "losses": records[method]["loss"],
                  "step_times_s": records[method]["wall"][warmup:steps + warmup],
                  "cpu_times_s": records[method]["cpu"][warmup:steps + warmup],
                  "warmup_times_s": records[method]["wall"][:warmup],
                  "paired_floor_cpu_s": [floor_cpu[i] for i in measured],
                  "paired_floor_step_s": [floor_wall[i] for i in measured]}
        if reselects(method):
            kinds = [spiel_step_kind(i) for i in measured]
            result["step_kinds"] = kinds
            result["amortised_cpu_s"] = amortised_cycle(result["cpu_times_s"], kinds)
            result["amortised_step_s"] = amortised_cycle(result["step_times_s"], kinds)
        results[method] = result
    return results


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

def reselects(method: str) -> bool:
    """Whether the method's cost changes along a reselection cycle: its time runs cover exactly one cycle (read the
    mean)."""
    from sparse_lightning.registry import METHODS

    return method in METHODS and METHODS[method].reselects


def run_lengths(args: argparse.Namespace, method: str, measure: str) -> tuple[int, int]:
    """(steps, warmup) of one run. A memory run is two steps. SpIEL's time run measures exactly one cycle of its
    published schedule (S=20, A=5): warmup A + 1 = 6 steps (the first, full reselection at step 5 stays in warmup),
    then S = 20 measured steps, 6..25: five statistics-window steps (20-24, dense weight gradient observed) and the
    reselection before step 25 (a typical one, 20% of the slots), so their mean is the amortised cost. Profiled
    (`--profile`), SpIEL runs steps 1-5 only: four window steps and the (first) reselection, what SIFT lacks."""
    if measure == "memory":
        return 1, 1
    if reselects(method) and args.profile:  # profiled: steps 1-5, four window steps and the first reselection
        return 5, 1
    if reselects(method):
        from sparse_lightning.methods.reselection_schedule import ReselectionSchedule

        schedule = ReselectionSchedule()
        return schedule.interval, max(args.warmup, schedule.accumulation_steps + 1)
    return args.steps, args.warmup


def interleaved_worker(args: argparse.Namespace, model: str, methods: list[str]) -> dict[str, Any]:
    """One `run_interleaved` in a fresh interpreter: method -> result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--interleave", "--model", model,
               "--methods", ",".join(methods), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--lr", str(args.lr),
               "--density", str(args.density)]
    for flag, value in (("--sift-lora-rank", args.sift_lora_rank), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len)):
        if value is not None:
            command += [flag, str(value)]
    command += base_flags(args)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    completed = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{model} (interleaved time run) failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def base_flags(args: argparse.Namespace) -> list[str]:
    """`--quantize` and `--gradient-checkpointing`, as a worker subprocess gets them."""
    return ([f"--quantize={args.quantize}"] if getattr(args, "quantize", None) else []) + \
        (["--gradient-checkpointing"] if getattr(args, "gradient_checkpointing", False) else [])


def worker(args: argparse.Namespace, model: str, method: str, measure: str) -> dict[str, Any]:
    """One run, in a fresh interpreter (it prints its result as the last line of stdout), or with `--in-process`
    in this one (GPU: peaks are `max_memory_allocated` above the allocation after setup, so earlier runs that were
    freed do not count; saves ~10 s of imports per run)."""
    steps, warmup = run_lengths(args, method, measure)
    if args.in_process:
        run_args = argparse.Namespace(**{**vars(args), "model": model, "method": method, "steps": steps,
                                         "warmup": warmup, "profile": args.profile and measure == "time"})
        try:
            return run_worker(run_args)
        finally:
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--methods", method,
               "--steps", str(steps), "--warmup", str(warmup), "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads), "--lr", str(args.lr), "--density", str(args.density)]
    for flag, value in (("--sift-lora-rank", args.sift_lora_rank), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len)):
        if value is not None:
            command += [flag, str(value)]
    command += base_flags(args)
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


TIMES = ("step_times_s", "cpu_times_s", "warmup_times_s", "losses", "paired_floor_cpu_s", "paired_floor_step_s",
         "step_kinds")  # per-step lists, pooled over rounds
PEAKS = ("peak_increase_bytes", "peak_abs_bytes", "after_setup_bytes")


def benchmark(args: argparse.Namespace, model: str, methods: list[str]) -> list[dict[str, Any]]:
    """Memory runs (CPU only), then `repeats` interleaved rounds of time runs; one merged result per method.
    On GPU the peak comes from the first round's time run."""
    results: dict[str, dict[str, Any]] = {}
    separate_memory = args.device != "cuda"
    failed: dict[str, str] = {}

    def attempt(method: str, measure: str) -> dict[str, Any] | None:
        """One run; a failure is recorded (and the method skipped from then on) when `--keep-going`."""
        if method in failed:
            return None
        try:
            return worker(args, model, method, measure)
        except Exception as error:  # noqa: BLE001 - reported in the table
            if not args.keep_going:
                raise
            failed[method] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log(f"[{model}/{method}] FAILED ({measure} run): {failed[method]}")
            return None

    for method in methods if separate_memory and not args.no_memory else []:
        memory = attempt(method, "memory")
        if memory is None:
            continue
        results[method] = {"model": model, "method": method, **{k: v for k, v in memory.items() if k not in TIMES}}
        log(f"[{model}/{method}] peak +{memory['peak_increase_bytes'] / MIB:,.0f} MiB")
    for round_ in range(0 if getattr(args, "memory_only", False) else args.repeats):
        if args.interleave:
            timed_all = interleaved_worker(args, model, methods)
        for method in methods:
            timed = timed_all.get(method) if args.interleave else attempt(method, "time")
            if timed is None:
                continue
            if method not in results:  # on CPU a time run's peak is not a memory measurement: drop it
                dropped = TIMES + (PEAKS if separate_memory else ())
                results[method] = {"model": model, "method": method,
                                   **{k: v for k, v in timed.items() if k not in dropped}}
            result = results[method]
            for key in ("step_times_s", "cpu_times_s", "paired_floor_cpu_s", "paired_floor_step_s", "step_kinds"):
                if key in timed:
                    result.setdefault(key, []).extend(timed[key])
            result.setdefault("round_medians_s", []).append(statistics.median(timed["step_times_s"]))
            result["losses"] = timed["losses"]
            lengths = interleaved_lengths(args, method) if args.interleave else run_lengths(args, method, "time")
            result["measured_steps"], result["warmup_steps"] = lengths
            for key in ("profile", "profile_ops", "profile_mm"):
                if key in timed:
                    result[key] = timed[key]
            log(f"[{model}/{method}] round {round_ + 1}: median step {result['round_medians_s'][-1]:.3f} s, "
                f"CPU {statistics.median(timed['cpu_times_s']):.3f} s")
    for result in results.values():
        if "step_times_s" not in result:  # --memory-only
            continue
        result["median_step_s"] = statistics.median(result["step_times_s"])
        result["mean_step_s"] = statistics.mean(result["step_times_s"])
        result["median_cpu_s"] = statistics.median(result["cpu_times_s"])
        result["mean_cpu_s"] = statistics.mean(result["cpu_times_s"])  # SpIEL's windows are a quarter of its steps
        result["amortised"] = reselects(result["method"])
        if "step_kinds" in result:  # interleaved: SpIEL's cycle from its step kinds, pooled over rounds
            result["amortised_cpu_s"] = amortised_cycle(result["cpu_times_s"], result["step_kinds"])
            result["amortised_step_s"] = amortised_cycle(result["step_times_s"], result["step_kinds"])
        if "paired_floor_cpu_s" in result:  # the method's time over the floor's in the same round
            kind = "cpu" if args.device == "cpu" else "step"
            mine, floor = result[f"{kind}_times_s"], result[f"paired_floor_{kind}_s"]
            if result["amortised"]:
                result["paired_vs_floor"] = result[f"amortised_{kind}_s"] / statistics.median(floor)
            else:
                result["paired_vs_floor"] = statistics.median(m / f for m, f in zip(mine, floor))
    return [{"model": model, "method": m, "error": failed[m]} if m in failed else results[m] for m in methods]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def headline_time(result: dict[str, Any], device: str) -> float:
    """The time a method is judged by: CPU time on CPU (wall time on GPU, where host CPU time says nothing); the
    median step, or for SpIEL the mean over its one measured cycle (amortised)."""
    kind = "cpu" if device == "cpu" else "step"
    if f"amortised_{kind}_s" in result:  # interleaved: SpIEL's cycle weighed from its step kinds
        return result[f"amortised_{kind}_s"]
    return result[f"mean_{kind}_s" if result.get("amortised") else f"median_{kind}_s"]


def markdown_table(model: str, results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One row per method; its step time against the floor, LoRA, SHiRA and full FT, its peak memory increase against
    the floor and LoRA. On CPU the judged time is the process's own CPU time (time.process_time): on a shared machine
    it is far steadier than wall time, and with one thread it is the step's work."""
    spec = model_spec(argparse.Namespace(**{**vars(args), "model": model}))
    by_name = {r["method"]: r for r in results}
    ref = {name: headline_time(by_name[name], args.device) if "median_step_s" in by_name.get(name, {}) else None
           for name in ("floor", "lora", "shira", "full")}
    peak_ref = {name: by_name[name].get("peak_increase_bytes") if name in by_name else None
                for name in ("floor", "lora")}
    paired = any("paired_vs_floor" in r for r in results)
    on_cpu = args.device == "cpu"
    memory = "peak RSS" if on_cpu else "peak GPU memory"
    judged = "CPU s/step" if on_cpu else "wall s/step"
    rounds = f" x {args.repeats} rounds" if args.repeats > 1 else ""
    shape = f"batch {spec.batch_size} x {spec.seq_len} tokens"
    if paired:
        how = (f"every method in one process, stepping in turn with the floor (`--interleave`): median of {args.steps} "
               f"steps after {args.warmup} warmup{rounds}; vs floor = median over steps of (method / floor in the "
               "same round); SpIEL (†): one published cycle (S=20, A=5) weighed from its window, plain and "
               "reselection steps 1-9 (the first, full reselection: errs high)")
    else:
        where = ("every method in turn in one process (`--in-process`)" if getattr(args, "in_process", False)
                 else "one process per method and measurement")
        how = (f"{where}: median of {args.steps} steps after {args.warmup} warmup{rounds}; SpIEL (†): mean of one "
               "full reselection cycle (20 steps after 6)")
    lines = [
        f"**{spec.alias}**: {shape}, {args.device}, {args.dtype}, {args.threads} thread(s); step = forward + "
        f"backward + optimizer step (the floor: forward + input-gradient-only backward); {how}"
        + (f"; frozen base stored {args.quantize}" if getattr(args, "quantize", None) else "")
        + ("; gradient checkpointing" if getattr(args, "gradient_checkpointing", False) else ""),
        "",
    ]
    header = ["method", "trainable params", "wall s/step (median)"]
    if on_cpu:
        header += ["CPU s/step (median)", "CPU s/step (mean)"]
    header += [f"judged {judged}", "vs floor", "vs LoRA", "vs SHiRA", "vs full",
               f"{memory} increase (MiB)", "vs floor", "vs LoRA", "optimizer state (MiB)",
               "weights (MiB)", f"{memory} (MiB)"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in results:
        name = r["method"] + (f" (r={r['lora_rank']})" if "lora_rank" in r else "")
        name += f" ({r['s2ft_channels']} channels/layer)" if "s2ft_channels" in r else ""
        name += " †" if r.get("amortised") else ""
        timed = "median_step_s" in r  # not with --memory-only
        cells = [name, f"{r['trainable_params']:,}", f"{r['median_step_s']:.3f}" if timed else "-"]
        if on_cpu:
            cells += [f"{r['median_cpu_s']:.3f}", f"{r['mean_cpu_s']:.3f}"] if timed else ["-", "-"]
        if timed:
            time_ = headline_time(r, args.device)
            vs_floor = f"{r['paired_vs_floor']:.2f}x" if "paired_vs_floor" in r else ratio(time_, ref["floor"])
            cells += [f"**{time_:.3f}**", vs_floor] + [ratio(time_, ref[n]) for n in ("lora", "shira", "full")]
        else:
            cells += ["-"] * 5
        peak = r.get("peak_increase_bytes")
        cells += ([f"{peak / MIB:,.0f}", ratio(peak, peak_ref["floor"]), ratio(peak, peak_ref["lora"])]
                  if peak is not None else ["-", "-", "-"])
        cells.append(f"{r['optimizer_state_bytes'] / MIB:,.2f}")
        cells.append(f"{r['weight_bytes'] / MIB:,.1f}" if "weight_bytes" in r else "-")
        cells.append(f"{r['peak_abs_bytes'] / MIB:,.0f}" if r.get("peak_abs_bytes") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    first = {r["method"]: round(r["losses"][0], 5) for r in results if r.get("losses")}
    same = "identical" if len(set(first.values())) == 1 else "DIFFERENT"
    if first:  # not with --memory-only
        lines += ["", f"First-step loss (zero-initialised deltas/adapters, same batch and dropout): {same} {first}."]
    notes = [f"{r['method']}: {r['shira']}" for r in results if "shira" in r]
    if notes:
        lines.append("SHiRA: " + "; ".join(notes) + ".")
    if any(r.get("peak_increase_bytes") is None for r in results):
        lines.append("Peak memory: not measured in this run (`--no-memory`, or GPU with `--interleave`).")
    if args.repeats > 1:
        lines.append("Per-round wall medians (s): " + "; ".join(
            f"{r['method']} " + ", ".join(f"{m:.2f}" for m in r["round_medians_s"]) for r in results) + ".")
    return "\n".join(lines)


def over_floor(results: list[dict[str, Any]], rows: int) -> str:
    """Per profiled method: the ops whose self time exceeds the floor's most (ms/step), i.e. where its extra time
    over the floor goes; the profiler's own overhead is in both sides."""
    by_name = {r["method"]: r for r in results if "profile_ops" in r}
    if "floor" not in by_name:
        return ""
    floor = by_name["floor"]["profile_ops"]
    parts = []
    for name, r in by_name.items():
        if name == "floor":
            continue
        ops = r["profile_ops"]
        total = sum(v[0] for v in ops.values()) - sum(v[0] for v in floor.values())
        diff = sorted(((ops.get(k, [0, 0])[0] - floor.get(k, [0, 0])[0], k) for k in set(ops) | set(floor)),
                      reverse=True)
        lines = [f"#### {r['model']}/{name}: self time over the floor, {total:,.0f} ms/step in all (profiled)", "",
                 "| op | method ms/step | floor ms/step | over the floor | calls/step (method / floor) |",
                 "|---|---:|---:|---:|---:|"]
        for delta, key in diff[:rows]:
            mine, base = ops.get(key, [0, 0]), floor.get(key, [0, 0])
            lines.append(f"| `{key}` | {mine[0]:,.1f} | {base[0]:,.1f} | {delta:+,.1f} | {mine[1]:g} / {base[1]:g} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all", choices=[*MODELS, "all"],
                        help=f"all = {', '.join(DEFAULT_MODELS)}")
    parser.add_argument("--methods", default="floor,full,lora,shira,sift",
                        help=f"comma-separated, from {', '.join(method_names())}, or all")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per time run")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps before them")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of time runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight and compute dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the model's batch size")
    parser.add_argument("--seq-len", type=int, default=None, help="override the model's sequence length")
    parser.add_argument("--in-process", action="store_true",
                        help="run every method in this process (for GPU: saves the imports per method; on CPU a "
                             "dry run only, since the peak-RSS column then mixes the methods)")
    parser.add_argument("--interleave", action="store_true",
                        help="time every method in one process, stepping in turn with the floor (robust ratios on a "
                             "shared machine); memory runs stay one process per method")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--memory-only", action="store_true", help="the memory runs only (CPU), no time runs")
    parser.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8"],
                        help="store every frozen Linear (heads and LM head kept) quantized, after the method attached")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="enable_activation_checkpointing(model) after the method attached")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--density", type=float, default=0.01, help="SIFT density per target weight")
    parser.add_argument("--sift-lora-rank", type=int, default=None,
                        help="give SIFT a LoRA-rank budget instead of --density (LoRA then uses this rank)")
    parser.add_argument("--keep-going", action="store_true",
                        help="a method that fails is reported in the table (exit status 1) instead of stopping the run")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over the measured steps: top ops, and matmuls by shape")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown table path (a .json with raw numbers beside it)")
    parser.add_argument("--rerender", type=Path, default=None,
                        help="rewrite this .md from the .json beside it (no run)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.methods == "all":
        args.methods = ",".join(method_names())
    if args.interleave and (args.profile or args.in_process):
        parser.error("--interleave runs its own process; it does not combine with --profile or --in-process")
    if args.in_process and args.device == "cpu" and not args.worker:
        log("--in-process on CPU: a dry run only (the peak-RSS column mixes the methods' allocator states)")
    unknown = set(args.methods.split(",")) - set(method_names())
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(method_names())}")
    return args


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s))"
    return f"{platform.machine()} {os.cpu_count()} cores"


def render(header: str, all_results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    """The markdown: header, one table per model (failures listed), then profiles when there are any."""
    failed = {model: [r for r in results if "error" in r] for model, results in all_results.items()}
    ran = {model: [r for r in results if "error" not in r] for model, results in all_results.items()}
    tables = "\n\n".join(
        markdown_table(model, results, args) + "".join(f"\n\n**{r['method']} failed**: {r['error']}"
                                                       for r in failed[model])
        for model, results in ran.items())
    profiles = "\n\n".join(f"### profile {r['model']}/{r['method']} (last round)\n\n```\n{r['profile']}```\n\n"
                           f"aten::mm by operand shapes:\n\n{r['profile_mm']}"
                           for results in ran.values() for r in results if "profile" in r)
    excess = "\n\n".join(filter(None, (over_floor(results, args.profile_rows) for results in ran.values())))
    if excess:
        profiles = f"### where the time over the floor goes\n\n{excess}\n\n{profiles}"
    return f"{header}\n\n{tables}\n" + (f"\n{profiles}\n" if profiles else "")


def rerender(path: Path) -> None:
    """Rewrite `path` (.md) from the `.json` beside it, e.g. after a change to the table's layout."""
    saved = json.loads(path.with_suffix(".json").read_text())
    stored = saved["args"]
    as_int = ("steps", "warmup", "repeats", "threads", "profile_rows", "batch_size", "seq_len")
    constants = {"None": None, "True": True, "False": False}
    args = argparse.Namespace(**{k: constants[v] if v in constants else int(v) if k in as_int else v
                                 for k, v in stored.items()})
    path.write_text(render(saved["header"], saved["results"], args))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run = run_interleaved if args.interleave else run_worker
        print(json.dumps(run(argparse.Namespace(**vars(args), method=args.methods))))
        return
    if args.rerender is not None:
        rerender(args.rerender)
        return
    models = list(DEFAULT_MODELS) if args.model == "all" else [args.model]
    all_results = {model: benchmark(args, model, args.methods.split(",")) for model in models}
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {machine()}, "
              f"command: `python {' '.join(sys.argv)}`")
    text = render(header, all_results, args)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(
            {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, "results": all_results}, indent=1))
    if any("error" in r for results in all_results.values() for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
