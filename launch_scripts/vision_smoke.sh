#!/usr/bin/env bash
# CPU, offline smoke run of the whole vision pipeline: tiny CLIP config, generated image tasks, every
# registered fine-tuning mode and merge. Writes OUTDIR/results.json and OUTDIR/results.md.
#   bash launch_scripts/vision_smoke.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/vision_smoke}
PY=${PYTHON:-python}
DATA="$OUT/data"
SAVE="$OUT/runs"
TASKS=SynthShapes,SynthColors,SynthStripes
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
mkdir -p "$OUT"
rm -f "$OUT/results.json"
$PY vision/prepare_datasets.py --dataset synthetic --data-location "$DATA"
COMMON=(--model talos-tiny-vit --pretrained none --data-location "$DATA" --save "$SAVE"
        --eval-datasets "$TASKS" --control-dataset SynthControl --batch-size 32 --lr 1e-3 --warmup-length 5
        --calibration-batch-size 16 --eval-batch-size 128 --num-workers 0 --device cpu --no-progress
        --results-json "$OUT/results.json")
MODES=$($PY -c "from talos.modes import run_order; print(' '.join(run_order()))")
MERGES=$($PY -c "from talos.merges import MERGES; print(' '.join(MERGES.names()))")
for mode in $MODES; do
  for task in ${TASKS//,/ }; do
    $PY vision/finetune.py "${COMMON[@]}" --finetuning-mode "$mode" --train-dataset "$task"
  done
  $PY vision/eval_single_task.py "${COMMON[@]}" --finetuning-mode "$mode"
  $PY vision/eval_task_addition.py "${COMMON[@]}" --finetuning-mode "$mode"
  $PY vision/eval_task_negation.py "${COMMON[@]}" --finetuning-mode "$mode"
done
for merge in $MERGES; do
  $PY vision/eval_task_addition.py "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
  if [ "$merge" != sum ]; then
    $PY vision/eval_task_negation.py "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
  fi
done
$PY -m talos.report "$OUT/results.json" --out "$OUT/results.md"
