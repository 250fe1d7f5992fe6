#!/usr/bin/env bash
# The GPU record in one go (issue 15, item 5): on a CUDA machine with nothing outside reachable, in under 8 minutes
# on one H100/H200:
#   1. the step benchmark in bf16 on SmolLM2-135M-Instruct (real weights, from the converted cache) and on a
#      LLaMA-shaped 1.24B model built from Llama-3.2-1B's config with random weights: floor, full, LoRA, PEFT SHiRA
#      and every sparse method (benchmarks/step_benchmark.py --methods all, every method in one process);
#   2. a 2-step FSDP2 run of every method through the CLI (`sparse-lightning fit` with
#      configs/strategy/fsdp2_bf16.yaml: bf16 parameters, fp32 reduction, fp32 deltas) on a SmolLM2-shaped LLaMA
#      with random weights and a byte-level tokenizer, built here (no file needed), on min(GPUs, 2) ranks;
#   3. Lightning's FSDP1 `FSDPStrategy` for every method when two GPUs are present (otherwise it says so);
#   4. (SECTIONS=memory, ~4 minutes alone) peak GPU memory per phase of every method on a ~1B LLaMA in bf16
#      (benchmarks/memory_table.py) beside `sparse-lightning estimate`'s prediction.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]      # default: benchmarks/results/gpu_<UTC date>_<time>
#
# Writes RESULTS_DIR/{env.txt, gpu_smollm2.md/.json, gpu_llama1b.md/.json, fsdp.md, gpu_memory_table.md/.json,
# logs/}, and prints
# SUMMARY.md there: what ran, what did not and why.
#
# What the machine needs (nothing is downloaded):
#   - this checkout and a Python with its dependencies and a CUDA build of torch (`PYTHON=...`; default
#     .venv/bin/python when it exists, else python3). peft >= 0.17 for SHiRA.
#   - for SmolLM2 only: the converted model, i.e. the directory
#     $SPARSE_LIGHTNING_CACHE/models/SmolLM2-135M-Instruct (config.json, model.safetensors (538 MB, fp32),
#     tokenizer.json, tokenizer_config.json, generation_config.json, chat_template.jinja) made by any earlier run
#     (`python -c "from sparse_lightning.models import prefetch_default_models as p; p()"`); carry that directory
#     and point SPARSE_LIGHTNING_CACHE at its grandparent (default ~/.cache/sparse_lightning). Without it that
#     section is reported as not run; everything else still runs.
#
# Knobs: DRY_RUN=1 runs every piece on the CPU at toy sizes (the tiny LLaMA for both benchmark sections, a tiny
# model for the FSDP runs, 1 rank, every cap x8) to check the entry points; BUDGET_S (default 470) is the
# wall-clock budget: a section that would start past it is skipped and reported; STEPS / WARMUP (default 10 / 3);
# SECTIONS (default "bench fsdp"; add "memory" for part 4) picks the parts to run.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$SECONDS
if [ "${DRY_RUN:-0}" = 1 ]; then SCALE=8; else SCALE=1; fi  # a (shared) CPU is far slower than a GPU
BUDGET_S=${BUDGET_S:-$((470 * SCALE))}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
DRY_RUN=${DRY_RUN:-0}
SECTIONS=${SECTIONS:-bench fsdp}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS=${1:-benchmarks/results/gpu_$(date -u +%Y%m%d_%H%M)}
mkdir -p "$RESULTS/logs"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
SUMMARY="$RESULTS/SUMMARY.md"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $((SECONDS - START)); }
# run_capped SECONDS NAME LOG COMMAND...: runs COMMAND with a cap that never passes the budget; 0 on success.
run_capped() {
  local cap=$(($1 * SCALE)) name=$2 log=$3; shift 3
  local left=$((BUDGET_S - $(elapsed)))
  if [ "$left" -lt 20 ]; then note "- $name: NOT RUN (budget of ${BUDGET_S}s spent at $(elapsed)s)"; return 2; fi
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$cap" "$@" > "$log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then note "- $name: ok in $((SECONDS - t0))s";
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "- $name: TIMED OUT after ${cap}s (log: $log)";
  else note "- $name: FAILED rc=$rc in $((SECONDS - t0))s (log: $log): $(grep -v '^\s*$' "$log" | tail -n 1)"; fi
  return $rc
}

# ------------------------------------------------------------------------------------------------ environment
"$PYTHON" - > "$RESULTS/env.txt" 2>&1 <<'EOF'
import platform, subprocess, torch, transformers, lightning
try:
    import peft; peft_version = peft.__version__
except ImportError:
    peft_version = "missing (LoRA and SHiRA will fail)"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, lightning {lightning.__version__}, peft {peft_version}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  [{i}] {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv"], capture_output=True, text=True, timeout=20).stdout)
except Exception as error:
    print(f"nvidia-smi: {error}")
EOF
cat "$RESULTS/env.txt"
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
note "# GPU script, $(date -u '+%Y-%m-%d %H:%M') UTC: $(grep -m 1 '^python' "$RESULTS/env.txt")"
note "GPUs: $GPUS; results in $RESULTS; budget ${BUDGET_S}s; DRY_RUN=$DRY_RUN"
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=(--device cpu --dtype bfloat16 --threads 2)
  ACCELERATOR=cpu
  RANKS=1
elif [ "$GPUS" -ge 1 ]; then
  DEVICE=(--device cuda --dtype bfloat16)
  ACCELERATOR=gpu
  RANKS=$((GPUS >= 2 ? 2 : 1))
else
  note "no CUDA device visible: nothing run (DRY_RUN=1 checks the pieces on the CPU)"
  exit 1
fi
BENCH=("$PYTHON" benchmarks/step_benchmark.py "${DEVICE[@]}" --methods all --in-process --keep-going
       --steps "$STEPS" --warmup "$WARMUP")

# ----------------------------------------------------------------------------------------- 1. step benchmark
note ""
note "## step benchmark (bf16)"
if [[ " $SECTIONS " != *" bench "* ]]; then
  note "- NOT RUN (SECTIONS=$SECTIONS)"
elif [ "$DRY_RUN" = 1 ]; then
  run_capped 300 "tiny LLaMA (stands in for SmolLM2)" "$RESULTS/logs/bench_smollm2.log" \
    "${BENCH[@]}" --model llama_tiny --output "$RESULTS/gpu_smollm2.md"
elif "$PYTHON" -c "
from sparse_lightning.models import cache_dir; import sys
sys.exit(0 if (cache_dir() / 'models/SmolLM2-135M-Instruct/config.json').is_file() else 1)" 2>/dev/null; then
  # 8 x 1024 tokens: 4 x 256 (the CPU batch) leaves an H100 waiting on kernel launches
  run_capped 150 "SmolLM2-135M-Instruct, 8 x 1024 tokens" "$RESULTS/logs/bench_smollm2.log" \
    "${BENCH[@]}" --model smollm2 --batch-size 8 --seq-len 1024 --output "$RESULTS/gpu_smollm2.md"
else
  note "- SmolLM2-135M-Instruct: NOT RUN: no converted model under \$SPARSE_LIGHTNING_CACHE/models (see the header)"
fi
if [[ " $SECTIONS " != *" bench "* ]]; then
  :
elif [ "$DRY_RUN" = 1 ]; then
  run_capped 300 "tiny LLaMA (stands in for the 1.24B)" "$RESULTS/logs/bench_llama1b.log" \
    "${BENCH[@]}" --model llama_tiny --output "$RESULTS/gpu_llama1b.md"
else
  run_capped 200 "LLaMA-shaped 1.24B (random weights), 4 x 1024 tokens" "$RESULTS/logs/bench_llama1b.log" \
    "${BENCH[@]}" --model llama1b --output "$RESULTS/gpu_llama1b.md"
fi

# ------------------------------------------------------------------------------- 2./3. FSDP2 (and FSDP1) runs
note ""
note "## FSDP runs: 2 optimizer steps of every method through \`sparse-lightning fit\`"
FSDP_MODEL="$RESULTS/fsdp_model"
SHAPE=$([ "$DRY_RUN" = 1 ] && echo tiny || echo small)
[[ " $SECTIONS " == *" fsdp "* ]] && "$PYTHON" benchmarks/random_llama.py "$FSDP_MODEL" "$SHAPE" \
  > "$RESULTS/logs/fsdp_model.log" 2>&1
if [[ " $SECTIONS " != *" fsdp "* ]]; then
  note "- NOT RUN (SECTIONS=$SECTIONS)"
  FSDP_METHODS=()
elif [ ! -f "$FSDP_MODEL/config.json" ]; then
  note "- building the FSDP model FAILED: $(tail -n 1 "$RESULTS/logs/fsdp_model.log"); no FSDP run"
  FSDP_METHODS=()
else
  note "FSDP model: $(tail -n 1 "$RESULTS/logs/fsdp_model.log") (random weights, byte-level tokenizer)"
  FSDP_METHODS=($("$PYTHON" -c "from sparse_lightning.registry import names; print(*names())"))  # every method
fi
# The shipped fragments, 2 steps, no validation, no checkpoint, CSV logs under RESULTS/fsdp/<strategy>/<method>.
fit_command() {  # fit_command METHOD LOGDIR ARGS... -> the command in FIT
  local method=$1 logdir=$2; shift 2
  FIT=("$PYTHON" -m sparse_lightning.cli fit --config configs/model/smollm2.yaml --config configs/task/alpaca.yaml
       --config "configs/method/smollm2/$method.yaml" "$@"
       --model.model_name_or_path "$FSDP_MODEL" --data.data_files bundled --data.batch_size 2
       --trainer.accelerator "$ACCELERATOR" --trainer.max_steps 2 --trainer.accumulate_grad_batches 1
       --trainer.limit_val_batches 0 --trainer.log_every_n_steps 1 --trainer.enable_checkpointing false
       --trainer.logger.init_args.save_dir "$logdir" --trainer.logger.init_args.name "$method")
}
for method in "${FSDP_METHODS[@]}"; do
  fit_command "$method" "$RESULTS/fsdp/fsdp2" --config configs/strategy/fsdp2_bf16.yaml \
    --trainer.devices "$RANKS" --trainer.strategy.init_args.data_parallel_size "$RANKS"
  run_capped 75 "FSDP2 bf16 params ($RANKS rank(s)), $method" "$RESULTS/logs/fsdp2_$method.log" "${FIT[@]}"
done
if [ "$GPUS" -ge 2 ] && [ "$DRY_RUN" != 1 ]; then
  for method in "${FSDP_METHODS[@]}"; do
    fit_command "$method" "$RESULTS/fsdp/fsdp1" --trainer.strategy fsdp --trainer.devices 2 \
      --trainer.precision bf16-mixed
    run_capped 75 "FSDP1 FSDPStrategy, bf16-mixed (2 ranks), $method" "$RESULTS/logs/fsdp1_$method.log" "${FIT[@]}"
  done
else
  note "- FSDP1 (Lightning's FSDPStrategy): NOT RUN: it needs two GPUs (this machine: $GPUS$([ "$DRY_RUN" = 1 ] && echo ', dry run'))"
fi
# The training loss of every FSDP run that logged one.
"$PYTHON" - "$RESULTS" > "$RESULTS/fsdp.md" 2>&1 <<'EOF'
import csv, sys
from pathlib import Path
root = Path(sys.argv[1]) / "fsdp"
print("| strategy | method | steps logged | train/loss per step |\n|---|---|---:|---|")
for metrics in sorted(root.glob("*/*/version_*/metrics.csv")):
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    strategy, method = metrics.parts[-4], metrics.parts[-3]
    losses = ", ".join(f"{float(r['train/loss']):.4f}" for r in rows)
    print(f"| {strategy} | {method} | {len(rows)} | {losses} |")
EOF
note ""
cat "$RESULTS/fsdp.md" | tee -a "$SUMMARY" > /dev/null
# ------------------------------------------------------------------------- 4. memory per phase at ~1B in bf16
# benchmarks/memory_table.py on one GPU: every shipped SmolLM2 fragment through `sparse-lightning fit` on a
# Llama-3.2-1B-shaped model (random weights, byte-level tokenizer: ~0.97B parameters) stored in bf16, 1 x 1024
# tokens per batch, 6 steps; torch's peak allocated GPU memory per phase beside `sparse-lightning estimate`'s.
note ""
note "## memory per phase, LLaMA-shaped ~1B in bf16 (benchmarks/memory_table.py)"
if [[ " $SECTIONS " != *" memory "* ]]; then
  note "- NOT RUN (SECTIONS=$SECTIONS; SECTIONS=memory runs it alone, ~4 minutes)"
else
  MEMORY_MODEL="$RESULTS/memory_model"
  if [ "$DRY_RUN" = 1 ]; then
    MEMORY_SHAPE=(tiny --dtype bfloat16); MEMORY_RUN=(--device cpu --seq-len 64)
  else
    MEMORY_SHAPE=(1b --dtype bfloat16 --device cuda); MEMORY_RUN=(--device cuda --seq-len 1024)
  fi
  if run_capped 120 "random LLaMA for the memory table (${MEMORY_SHAPE[0]})" "$RESULTS/logs/memory_model.log" \
      "$PYTHON" benchmarks/random_llama.py "$MEMORY_MODEL" "${MEMORY_SHAPE[@]}"; then
    run_capped 330 "memory table, every method, 1 rank" "$RESULTS/logs/memory_table.log" \
      "$PYTHON" benchmarks/memory_table.py --model "$MEMORY_MODEL" --dtype bfloat16 --ranks 1 --batch-size 1 \
      "${MEMORY_RUN[@]}" --scratch "$RESULTS/memory_scratch" --output "$RESULTS/gpu_memory_table.md" \
      && grep -m 1 "within 15%" "$RESULTS/gpu_memory_table.md" | tee -a "$SUMMARY"
  fi
fi

note ""
note "total: $(elapsed)s of the ${BUDGET_S}s budget"
echo "--- $SUMMARY"
cat "$SUMMARY"
