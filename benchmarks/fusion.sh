#!/bin/bash
# Issue 12's fusion experiment on SmolLM2-135M-Instruct: a SIFT math delta and a SIFT commonsense delta (50 steps each,
# the shipped model + task + method configs otherwise), then each alone and fused on AddSub, boolq and ARC-Easy (first 100 each).
# Deltas already trained under runs/ are reused. Run from anywhere; one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
STEPS=${STEPS:-50}; LIMIT=${LIMIT:-100}
train() {  # name task: fit STEPS steps without validation, checkpoint at the end, export the delta
  local name=$1 task=$2 run=runs/$1
  [ -f $run/delta/delta.safetensors ] && { echo "reusing $run/delta"; return; }
  /usr/bin/time -f "fit $name: %e s wall, %U s user" .venv/bin/sparse-lightning fit --config configs/model/smollm2.yaml \
    --config configs/task/$task.yaml --config configs/method/smollm2/sift.yaml \
    --trainer.max_steps $STEPS --trainer.limit_val_batches 0 --trainer.enable_progress_bar false \
    --trainer.logger.init_args.name $name \
    --trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint --trainer.callbacks.every_n_train_steps $STEPS \
    --trainer.callbacks.dirpath $run/ckpt 2>&1 | tail -3
  .venv/bin/sparse-lightning export --ckpt_path "$(ls $run/ckpt/*.ckpt | head -1)" --output $run/delta
}
train sift-math-issue12 math
train sift-commonsense-issue12 commonsense
.venv/bin/python benchmarks/fusion.py --delta math=runs/sift-math-issue12/delta \
  --delta commonsense=runs/sift-commonsense-issue12/delta \
  --tasks sl_math_addsub,sl_commonsense_boolq,sl_commonsense_arc_easy --limit $LIMIT \
  --weights 0.5,0.5 --output benchmarks/results/fusion.md 2>&1 | grep --line-buffered -v "it/s\]\|it\]$\|s/it\]"
