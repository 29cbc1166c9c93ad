#!/usr/bin/env bash
# CPU, offline smoke run of the whole NLP pipeline: tiny T5 config, an offline word-level tokenizer and
# generated text tasks in the real readers' formats, every registered fine-tuning mode and merge.
# Writes OUTDIR/results.json and OUTDIR/results.md.
#   bash launch_scripts/nlp_smoke.sh [OUTDIR]
# The script commands below run in one Python process (their main(argv), exactly what `python nlp/<script>.py
# ARGS` runs) because importing torch + transformers dominates on CPU; SMOKE_SUBPROCESS=1 runs each command
# as its own process instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/nlp_smoke}
PY=${PYTHON:-python}
DATA="$OUT/data"
SAVE="$OUT/runs"
TASKS=synth_qa,synth_para,synth_coref
# offline; one thread each: tiny models spend more time in thread synchronisation than in math
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1
mkdir -p "$OUT"
rm -f "$OUT/results.json"
CMDS="$OUT/commands.txt"
: > "$CMDS"
run() { printf '%q ' "$@" >> "$CMDS"; echo >> "$CMDS"; }

$PY -m nlp.synthetic --data-location "$DATA"
COMMON=(--model talos-tiny-t5 --tokenizer "$DATA/tokenizer" --data-location "$DATA" --save "$SAVE"
        --eval-datasets "$TASKS" --control-dataset synth_control --batch-size 16 --num-grad-accumulation 1
        --num-steps 100 --lr 1e-2 --max-seq-len 64 --calibration-batch-size 16 --eval-batch-size 64
        --lora-rank 4 --attn-implementation eager --device cpu --no-progress --results-json "$OUT/results.json")
MODES=$($PY -c "from talos.modes import run_order; print(' '.join(run_order()))")
MERGES=$($PY -c "from talos.merges import MERGES; print(' '.join(MERGES.names()))")
for mode in $MODES; do
  for task in ${TASKS//,/ }; do
    run nlp/finetune.py "${COMMON[@]}" --finetuning-mode "$mode" --train-dataset "$task"
  done
  run nlp/eval_single_task.py "${COMMON[@]}" --finetuning-mode "$mode"
  run nlp/eval_task_addition.py "${COMMON[@]}" --finetuning-mode "$mode"
  run nlp/eval_task_negation.py "${COMMON[@]}" --finetuning-mode "$mode"
done
for merge in $MERGES; do
  run nlp/eval_task_addition.py "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
  if [ "$merge" != sum ]; then
    run nlp/eval_task_negation.py "${COMMON[@]}" --finetuning-mode standard --merge "$merge"
  fi
done

if [[ "${SMOKE_SUBPROCESS:-0}" == 1 ]]; then
  while IFS= read -r line; do eval "$PY $line"; done < "$CMDS"
else
  $PY - "$CMDS" <<'PYEOF'
import importlib, shlex, sys
for line in open(sys.argv[1]):
    script, *argv = shlex.split(line)
    print("+ python", script, " ".join(argv[-4:]), flush=True)
    importlib.import_module(script.removesuffix(".py").replace("/", ".")).main(argv)
PYEOF
fi
$PY -m talos.report "$OUT/results.json" --out "$OUT/results.md"
