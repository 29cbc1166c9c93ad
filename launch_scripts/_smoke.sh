# Shared by vision_smoke.sh and nlp_smoke.sh (sourced, not run): queue every registered mode's fine-tunes and
# evaluations and every merge (addition, and negation but for sum), then run the queue and the report.
# Expects: DOMAIN (vision|nlp), TASKS (comma-separated), COMMON (array of flags), OUT, PY.
# The commands run in one Python process (python -m talos.run_commands: each line's main(argv), exactly what
# `python <domain>/<script>.py ARGS` runs) because importing torch and the model library dominates on CPU;
# SMOKE_SUBPROCESS=1 runs each command as its own process instead. The queue is kept in $OUT/commands.txt.
smoke_run() {
  local CMDS="$OUT/commands.txt" modes merges mode merge task
  : > "$CMDS"
  queue() { printf '%q ' "$@" >> "$CMDS"; echo >> "$CMDS"; }
  modes=$("$PY" -c "from talos.modes import run_order; print(' '.join(run_order()))")
  merges=$("$PY" -c "from talos.merges import MERGES; print(' '.join(MERGES.names()))")
  for mode in $modes; do
    for task in ${TASKS//,/ }; do
      queue "$DOMAIN/finetune.py" "${COMMON[@]}" --finetuning-mode "$mode" --train-dataset "$task"
    done
    queue "$DOMAIN/eval_single_task.py" "${COMMON[@]}" --finetuning-mode "$mode"
    queue "$DOMAIN/eval_task_addition.py" "${COMMON[@]}" --finetuning-mode "$mode"
    queue "$DOMAIN/eval_task_negation.py" "${COMMON[@]}" --finetuning-mode "$mode"
  done
  for merge in $merges; do
    queue "$DOMAIN/eval_task_addition.py" "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
    if [ "$merge" != sum ]; then  # (sum is the standard row of the negation table already)
      queue "$DOMAIN/eval_task_negation.py" "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
    fi
  done
  if [[ "${SMOKE_SUBPROCESS:-0}" == 1 ]]; then
    while IFS= read -r line; do eval "\"\$PY\" $line"; done < "$CMDS"
  else
    "$PY" -m talos.run_commands "$CMDS"
  fi
  "$PY" -m talos.report "$OUT/results.json" --out "$OUT/results.md"
}
