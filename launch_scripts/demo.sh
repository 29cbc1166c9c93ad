#!/usr/bin/env bash
# The offline demo: the whole TaLoS pipeline on a laptop CPU in minutes, no downloads.
# A toy CLIP (vision/demo/toy_clip.safetensors, pre-trained by `python -m vision.demo.pretrain`) is fine-tuned
# on six tasks of a procedurally generated world with every registered mode (talos.modes.run_order()), then
# evaluated on single-task accuracy, task addition, task negation and every registered merge; writes
# OUTDIR/results.json, results.md, figures (*.png), diagnostics.json, timings.json and demo.log.
#   bash launch_scripts/demo.sh [OUTDIR] [--subprocess] [--modes standard,talos] [--set epochs=1 ...]
# Re-running reuses finished runs (each stage skips itself when its artifact exists).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/demo}
[ $# -gt 0 ] && shift
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
exec $PY -m vision.demo.run "$OUT" "$@"
