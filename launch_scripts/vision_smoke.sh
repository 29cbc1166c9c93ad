#!/usr/bin/env bash
# CPU, offline smoke run of the whole vision pipeline: tiny CLIP config, generated image tasks, every
# registered fine-tuning mode and merge (the sweep of talos/app/sweep.py). Writes OUTDIR/results.json and
# OUTDIR/results.md.
#   bash launch_scripts/vision_smoke.sh [OUTDIR]
# The scripts run in one Python process (SMOKE_RUN=inprocess, the default); SMOKE_RUN=subprocess runs one
# process each.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/vision_smoke}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
$PY vision/prepare_datasets.py --dataset synthetic --data-location "$OUT/data"
exec $PY -m talos.app.sweep --domain vision --tasks SynthShapes,SynthColors,SynthStripes \
  --run "${SMOKE_RUN:-inprocess}" --results "$OUT/results.json" --fresh -- \
  --model talos-tiny-vit --pretrained none --data-location "$OUT/data" --save "$OUT/runs" \
  --control-dataset SynthControl --batch-size 32 --lr 1e-3 --warmup-length 5 --calibration-batch-size 16 \
  --eval-batch-size 128 --num-workers 0 --device cpu --no-progress --plugins vision.synthetic
