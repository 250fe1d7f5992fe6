"""Will it fit? Peak memory per device of a fine-tuning run, predicted from a model config alone.

The parameter counts come from the model itself, built on the meta device (no weights, no download), and the
trainable counts from the same budget code the callbacks use, so architecture quirks (tied embeddings, grouped-query
attention, fused projections) are real. The bytes are then a sum of stated terms, per device (per rank under FSDP2,
which shards parameters, gradients and optimizer state 1/N but not buffers such as delta indices):

- base: the model's weights in `dtype` (full fine-tuning trains them in that dtype, its gradients and AdamW state too);
- trainable: what else trains, in fp32 (delta values, LoRA adapters, S2FT blocks), plus element-sparse indices (an
  int32 buffer and the sparse function's CSR layout cache, 12 bytes per entry, replicated on every rank);
- gradients and optimizer state of what trains (AdamW: two moments; SM3 for SpIEL-MA: a momentum per entry plus
  one fp32 per row and column of each target weight);
- method extras: SIFT's scoring (its exact sums a group of weights at a time, within `score_memory` of a full fp32
  score per target weight, 1/N of it per rank on N ranks, and the dense gradient being added), SpIEL-AG's window statistics (16 bytes per
  candidate) and its weight-sized fp32 gradient copies of the largest target;
- activations, a rough model of a LLaMA-style decoder without recomputation: per token and layer,
  `a * (10 h + 4 f + 2 kv)` bytes (a = compute dtype bytes; the saved inputs of the norms, q/k/v before and after
  rotary, k/v expanded to every query head, the attention output, the residuals, gate, up, SiLU and their product)
  plus `8 h` for RMSNorm's fp32 statistics in 16-bit compute; one extra layer for the backward's gradients; and the
  logits, `tokens * vocab * (a + 12)` (the logits, their fp32 copy, log-softmax and its gradient). Attention is taken
  to be flash / memory-efficient (nothing quadratic in the sequence). With gradient checkpointing: each layer's
  input plus one layer's activations;
- FSDP2 (gpus > 1): two transformer blocks unsharded at a time (the current one and the prefetched one), the root
  unit (final norm, a tied embedding) unsharded for the whole step, and an untied embedding or head (their own
  units, `modules.fsdp2.end_units`) around its own compute, in the compute dtype.

Phases (what `benchmarks/memory_table.py` measures), on the device: load (base, trainable tensors), selection
(SIFT's calibration passes: resident + scoring + one batch's activations, checkpointed as scoring always is), step
(resident + gradients + optimizer + activations + method extras) and save (resident, with the gradients and
optimizer state still held). In host memory per rank: loading under FSDP2, which builds on the CPU (the rank's shard
and one block of rows being read), and what saving adds (what rank 0 gathers under FSDP2, and the
serialized checkpoint). On a CPU run the two are one memory. Not counted: the runtime itself (Python, torch, CUDA
context: ~0.5-1 GB per GPU), allocator fragmentation, data loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sparse_lightning import registry
from sparse_lightning.borders.models import resolve_model_path
from sparse_lightning.modules.fsdp2 import end_units
from sparse_lightning.modules.sharded_loading import READ_BYTES
from sparse_lightning.scoring.score_groups import DEFAULT_SCORE_MEMORY, check_score_memory
from sparse_lightning.sparse.delta import allocate_budget
from sparse_lightning.sparse.inject import default_targets, find_linear_targets
from sparse_lightning.usage_errors import raise_usage_errors

METHODS = tuple(registry.METHODS)
ELEMENT_SPARSE = tuple(registry.names(element_sparse=True))
DEVICE_PHASES = ("load", "selection", "step")
PHASES = (*DEVICE_PHASES, "save")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Element-sparse index bytes per trainable entry: the int32 index buffer (int64 for weights of 2^31 entries or
#: more) and the sparse function's cached CSR columns (int64).
CSR_COLUMN_BYTES = 8

#: LLaMA shapes by size (Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B configs), built on the meta device.
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}


def load_config(model: str):
    """A HF config from a named LLaMA shape (`1b`, `8b`, `70b`), a built-in alias or a local model directory."""
    from transformers import AutoConfig, LlamaConfig

    if model.lower() in LLAMA_SHAPES:
        return LlamaConfig(**LLAMA_SHAPES[model.lower()])
    path = Path(resolve_model_path(model))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model}: no config.json there; give a local model directory, a built-in alias, or "
                                f"one of the LLaMA shapes {', '.join(LLAMA_SHAPES)}")
    return AutoConfig.from_pretrained(path)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read from the model built on the meta device."""

    parameters: int
    #: the architecture's default target weights: name -> (out, in)
    targets: dict[str, tuple[int, int]]
    #: parameters of one transformer block (an FSDP2 unit)
    block_parameters: int
    #: parameters outside the blocks and the end units (the root FSDP2 unit: final norm, a tied embedding)
    root_parameters: int
    #: parameters of the larger end unit (an untied embedding or head, sharded on its own), 0 when tied
    end_parameters: int
    #: the largest single parameter tensor
    largest_tensor: int
    #: parameters counted twice by a state dict (a tied head)
    tied_parameters: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int

    @property
    def target_parameters(self) -> int:
        return sum(out * inp for out, inp in self.targets.values())


def model_shape(config) -> ModelShape:
    """Count on the meta device: no memory, no weights, so a 70B config costs a second."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no transformer block (_no_split_modules): cannot estimate")
    parameters = list(model.parameters())  # a tied weight once
    every_name = model.named_parameters(remove_duplicate=False)
    tied = sum(p.numel() for _, p in every_name) - sum(p.numel() for p in parameters)
    block = sum(p.numel() for p in blocks[0].parameters())
    total = sum(p.numel() for p in parameters)
    ends = [sum(p.numel() for p in unit.parameters()) for unit in end_units(model)]
    targets = find_linear_targets(model, list(default_targets(model)))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        parameters=total,
        targets={name: tuple(linear.weight.shape) for name, linear in targets.items()},
        block_parameters=block,
        root_parameters=total - len(blocks) * block - sum(ends),
        end_parameters=max(ends, default=0),
        largest_tensor=max(p.numel() for p in parameters),
        tied_parameters=tied,
        layers=len(blocks),
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        kv_dim=getattr(config, "num_key_value_heads", heads) * head_dim,
        vocab=config.vocab_size,
    )


@dataclass(frozen=True)
class Plan:
    """A run to estimate: method, budget, precision, devices and batch.

    Budgets: element-sparse methods take `num_params`, `density` (per weight) or `lora_rank` (LoRA's count), in
    that order, default 1% per weight; S2FT trains `down_proj` input channels, as many per layer as that count
    allows (the shipped recipe); LoRA takes `lora_rank` (default 8). `dtype` is how the base is stored and
    computed in; deltas, adapters and their optimizer state stay fp32 whatever it is.
    """

    method: str
    density: float | None = None
    num_params: int | None = None
    lora_rank: int | None = None
    dtype: str = "bfloat16"
    gpus: int = 1
    batch_size: int = 1  # per device
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    #: SIFT's calibration batches and its scoring budget (`GradientTopKCallback`'s own settings)
    calibration_batches: int = 4
    score_memory: float = DEFAULT_SCORE_MEMORY
    #: whether checkpoints hold the frozen base too (`False`: what trains, the library's default)
    full_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if min(self.gpus, self.batch_size, self.seq_len, self.calibration_batches) < 1:
            raise ValueError(f"gpus, batch_size, seq_len and calibration_batches must be >= 1, got {self.gpus}, "
                             f"{self.batch_size}, {self.seq_len}, {self.calibration_batches}")
        check_score_memory(self.score_memory)


@dataclass
class Estimate:
    """Bytes per device: `components` (what is held), `phases` (each phase's peak on the device) and `host` (per rank:
    the host's peak while loading under FSDP2, which builds on the CPU, and what saving adds there)."""

    model: str
    plan: Plan
    parameters: int
    trainable: int
    components: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    checkpoint_bytes: int = 0

    @property
    def peak(self) -> int:
        """The device's peak over every phase."""
        return max(self.phases.values())

    def on_one_memory(self, phase: str) -> int:
        """A phase's peak when the device is the host (a CPU run): loading holds on the host what the device then
        holds, so the larger of the two; saving adds the checkpoint to what the device holds."""
        if phase == "load":
            return max(self.phases[phase], self.host[phase])
        return self.phases[phase] + self.host.get(phase, 0)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "plan": vars(self.plan), "parameters": self.parameters,
                "trainable": self.trainable, "components": self.components, "phases": self.phases,
                "host": self.host, "checkpoint_bytes": self.checkpoint_bytes, "peak": self.peak}


def trainable_count(shape: ModelShape, plan: Plan) -> int:
    """Trainable entries of the method under the plan's budget (the callbacks' own budget code)."""
    shapes = list(shape.targets.values())
    if plan.method == "full":
        return shape.parameters
    if plan.method == "lora":
        return (plan.lora_rank or 8) * sum(out + inp for out, inp in shapes)
    if plan.num_params is not None:
        budget = {"num_params": plan.num_params}
    elif plan.density is None and plan.lora_rank is not None:
        budget = {"lora_rank": plan.lora_rank}
    else:
        budget = {"density": plan.density or 0.01}
    per_weight = allocate_budget(shapes, **budget)
    if plan.method == "s2ft":
        return s2ft_channels(shape, sum(per_weight)) * shape.hidden * shape.layers
    return sum(per_weight)


def s2ft_channels(shape: ModelShape, budget: int) -> int:
    """FFN channels per layer whose down_proj columns hold `budget` entries over all layers (at least one)."""
    return max(1, round(budget / (shape.hidden * shape.layers)))


def activation_bytes(shape: ModelShape, plan: Plan) -> int:
    """The rough activation model of the module docstring, for one device's batch."""
    a = DTYPE_BYTES[plan.dtype]
    tokens = plan.batch_size * plan.seq_len
    h, f, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_token_layer = a * (10 * h + 4 * f + 2 * kv) + (8 * h if a < 4 else 0)
    if plan.gradient_checkpointing:
        saved = tokens * (shape.layers * a * h + 2 * per_token_layer)
    else:
        saved = tokens * (shape.layers + 1) * per_token_layer
    return saved + tokens * shape.vocab * (a + 12)


def selection_bytes(shape: ModelShape, plan: Plan) -> int:
    """SIFT's scoring beyond a step's activations: with several calibration batches the exact sums of a group of
    weights at a time (at most `score_memory` of a full fp32 score per target weight, and at least the largest one)
    plus the dense gradient being added; with one batch each weight's top-k is taken as its gradient forms (that
    gradient, its fp32 copy). On N ranks (DDP, FSDP2) each rank holds its 1/N rows of every sum and of a batch's
    reduce-scattered gradient, and the budget is a fraction of that share, while the dense gradient is whole (with an
    fp32 copy in a 16-bit dtype, what the reduce-scatter sums)."""
    largest = max(out * inp for out, inp in shape.targets.values())
    b, n = DTYPE_BYTES[plan.dtype], plan.gpus
    if n == 1:
        if plan.calibration_batches == 1:
            return (b + 4) * largest
        return max(int(plan.score_memory * 4 * shape.target_parameters), 4 * largest) + b * largest
    shard = 4 * largest // n
    gradient = b * largest + (4 * largest if b < 4 else 0) + shard
    if plan.calibration_batches == 1:
        return gradient
    return max(int(plan.score_memory * 4 * shape.target_parameters) // n, shard) + gradient


def held_bytes(shape: ModelShape, plan: Plan, k: int) -> dict[str, int]:
    """What one device holds, by component (the terms of the module docstring)."""
    n, b, method = plan.gpus, DTYPE_BYTES[plan.dtype], plan.method
    targets = shape.targets.values()
    trained = shape.parameters * b if method == "full" else 4 * k  # what trains, whole
    c = {"base": shape.parameters * b // n, "trainable": 0 if method == "full" else 4 * k // n}
    if method in ELEMENT_SPARSE:
        index_bytes = 4 if max(out * inp for out, inp in targets) < 2**31 else 8
        c["indices"] = (index_bytes + CSR_COLUMN_BYTES) * k + 8 * sum(out + 1 for out, _ in targets)
    if method == "s2ft":  # co-permutation orders and block positions (int64 buffers)
        c["indices"] = 8 * (shape.intermediate + k // (shape.hidden * shape.layers)) * shape.layers
    c["gradients"] = trained // n
    if method == "spiel_ma":  # SM3: a momentum per entry, fp32 row and column maxima per target (replicated)
        c["optimizer"] = 4 * k // n + 4 * sum(out + inp for out, inp in targets)
    else:
        c["optimizer"] = 2 * trained // n
    if method == "spiel_ag":  # window statistics (replicated) + the observed gradient, its fp32 copy, its |.|
        c["method_state"] = 16 * k + (b + 8) * max(out * inp for out, inp in targets)
    if method == "sift":  # scoring passes always recompute activations (`modes.scoring_mode`)
        c["selection"] = selection_bytes(shape, plan)
        c["scoring_activations"] = activation_bytes(shape, replace(plan, gradient_checkpointing=True))
    c["activations"] = activation_bytes(shape, plan)
    if n > 1:  # two blocks, the root unit and one end unit gathered; full FT also reduces a block's whole gradient
        units = 2 * shape.block_parameters * b + (shape.root_parameters + shape.end_parameters) * b * (n - 1) // n
        c["fsdp_unsharded"] = units + (2 * shape.block_parameters * b if method == "full" else 0)
    return c


def host_load_bytes(shape: ModelShape, plan: Plan, resident: int) -> int:
    """Host memory per rank while loading under FSDP2, where Lightning builds and shards the model on the CPU before
    moving each rank's shard to its device (one process builds it on the device: 0). Every method, LoRA and S2FT's
    shipped random selection included, builds on the meta device and reads only its own rows, one block of
    `READ_BYTES` at a time, beside its shard (S2FT selections from calibration data load the whole model on every
    rank first: not the shipped recipe, not estimated here; an `init_delta` adds only its k entries, read whole on
    every rank and added to each rank's rows, not counted)."""
    b, n = DTYPE_BYTES[plan.dtype], plan.gpus
    if n == 1:
        return 0
    return resident + min(READ_BYTES, shape.largest_tensor * b // n)


def checkpoint_bytes(shape: ModelShape, plan: Plan, k: int) -> tuple[int, int]:
    """What a checkpoint holds: what trains (element-sparse: values and int32 indices; S2FT: blocks and their
    permutation records), its optimizer state, and the frozen base only when asked for (full fine-tuning: the
    weights are what trains); under FSDP2 a whole-model checkpoint holds a tied weight once per name. Returns
    (sharded, records): what FSDP2 shards (gathered on rank 0 to save) and buffers whole on every rank."""
    b, method = DTYPE_BYTES[plan.dtype], plan.method
    trained = shape.parameters * b if method == "full" else 4 * k
    if method == "spiel_ma":
        optimizer = 4 * k + 4 * sum(out + inp for out, inp in shape.targets.values())
    else:
        optimizer = 2 * trained
    frozen = shape.parameters * b if plan.full_checkpoint and method != "full" else 0
    if (frozen or method == "full") and plan.gpus > 1:  # FSDP2's gathered state dict copies a tied weight per name
        frozen += shape.tied_parameters * b
    if method in ELEMENT_SPARSE:
        records = 4 * k  # the int32 index buffers
        if method.startswith("spiel"):  # the callback's state: each weight's first index set (kept in host memory)
            records += 4 * k
    elif method == "s2ft":  # block positions and co-permutation orders (int64)
        records = 8 * (shape.intermediate + k // (shape.hidden * shape.layers)) * shape.layers
    else:
        records = 0
    return trained + optimizer + frozen, records


def estimate(model: str | Any, plan: Plan, shape: ModelShape | None = None, name: str | None = None) -> Estimate:
    """Predict per-device memory of `plan` on `model` (a name for `load_config`, or a HF config)."""
    config = load_config(model) if isinstance(model, str) else model
    shape = shape or model_shape(config)
    name = name or (model if isinstance(model, str) else getattr(config, "name_or_path", "") or config.model_type)
    n = plan.gpus
    k = trainable_count(shape, plan)
    c = held_bytes(shape, plan, k)
    sharded, records = checkpoint_bytes(shape, plan, k)
    checkpoint = sharded + records
    resident = c["base"] + c["trainable"] + c.get("indices", 0)
    unsharded = c.get("fsdp_unsharded", 0)
    # saving after the last step: gradients and optimizer state are still held (Lightning zeroes gradients before
    # the next backward); the checkpoint is assembled in host memory: under FSDP2 rank 0 gathers a whole copy of its
    # sharded tensors (index and permutation records are whole on every rank), then serializes
    gathered = sharded if n > 1 else 0
    phases = {
        "load": resident,
        "selection": resident + (c["selection"] + c["scoring_activations"] + unsharded if "selection" in c else 0),
        "step": resident + c["gradients"] + c["optimizer"] + c.get("method_state", 0) + c["activations"] + unsharded,
        "save": resident + c["gradients"] + c["optimizer"],
    }
    host = {"load": host_load_bytes(shape, plan, resident), "save": gathered + checkpoint}
    return Estimate(name, plan, shape.parameters, k, c, phases, host, checkpoint)


GIB = 2**30


def estimate_table(estimates: list[Estimate]) -> str:
    """A markdown table: one row per estimate, GiB per device (and per rank in host memory)."""
    lines = ["| model | method | GPUs | trainable | load | selection | step | **peak** | host: load | host: save | "
             "checkpoint |", "|---|---|---:|---:|" + "---:|" * 7]
    for e in estimates:
        device = " | ".join(f"{e.phases[p] / GIB:,.2f}" for p in DEVICE_PHASES)
        lines.append(f"| {e.model} | {e.plan.method} | {e.plan.gpus} | {e.trainable:,} | {device} | "
                     f"**{e.peak / GIB:,.2f}** | {e.host['load'] / GIB:,.2f} | {e.host['save'] / GIB:,.2f} | "
                     f"{e.checkpoint_bytes / GIB:,.3f} |")
    return "\n".join(lines)


def estimate_main(argv: list[str]) -> None:
    """`sparse-lightning estimate`: the table for every method and GPU count asked for."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="sparse-lightning estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"a LLaMA shape ({', '.join(LLAMA_SHAPES)}), a built-in alias "
                                                       "or a local model directory (only its config.json is read)")
    parser.add_argument("--method", default="all", help=f"comma-separated, or all: {', '.join(METHODS)}")
    parser.add_argument("--gpus", default="1", help="comma-separated device counts (FSDP2 above 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_BYTES), help="the base's dtype")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--density", type=float, help="element-sparse budget per weight (default 0.01)")
    budget.add_argument("--num_params", type=int, help="trainable entries in all (element-sparse, S2FT)")
    parser.add_argument("--lora_rank", type=int, help="LoRA's rank (default 8)")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per device per micro-batch")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--calibration_batches", type=int, default=4, help="SIFT's")
    parser.add_argument("--score_memory", type=float, default=DEFAULT_SCORE_MEMORY,
                        help="SIFT's scoring budget: a fraction of a full fp32 score per target weight "
                             "(each rank holds 1/N of it)")
    parser.add_argument("--full_checkpoint", action="store_true", help="checkpoints also hold the frozen base")
    parser.add_argument("--json", action="store_true", help="every estimate with its components, as JSON")
    args = raise_usage_errors(parser).parse_args(argv)
    methods = list(METHODS) if args.method == "all" else args.method.split(",")
    try:
        gpus = [int(g) for g in args.gpus.split(",")]
    except ValueError:
        parser.error(f"--gpus takes comma-separated integers, got {args.gpus!r}")
    config = load_config(args.model)
    shape = model_shape(config)
    estimates = []
    for method in methods:
        for count in gpus:
            plan = Plan(method, density=args.density, num_params=args.num_params, lora_rank=args.lora_rank,
                        dtype=args.dtype, gpus=count, batch_size=args.batch_size, seq_len=args.seq_len,
                        gradient_checkpointing=args.gradient_checkpointing, full_checkpoint=args.full_checkpoint,
                        calibration_batches=args.calibration_batches, score_memory=args.score_memory)
            estimates.append(estimate(config, plan, shape, name=args.model))
    if args.json:
        print(json.dumps([e.as_dict() for e in estimates], indent=1))
        return
    print(f"{args.model}: {shape.parameters:,} parameters; {args.dtype}, {args.batch_size} x {args.seq_len} tokens "
          f"per device{', gradient checkpointing' if args.gradient_checkpointing else ''}; GiB per device, "
          "runtime (CUDA context, ~0.5-1 GiB) not included")
    print(estimate_table(estimates))
