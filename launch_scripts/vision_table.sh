#!/usr/bin/env bash
# The paper's vision tables on CUDA GPUs: fine-tune the 8 tasks with every registered mode, then evaluate
# single-task accuracy, task addition and task negation (ImageNet control).
#   bash launch_scripts/vision_table.sh ViT-B-32 [DATA_LOCATION] [SAVE]
# Extra flags for every script can be passed through EXTRA_ARGS, e.g. EXTRA_ARGS="--wandb".
# GPUs: with N visible GPUs (NGPU, default: nvidia-smi's count) the 8 independent fine-tunes of a mode run
# N at a time, one task per GPU. NPROC_PER_TASK=K instead launches each fine-tune on K GPUs with torchrun.
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
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NPROC_PER_TASK=${NPROC_PER_TASK:-1}
finetune_all() {  # $1 = mode
  local i=0
  for task in "${TASKS[@]}"; do
    if [ "$NPROC_PER_TASK" -gt 1 ]; then
      torchrun --standalone --nproc_per_node="$NPROC_PER_TASK" vision/finetune.py "${COMMON[@]}" \
        --finetuning-mode "$1" --train-dataset "$task"
    elif [ "$NGPU" -gt 1 ]; then
      CUDA_VISIBLE_DEVICES=$((i % NGPU)) $PY vision/finetune.py "${COMMON[@]}" --finetuning-mode "$1" \
        --train-dataset "$task" > "$SAVE/finetune-$MODEL-$1-$task.log" 2>&1 &
      i=$((i + 1))
      if [ $((i % NGPU)) -eq 0 ]; then wait; fi
    else
      $PY vision/finetune.py "${COMMON[@]}" --finetuning-mode "$1" --train-dataset "$task"
    fi
  done
  wait
}
mkdir -p "$SAVE"
for mode in $MODES; do
  finetune_all "$mode"
  $PY vision/eval_single_task.py "${COMMON[@]}" --finetuning-mode "$mode"
  $PY vision/eval_task_addition.py "${COMMON[@]}" --finetuning-mode "$mode"
  $PY vision/eval_task_negation.py "${COMMON[@]}" --finetuning-mode "$mode"
done
for merge in $MERGES; do
  $PY vision/eval_task_addition.py "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
done
$PY -m talos.report "$SAVE/$MODEL-results.json" --out "$SAVE/$MODEL-results.md"
