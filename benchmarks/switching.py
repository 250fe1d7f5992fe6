"""Switching deltas on one base: `MultiDelta` (element-sparse and S2FT-block deltas) against PEFT LoRA.

Each model gets two adapters of each kind with matched trainable counts (LoRA rank r on the seven LLaMA projections;
element-sparse deltas with exactly r * (in + out) entries per weight, as SHiRA counts them; S2FT blocks on c FFN
channels per layer, up_proj rows + down_proj columns, c = round(r * sum(in + out) / (2 * hidden)), so each layer
trains about as many entries as LoRA's). Deltas are written to disk in this library's format at random positions
with random values (the cost of a switch depends on k, not on the values); LoRA adapters are PEFT `save_pretrained`
directories (random A and B). Timed, single thread, median of `--repeats` after one warm-up:

- load one adapter from disk: LoRA `load_adapter` (the model already holds one) / `MultiDelta.load`;
- merge (none -> A): LoRA `merge_adapter()` / `activate("a")`; unmerge (A -> none): `unmerge_adapter()` /
  `activate(None)`; merged switch (A -> B): `unmerge_adapter(); set_adapter("b"); merge_adapter()` / `activate("b")`;
- LoRA only: `set_adapter` between unmerged adapters (no merge: inference then pays the adapter's extra matmuls on
  every forward) and `merge_and_unload()` (on a fresh copy each repeat; the copy is not timed).

Memory: "held" is what stays allocated beside the base weights with both adapters loaded and one merged (LoRA's A/B
matrices; our positions + fp32 values + the base values saved under the active delta). "Peak" is the largest
transient increase of the process's resident memory during one merged switch (A -> B), measured in a subprocess
with glibc's mmap threshold pinned so freed buffers leave RSS (`/proc/self/clear_refs` resets the peak mark).
"Bit-exact" says whether the base weights are bit for bit the original after merge/unmerge cycles.

    flock /tmp/sl_core2.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/switching.py \\
        --output benchmarks/results/switching.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparse_lightning.export import DELTA_CONFIG, DELTA_WEIGHTS, FORMAT  # noqa: E402
from sparse_lightning.multi_delta import MultiDelta  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: LLaMA-shaped random models of growing width, two layers each (hidden, intermediate, heads, KV heads).
WIDTHS = {"h576": (576, 1536, 9, 3), "h1024": (1024, 2816, 16, 4), "h2048": (2048, 5632, 32, 8),
          "h4096": (4096, 11008, 32, 8)}
MODELS = ["smollm2", *WIDTHS]
MiB = 2**20


def load_base(model: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model == "smollm2":
        from sparse_lightning.models import resolve_model_path

        return AutoModelForCausalLM.from_pretrained(resolve_model_path("SmolLM2-135M-Instruct"),
                                                    dtype=torch.float32).eval()
    hidden, inter, heads, kv = WIDTHS[model]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=1024, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] in PROJECTIONS}


def write_entries_delta(model: nn.Module, rank: int, seed: int, out: Path) -> int:
    """Element-sparse delta, r * (in + out) random entries per target; returns its entry count."""
    generator = torch.Generator().manual_seed(seed)
    tensors, config_targets = {}, {}
    for name, module in targets(model).items():
        out_f, in_f = module.weight.shape
        k = rank * (out_f + in_f)
        tensors[f"{name}.indices"] = torch.randperm(out_f * in_f, generator=generator)[:k].sort().values
        tensors[f"{name}.values"] = torch.randn(k, generator=generator) * 1e-3
        config_targets[name] = {"weight": f"{name}.weight", "shape": [out_f, in_f], "kind": "entries", "k": k}
    return write_delta(tensors, config_targets, out)


def s2ft_channels(model: nn.Module, rank: int) -> int:
    layer = [m for n, m in targets(model).items() if ".layers.0." in n]
    per_layer = rank * sum(sum(m.weight.shape) for m in layer)
    return round(per_layer / (2 * model.config.hidden_size))


def write_s2ft_delta(model: nn.Module, channels: int, seed: int, out: Path) -> int:
    """S2FT-shaped delta: `channels` random FFN channels per layer, up_proj rows and down_proj columns."""
    generator = torch.Generator().manual_seed(seed)
    tensors, config_targets = {}, {}
    for name, module in targets(model).items():
        out_f, in_f = module.weight.shape
        if name.endswith("up_proj"):
            kind, size, shape = "rows", out_f, [channels, in_f]
        elif name.endswith("down_proj"):
            kind, size, shape = "columns", in_f, [out_f, channels]
        else:
            continue
        tensors[f"{name}.{kind}"] = torch.randperm(size, generator=generator)[:channels].sort().values
        tensors[f"{name}.block"] = torch.randn(shape, generator=generator) * 1e-3
        config_targets[name] = {"weight": f"{name}.weight", "shape": [out_f, in_f], "kind": kind, "size": channels}
    return write_delta(tensors, config_targets, out)


def write_delta(tensors: dict[str, torch.Tensor], config_targets: dict[str, Any], out: Path) -> int:
    out.mkdir(parents=True)
    save_file(tensors, str(out / DELTA_WEIGHTS))
    config = {"format": FORMAT, "method": "benchmark", "base_model": None, "targets": config_targets, "dense": []}
    (out / DELTA_CONFIG).write_text(json.dumps(config))
    return sum(t.numel() for key, t in tensors.items() if key.endswith((".values", ".block")))


def write_lora(model: nn.Module, rank: int, seed: int, out: Path) -> int:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=PROJECTIONS, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(out)
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def timed(action: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> list[float]:
    """Seconds per call of `action` (one warm-up first); `setup` runs untimed before each call."""
    times = []
    for round_ in range(repeats + 1):
        if setup is not None:
            setup()
        start = time.perf_counter()
        action()
        if round_:
            times.append(time.perf_counter() - start)
    return times


def weights(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix).replace(".base_layer", ""): module.weight.detach().clone()
            for name, module in model.named_modules() if name.rpartition(".")[2] in PROJECTIONS}


def same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)


def peak_rss_increase(action: Callable[[], Any]) -> int:
    """Bytes the resident set grew to above its level before `action` (freed buffers leave RSS: see the module)."""
    def status(field: str) -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    action()
    return status("VmHWM") - before


def run_model(name: str, rank: int, repeats: int, memory: bool) -> dict[str, Any]:
    """Every measurement for one model: timings (memory=False) or transient peaks (memory=True)."""
    from peft import PeftModel

    base = load_base(name)
    original = weights(base)
    shapes = {"hidden": base.config.hidden_size, "intermediate": base.config.intermediate_size,
              "layers": base.config.num_hidden_layers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lora_count = write_lora(base, rank, 1, tmp / "lora_a")
        write_lora(base, rank, 2, tmp / "lora_b")
        channels = s2ft_channels(base, rank)
        kinds = {"element-sparse": [write_entries_delta(base, rank, seed, tmp / f"entries_{seed}") for seed in (1, 2)],
                 "S2FT blocks": [write_s2ft_delta(base, channels, seed, tmp / f"s2ft_{seed}") for seed in (1, 2)]}
        dirs = {"element-sparse": [tmp / "entries_1", tmp / "entries_2"],
                "S2FT blocks": [tmp / "s2ft_1", tmp / "s2ft_2"]}
        rows = []

        lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp / "lora_a", adapter_name="a")
        lora.load_adapter(tmp / "lora_b", adapter_name="b")
        lora.set_adapter("a")

        def lora_switch() -> None:
            target = "b" if lora.active_adapter == "a" else "a"
            lora.unmerge_adapter()
            lora.set_adapter(target)
            lora.merge_adapter()

        lora_held = sum(p.nbytes for n, p in lora.named_parameters() if "lora_" in n)
        row: dict[str, Any] = {"model": name, **shapes, "method": "PEFT LoRA", "trainable": lora_count,
                               "detail": f"r={rank}", "held_bytes": lora_held}
        if memory:
            lora.merge_adapter()
            row["peak_switch_bytes"] = peak_rss_increase(lora_switch)
            lora.unmerge_adapter()
        else:
            row["load_s"] = timed(lambda: lora.load_adapter(tmp / "lora_b", adapter_name="b"), repeats,
                                  setup=lambda: lora.delete_adapter("b") if "b" in lora.peft_config else None)
            lora.set_adapter("a")
            row["set_adapter_s"] = timed(lambda: lora.set_adapter("b" if lora.active_adapter == "a" else "a"), repeats)
            lora.set_adapter("a")
            row["merge_s"] = timed(lora.merge_adapter, repeats, setup=lambda: lora.unmerge_adapter())
            row["unmerge_s"] = timed(lora.unmerge_adapter, repeats, setup=lambda: lora.merge_adapter())
            lora.merge_adapter()
            row["switch_s"] = timed(lora_switch, repeats)
            lora.unmerge_adapter()
            row["bit_exact"] = same(weights(lora, "base_model.model."), original)
            copies: list[nn.Module] = []
            row["merge_and_unload_s"] = timed(lambda: copies.pop().merge_and_unload(), max(1, repeats // 2),
                                              setup=lambda: copies.append(copy.deepcopy(lora)))
        rows.append(row)
        del lora

        for kind, counts in kinds.items():
            model = copy.deepcopy(base)
            multi = MultiDelta(model).load("a", dirs[kind][0]).load("b", dirs[kind][1])
            multi.activate("a")
            held = sum(multi.memory_bytes().values())
            row = {"model": name, **shapes, "method": f"MultiDelta, {kind}", "trainable": counts[0],
                   "detail": f"k=r(in+out), r={rank}" if kind == "element-sparse" else f"{channels} channels/layer",
                   "held_bytes": held}
            if memory:
                row["peak_switch_bytes"] = peak_rss_increase(lambda: multi.activate("b"))
            else:
                multi.activate(None)
                row["load_s"] = timed(lambda: multi.load("b", dirs[kind][1]), repeats,
                                      setup=lambda: multi.unload("b") if "b" in multi.names else None)
                row["merge_s"] = timed(lambda: multi.activate("a"), repeats, setup=lambda: multi.activate(None))
                row["unmerge_s"] = timed(lambda: multi.activate(None), repeats, setup=lambda: multi.activate("a"))
                multi.activate("a")
                row["switch_s"] = timed(lambda: multi.activate("b" if multi.active == "a" else "a"), repeats)
                multi.activate(None)
                row["bit_exact"] = same(weights(model), original)
            rows.append(row)
            del multi, model
    return {"rows": rows}


def memory_in_subprocess(name: str, rank: int) -> dict[str, int]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    command = [sys.executable, __file__, "--memory-of", name, "--rank", str(rank)]
    completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    rows = json.loads(completed.stdout.strip().splitlines()[-1])["rows"]
    return {row["method"]: row["peak_switch_bytes"] for row in rows}


def ms(row: dict[str, Any], key: str) -> str:
    return f"{statistics.median(row[key]) * 1e3:.2f}" if key in row else "-"


def render(rows: list[dict[str, Any]], command: str, meta: dict[str, Any]) -> str:
    lines = ["# Switching deltas on one base: MultiDelta vs PEFT LoRA", "",
             f"Command: `{command}`", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, peft {meta['peft']}, "
             f"{meta['threads']} thread, fp32, median of {meta['repeats']} repeats (merge_and_unload: "
             f"{max(1, meta['repeats'] // 2)}) after one warm-up. Trainable counts are per adapter; every adapter "
             "targets the seven projections of every layer (S2FT: up_proj rows + down_proj columns).", "",
             "| model | hidden / inter x layers | method | trainable / adapter | load 1 (ms) | merge none->A (ms) | "
             "unmerge A->none (ms) | **switch A->B, merged (ms)** | set_adapter, unmerged (ms) | merge_and_unload (ms) "
             "| held: 2 loaded + 1 merged (MiB) | peak during switch (MiB) | base bit-exact after unmerge |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        peak = f"{row['peak_switch_bytes'] / MiB:.1f}" if "peak_switch_bytes" in row else "-"
        lines.append(
            f"| {row['model']} | {row['hidden']} / {row['intermediate']} x {row['layers']} | {row['method']} "
            f"({row['detail']}) | {row['trainable']:,} | {ms(row, 'load_s')} | {ms(row, 'merge_s')} | "
            f"{ms(row, 'unmerge_s')} | **{ms(row, 'switch_s')}** | {ms(row, 'set_adapter_s')} | "
            f"{ms(row, 'merge_and_unload_s')} | {row['held_bytes'] / MiB:.1f} | {peak} | "
            f"{'yes' if row['bit_exact'] else 'no'} |")
    lines += ["", "Merged switch time (A -> B), LoRA over MultiDelta:",
              "", "| model | LoRA / element-sparse | LoRA / S2FT blocks | LoRA switch (ms) | element-sparse (ms) | "
              "S2FT blocks (ms) |", "|---|---:|---:|---:|---:|---:|"]
    by_model: dict[str, dict[str, float]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["method"]] = statistics.median(row["switch_s"])
    for model, switch in by_model.items():
        lora, entries, blocks = (switch["PEFT LoRA"], switch["MultiDelta, element-sparse"],
                                 switch["MultiDelta, S2FT blocks"])
        lines.append(f"| {model} | {lora / entries:.1f}x | {lora / blocks:.1f}x | {lora * 1e3:.2f} | "
                     f"{entries * 1e3:.2f} | {blocks * 1e3:.2f} |")
    widths = [m for m in by_model if m in WIDTHS]
    if len(widths) >= 2:
        first, last = widths[0], widths[-1]
        lines += ["", f"Random LLaMA-shaped models (2 layers), from {first} to {last}: " + ", ".join(
            f"{method} switch x{by_model[last][method] / by_model[first][method]:.1f}"
            for method in ("PEFT LoRA", "MultiDelta, element-sparse", "MultiDelta, S2FT blocks"))
            + f" (weight entries per layer x{layer_entries(last) / layer_entries(first):.1f}, "
            f"trainable per layer x{trainable_ratio(rows, first, last):.1f})."]
    return "\n".join(lines) + "\n"


def layer_entries(model: str) -> int:
    hidden, inter, heads, kv = WIDTHS[model]
    kv_dim = hidden // heads * kv
    return 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter


def trainable_ratio(rows: list[dict[str, Any]], first: str, last: str) -> float:
    count = {row["model"]: row["trainable"] for row in rows if row["method"] == "PEFT LoRA"}
    return count[last] / count[first]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank; sparse deltas match its count")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="markdown table (a .json with every time beside it)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(run_model(args.memory_of, args.rank, 1, memory=True)))
        return
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {MODELS}")
    import peft

    rows = []
    for name in models:
        result = run_model(name, args.rank, args.repeats, memory=False)["rows"]
        peaks = memory_in_subprocess(name, args.rank)
        for row in result:
            row["peak_switch_bytes"] = peaks[row["method"]]
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}), flush=True)
        rows += result
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "peft": peft.__version__, "threads": args.threads, "repeats": args.repeats}
    command = "OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/switching.py", *sys.argv[1:]])
    table = render(rows, command, meta)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
        args.output.with_suffix(".json").write_text(json.dumps({"command": command, **meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
