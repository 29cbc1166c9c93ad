#!/usr/bin/env bash
# CPU, offline smoke run of the whole vision pipeline: tiny CLIP config, generated image tasks, every
# registered fine-tuning mode and merge. Writes OUTDIR/results.json and OUTDIR/results.md.
#   bash launch_scripts/vision_smoke.sh [OUTDIR]
# The commands run in one Python process (launch_scripts/_smoke.sh); SMOKE_SUBPROCESS=1 runs one process each.
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
        --results-json "$OUT/results.json" --plugins vision.synthetic)
DOMAIN=vision
source launch_scripts/_smoke.sh
smoke_run
