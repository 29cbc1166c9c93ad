#!/usr/bin/env bash
# CPU, offline smoke run of the whole NLP pipeline: tiny T5 config, an offline word-level tokenizer and
# generated text tasks in the real readers' formats, every registered fine-tuning mode and merge (the sweep of
# talos/app/sweep.py). Writes OUTDIR/results.json and OUTDIR/results.md.
#   bash launch_scripts/nlp_smoke.sh [OUTDIR]
# The scripts run in one Python process (SMOKE_RUN=inprocess, the default); SMOKE_RUN=subprocess runs one
# process each.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/nlp_smoke}
PY=${PYTHON:-python}
# offline; one thread each: tiny models spend more time in thread synchronisation than in math
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1
$PY -m nlp.synthetic --data-location "$OUT/data"
exec $PY -m talos.app.sweep --domain nlp --tasks synth_qa,synth_para,synth_coref \
  --run "${SMOKE_RUN:-inprocess}" --results "$OUT/results.json" --fresh -- \
  --model talos-tiny-t5 --tokenizer "$OUT/data/tokenizer" --data-location "$OUT/data" --save "$OUT/runs" \
  --control-dataset synth_control --batch-size 16 --num-grad-accumulation 1 --num-steps 100 --lr 1e-2 \
  --max-seq-len 64 --calibration-batch-size 16 --eval-batch-size 64 --lora-rank 4 --attn-implementation eager \
  --device cpu --no-progress --plugins nlp.synthetic
