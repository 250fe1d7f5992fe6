"""Packing vs padding on real Alpaca data: padding fraction over a whole epoch, and training tokens per second.

Both modes use `AlpacaDataModule` exactly as `configs/task/alpaca.yaml` does (Alpaca template, max_length 384, 5%
held out, seed 42) on ../shared/data/alpaca/alpaca_data_5000.json; the packed mode adds `packing=True`, so each
training row holds several examples (best-fit decreasing into rows of up to 384 tokens, no attention across them;
`datamodules/packing.py`). `--batch-size` is examples per batch unpacked and rows per batch packed.

- Epoch figures come from iterating the whole training loader (no model): batches, real (non-padding) tokens,
  padding fraction = padding tokens / all tokens of the padded batches.
- Speed: SmolLM2-135M-Instruct (`CausalLMModule`, fp32, every weight trainable) runs forward + backward of
  `compute_loss` (the packed batches take the module's packed path: position ids, no mask, no cache) on the first
  `warmup + steps` batches of each loader; the median step over the measured steps (pooled over `--repeats` rounds
  that interleave the modes) gives real tokens/s and labelled (loss) tokens/s, and the epoch estimate is the epoch's
  real tokens over real tokens/s. No optimizer step: its cost is per step, not per token.

    OMP_NUM_THREADS=1 python benchmarks/packing.py --steps 6 --warmup 1 --repeats 1 --threads 1 \\
        --output benchmarks/results/packing.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.instruction import IGNORE_INDEX, AlpacaDataModule  # noqa: E402
from sparse_lightning.modules import CausalLMModule  # noqa: E402

MODES = ("padded", "packed")


def epoch_figures(datamodule: AlpacaDataModule) -> dict[str, Any]:
    batches = list(datamodule.train_dataloader())
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return {"batches": len(batches), "rows": sum(b["input_ids"].shape[0] for b in batches), "real_tokens": real,
            "padded_tokens": total, "padding_fraction": 1 - real / total,
            "labelled_tokens": sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
            "mean_row_length": total / sum(b["input_ids"].shape[0] for b in batches)}


def time_steps(module: CausalLMModule, batches: list[dict[str, torch.Tensor]], warmup: int) -> list[dict[str, float]]:
    measured = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        loss = module.compute_loss(batch)
        loss.backward()
        seconds = time.perf_counter() - start
        module.model.zero_grad(set_to_none=True)
        if index >= warmup:
            measured.append({"seconds": seconds, "real_tokens": int(batch["attention_mask"].sum()),
                             "labelled_tokens": int((batch["labels"] != IGNORE_INDEX).sum()),
                             "shape": list(batch["input_ids"].shape)})
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca" / "alpaca_data_5000.json"))
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="markdown table to write (and a .json beside it)")
    parser.add_argument("--render", default=None, help="only rewrite the table from this run's .json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        write_table(argparse.Namespace(**saved["args"]), saved["rows"], saved["examples"])
        return
    torch.set_num_threads(args.threads)

    datamodules = {}
    for mode in MODES:
        datamodule = AlpacaDataModule(data_files=args.data, tokenizer_name_or_path=args.model, template="alpaca",
                                      max_length=args.max_length, val_fraction=0.05, batch_size=args.batch_size,
                                      seed=42, packing=mode == "packed")
        datamodule.setup("fit")
        datamodules[mode] = datamodule
    epochs = {mode: epoch_figures(dm) for mode, dm in datamodules.items()}
    assert epochs["padded"]["real_tokens"] == epochs["packed"]["real_tokens"]  # the same tokens, differently laid out

    module = CausalLMModule(args.model)
    module.configure_model()
    module.model.train()
    steps: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            loader = iter(datamodules[mode].train_dataloader())
            batches = [next(loader) for _ in range(args.warmup + args.steps)]
            steps[mode] += time_steps(module, batches, args.warmup)
            print(f"{mode}: {[round(s['seconds'], 2) for s in steps[mode]]} s per step", flush=True)

    rows = []
    for mode in MODES:
        measured = steps[mode]
        seconds = sum(s["seconds"] for s in measured)
        real_per_s = sum(s["real_tokens"] for s in measured) / seconds
        labelled_per_s = sum(s["labelled_tokens"] for s in measured) / seconds
        epoch = epochs[mode]
        rows.append({"mode": mode, **epoch, "median_step_s": statistics.median(s["seconds"] for s in measured),
                     "real_tokens_per_s": real_per_s, "labelled_tokens_per_s": labelled_per_s,
                     "epoch_estimate_s": epoch["real_tokens"] / real_per_s, "measured_steps": measured})
    write_table(args, rows, len(datamodules["padded"].train_examples))


def write_table(args: argparse.Namespace, rows: list[dict[str, Any]], examples: int) -> None:
    padded, packed = rows
    lines = [
        f"# Packing vs padding: Alpaca, {args.model}, max_length {args.max_length}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()} CPU, torch {torch.__version__}, "
        f"{args.threads} thread(s), fp32, forward + backward (every weight trainable), {args.steps} timed step(s) "
        f"after {args.warmup} warm-up, {args.repeats} round(s); the machine was shared with other jobs (load ~7 on "
        "2 cores), so read the ratio more than the absolute speed.",
        "",
        "```bash",
        f"OMP_NUM_THREADS={args.threads} python benchmarks/packing.py --steps {args.steps} --warmup {args.warmup} "
        f"--repeats {args.repeats} --threads {args.threads} --batch-size {args.batch_size} "
        f"--max-length {args.max_length} --output {args.output}",
        "```",
        "",
        f"Training split: {examples} examples ({padded['real_tokens']:,} real tokens, {padded['labelled_tokens']:,} "
        f"labelled) of `{Path(args.data).name}` (5% held out). Batch: {args.batch_size} examples (padded) or "
        f"{args.batch_size} rows (packed). Tokens per second count real (non-padding) tokens over the timed steps.",
        "",
        "| mode | batches / epoch | examples per row | padding (epoch) | padding (timed steps) | mean row length | "
        "median step | real tokens / s | labelled tokens / s | epoch estimate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        measured = row["measured_steps"]
        timed_real = sum(s["real_tokens"] for s in measured)
        timed_all = sum(s["shape"][0] * s["shape"][1] for s in measured)
        lines.append(
            f"| {row['mode']} | {row['batches']:,} | {examples / row['rows']:.2f} | {100 * row['padding_fraction']:.1f}% "
            f"| {100 * (1 - timed_real / timed_all):.1f}% | {row['mean_row_length']:.0f} | {row['median_step_s']:.2f} s "
            f"| {row['real_tokens_per_s']:.0f} | {row['labelled_tokens_per_s']:.0f} | "
            f"{row['epoch_estimate_s'] / 60:.0f} min |")
    lines += [
        "",
        f"Packing: {packed['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x the real tokens per second and an "
        f"epoch estimate {padded['epoch_estimate_s'] / packed['epoch_estimate_s']:.2f}x shorter, with "
        f"{padded['batches'] / packed['batches']:.2f}x fewer optimizer steps per epoch (each holds that many times "
        "more tokens: adjust the learning rate or steps). The loss is the mean over the batch's labelled tokens in "
        "both modes; packed examples never attend to each other (tests/test_packing.py: the logits of each packed "
        "example equal its unpacked ones).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(
            json.dumps({"args": vars(args), "rows": rows, "examples": examples}, indent=1))


if __name__ == "__main__":
    main()
