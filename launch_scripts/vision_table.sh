#!/usr/bin/env bash
# The paper's vision tables on CUDA GPUs: fine-tune the 8 tasks with every registered mode, then evaluate
# single-task accuracy, task addition (every merge for the standard mode) and task negation (ImageNet control).
#   bash launch_scripts/vision_table.sh ViT-B-32 [DATA_LOCATION] [SAVE]
# Extra flags for every script can be passed through EXTRA_ARGS, e.g. EXTRA_ARGS="--wandb".
# GPUs: with N visible GPUs (NGPU, default: nvidia-smi's count) the 8 independent fine-tunes of a mode run
# N at a time, one task per GPU. NPROC_PER_TASK=K instead launches each fine-tune on K GPUs with torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: vision_table.sh MODEL [DATA_LOCATION] [SAVE]}
DATA=${2:-$HOME/data}
SAVE=${3:-runs}
PY=${PYTHON:-python}
DOMAIN=vision
TASKS=(Cars DTD EuroSAT GTSRB MNIST RESISC45 SUN397 SVHN)
RESULTS="$SAVE/$MODEL-results.json"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
COMMON=(--model "$MODEL" --data-location "$DATA" --save "$SAVE" --results-json "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"})
source launch_scripts/_table.sh
run_table
