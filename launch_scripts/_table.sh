# Shared by vision_table.sh and nlp_table.sh (sourced, not run): every mode's per-task fine-tunes, spread
# over the visible GPUs, then the three evaluations per mode, every merge (addition and negation), and the
# markdown report.
# Expects: DOMAIN (vision|nlp), TASKS (array), COMMON (array of flags for every script), RESULTS (json path),
# PY. GPUs: NGPU (default: nvidia-smi's count) runs the independent fine-tunes of a mode NGPU at a time, one
# task per GPU (logs in $SAVE/finetune-*.log); NPROC_PER_TASK=K instead runs each fine-tune on K GPUs with
# torchrun. A failed fine-tune stops the sweep.
NGPU=${NGPU:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
NPROC_PER_TASK=${NPROC_PER_TASK:-1}

finetune_all() {  # $1 = mode
  local i=0 pids=() task p log
  for task in "${TASKS[@]}"; do
    if [ "$NPROC_PER_TASK" -gt 1 ]; then
      "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_TASK" "$DOMAIN/finetune.py" \
        "${COMMON[@]}" --finetuning-mode "$1" --train-dataset "$task"
    elif [ "$NGPU" -gt 1 ]; then
      log="$(dirname "$RESULTS")/finetune-$(basename "$RESULTS" .json)-$1-$task.log"
      CUDA_VISIBLE_DEVICES=$((i % NGPU)) "$PY" "$DOMAIN/finetune.py" "${COMMON[@]}" --finetuning-mode "$1" \
        --train-dataset "$task" > "$log" 2>&1 &
      pids+=($!)
      i=$((i + 1))
      if [ $((i % NGPU)) -eq 0 ]; then for p in "${pids[@]}"; do wait "$p"; done; pids=(); fi
    else
      "$PY" "$DOMAIN/finetune.py" "${COMMON[@]}" --finetuning-mode "$1" --train-dataset "$task"
    fi
  done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p"; done  # `wait PID` returns its status: set -e stops here
}

run_table() {
  local modes merges mode merge
  modes=$("$PY" -c "from talos.modes import run_order; print(' '.join(run_order()))")
  merges=$("$PY" -c "from talos.merges import MERGES; print(' '.join(MERGES.names()))")
  mkdir -p "$(dirname "$RESULTS")"
  for mode in $modes; do
    finetune_all "$mode"
    "$PY" "$DOMAIN/eval_single_task.py" "${COMMON[@]}" --finetuning-mode "$mode"
    "$PY" "$DOMAIN/eval_task_addition.py" "${COMMON[@]}" --finetuning-mode "$mode"
    "$PY" "$DOMAIN/eval_task_negation.py" "${COMMON[@]}" --finetuning-mode "$mode"
  done
  for merge in $merges; do
    "$PY" "$DOMAIN/eval_task_addition.py" "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
    if [ "$merge" != sum ]; then  # (sum is the standard row of the negation table already)
      "$PY" "$DOMAIN/eval_task_negation.py" "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
    fi
  done
  "$PY" -m talos.report "$RESULTS" --out "${RESULTS%.json}.md"
}
