#!/usr/bin/env bash
# CPU, offline smoke run of the whole NLP pipeline: tiny T5 config, an offline word-level tokenizer and
# generated text tasks in the real readers' formats, every registered fine-tuning mode and merge.
# Writes OUTDIR/results.json and OUTDIR/results.md.
#   bash launch_scripts/nlp_smoke.sh [OUTDIR]
# The commands run in one Python process (launch_scripts/_smoke.sh); SMOKE_SUBPROCESS=1 runs one process each.
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
$PY -m nlp.synthetic --data-location "$DATA"
COMMON=(--model talos-tiny-t5 --tokenizer "$DATA/tokenizer" --data-location "$DATA" --save "$SAVE"
        --eval-datasets "$TASKS" --control-dataset synth_control --batch-size 16 --num-grad-accumulation 1
        --num-steps 100 --lr 1e-2 --max-seq-len 64 --calibration-batch-size 16 --eval-batch-size 64
        --lora-rank 4 --attn-implementation eager --device cpu --no-progress --results-json "$OUT/results.json"
        --plugins nlp.synthetic)
DOMAIN=nlp
source launch_scripts/_smoke.sh
smoke_run
