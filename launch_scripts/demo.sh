#!/usr/bin/env bash
# The offline demo: task arithmetic on a laptop CPU in minutes, no downloads.
# A toy CLIP (vision/demo/toy_clip.safetensors, pre-trained by `python -m vision.demo.pretrain`) is fine-tuned
# on six tasks of a procedurally generated world, then evaluated on single-task accuracy, task addition, task
# negation and merges; writes OUTDIR/results.json, results.md, figures (*.png), diagnostics.json,
# timings.json and demo.log.
#   bash launch_scripts/demo.sh [OUTDIR] [--world disjoint|overlapping] [--full] [--subprocess]
#                               [--modes standard,talos] [--merges sum,ties] [--set epochs=1 ...]
# Default: the disjoint world (one image domain per task), modes standard, linear, lota, talos, merges sum,
# ties, tall_masks (about 5 minutes on 2 cores); --full: every registered mode and merge.
# Re-running reuses finished runs (each stage skips itself when its artifact exists).
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # the first argument is OUTDIR unless it is a flag
    ARGS+=("$1")
    shift
fi
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
exec $PY -m vision.demo.run "${ARGS[@]}" "$@"
