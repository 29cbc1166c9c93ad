#!/usr/bin/env bash
# The paper's T5 tables on CUDA GPUs: fine-tune the 7 NLP tasks with every registered mode, then evaluate
# single-task accuracy, task addition (every merge for the standard mode) and task negation (RTE control).
#   bash launch_scripts/nlp_table.sh t5-base [STORYCLOZE_DIR] [SAVE]
# Datasets come from the Hugging Face hub (cached on first use); StoryCloze 2016 is a manual download (its
# val/test CSVs in STORYCLOZE_DIR, default $STORYCLOZE_DIR). Extra flags for every script go through
# EXTRA_ARGS, e.g. EXTRA_ARGS="--wandb --num-steps 20000". Paper settings are the flag defaults (lr 1e-4,
# 64 x 16 examples per step, 75,000 constant-lr steps, bf16 on CUDA, max length 128, sparsity 0.9).
# GPUs: with N visible GPUs (NGPU, default: nvidia-smi's count) the 7 independent fine-tunes of a mode run
# N at a time, one task per GPU. NPROC_PER_TASK=K instead launches each fine-tune on K GPUs with torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: nlp_table.sh MODEL [STORYCLOZE_DIR] [SAVE]}
STORYCLOZE=${2:-${STORYCLOZE_DIR:-}}
SAVE=${3:-runs}
PY=${PYTHON:-python}
TASKS=(qasc wiki_qa quartz paws story_cloze winogrande wsc)
TAG=${MODEL//\//__}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
COMMON=(--model "$MODEL" --save "$SAVE" --results-json "$SAVE/nlp-$TAG-results.json" "${EXTRA[@]}")
if [ -n "$STORYCLOZE" ]; then COMMON+=(--storycloze-dir "$STORYCLOZE"); fi
MODES=$($PY -c "from talos.modes import run_order; print(' '.join(run_order()))")
MERGES=$($PY -c "from talos.merges import MERGES; print(' '.join(MERGES.names()))")
NGPU=${NGPU:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
NPROC_PER_TASK=${NPROC_PER_TASK:-1}
finetune_all() {  # $1 = mode
  local i=0 pids=()
  for task in "${TASKS[@]}"; do
    if [ "$NPROC_PER_TASK" -gt 1 ]; then
      torchrun --standalone --nproc_per_node="$NPROC_PER_TASK" nlp/finetune.py "${COMMON[@]}" \
        --finetuning-mode "$1" --train-dataset "$task"
    elif [ "$NGPU" -gt 1 ]; then
      CUDA_VISIBLE_DEVICES=$((i % NGPU)) $PY nlp/finetune.py "${COMMON[@]}" --finetuning-mode "$1" \
        --train-dataset "$task" > "$SAVE/finetune-nlp-$TAG-$1-$task.log" 2>&1 &
      pids+=($!)
      i=$((i + 1))
      if [ $((i % NGPU)) -eq 0 ]; then for p in "${pids[@]}"; do wait "$p"; done; pids=(); fi
    else
      $PY nlp/finetune.py "${COMMON[@]}" --finetuning-mode "$1" --train-dataset "$task"
    fi
  done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p"; done  # a failed fine-tune stops the script
}
mkdir -p "$SAVE"
for mode in $MODES; do
  finetune_all "$mode"
  $PY nlp/eval_single_task.py "${COMMON[@]}" --finetuning-mode "$mode"
  $PY nlp/eval_task_addition.py "${COMMON[@]}" --finetuning-mode "$mode"
  $PY nlp/eval_task_negation.py "${COMMON[@]}" --finetuning-mode "$mode"
done
for merge in $MERGES; do
  $PY nlp/eval_task_addition.py "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
done
$PY -m talos.report "$SAVE/nlp-$TAG-results.json" --out "$SAVE/nlp-$TAG-results.md"
