#!/usr/bin/env bash
# The paper's vision tables on CUDA GPUs: fine-tune the 8 tasks with every registered mode, then evaluate
# single-task accuracy, task addition and task negation (ImageNet control).
#   bash launch_scripts/vision_table.sh ViT-B-32 [DATA_LOCATION] [SAVE]
# Extra flags for every script can be passed through EXTRA_ARGS, e.g. EXTRA_ARGS="--wandb".
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: vision_table.sh MODEL [DATA_LOCATION] [SAVE]}
DATA=${2:-$HOME/data}
SAVE=${3:-runs}
PY=${PYTHON:-python}
TASKS=(Cars DTD EuroSAT GTSRB MNIST RESISC45 SUN397 SVHN)
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
COMMON=(--model "$MODEL" --data-location "$DATA" --save "$SAVE" --results-json "$SAVE/$MODEL-results.json" "${EXTRA[@]}")
MODES=$($PY -c "from talos.modes import run_order; print(' '.join(run_order()))")
MERGES=$($PY -c "from talos.merges import MERGES; print(' '.join(MERGES.names()))")
for mode in $MODES; do
  for task in "${TASKS[@]}"; do
    $PY vision/finetune.py "${COMMON[@]}" --finetuning-mode "$mode" --train-dataset "$task"
  done
  $PY vision/eval_single_task.py "${COMMON[@]}" --finetuning-mode "$mode"
  $PY vision/eval_task_addition.py "${COMMON[@]}" --finetuning-mode "$mode"
  $PY vision/eval_task_negation.py "${COMMON[@]}" --finetuning-mode "$mode"
done
for merge in $MERGES; do
  $PY vision/eval_task_addition.py "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
done
$PY -m talos.report "$SAVE/$MODEL-results.json" --out "$SAVE/$MODEL-results.md"
