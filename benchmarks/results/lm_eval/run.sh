#!/bin/bash
# The evaluate example of docs/evaluation.md (SmolLM2 base vs a 50-step SIFT math delta, AddSub first 100): run from the repository root.
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
NAME=sift-math-issue12
RUN=runs/$NAME
echo "lock acquired $(date -u +%T)"
STEPS=50; LIMIT=100
echo "steps $STEPS limit $LIMIT"
/usr/bin/time -f "fit: %e s wall, %U s user" .venv/bin/sparse-lightning fit --config configs/model/smollm2.yaml \
  --config configs/task/math.yaml --config configs/method/smollm2/sift.yaml \
  --trainer.max_steps $STEPS --trainer.limit_val_batches 0 --trainer.enable_progress_bar false \
  --trainer.logger.init_args.name $NAME \
  --trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint --trainer.callbacks.every_n_train_steps $STEPS \
  --trainer.callbacks.dirpath $RUN/ckpt 2>&1 | grep -v "LeafSpec" | tail -5
CKPT=$(ls $RUN/ckpt/*.ckpt | head -1)
echo "checkpoint: $CKPT $(date -u +%T)"
/usr/bin/time -f "export: %e s wall, %U s user" .venv/bin/sparse-lightning export --ckpt_path "$CKPT" --output $RUN/delta
for what in base sift; do
  model=SmolLM2-135M-Instruct; [ $what = sift ] && model=$RUN/delta
  /usr/bin/time -f "evaluate $what: %e s wall, %U s user" .venv/bin/sparse-lightning evaluate --model $model \
    --tasks sl_math_addsub --limit $LIMIT --batch_size 8 --output $RUN/lm_eval_$what.json 2>&1 | grep -v "it/s\]\|it\]$\|s/it\]"
done
echo "end $(date -u +%T)"
