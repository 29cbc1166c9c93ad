#!/usr/bin/env bash
# The paper's vision tables on CUDA GPUs: fine-tune every task of a suite with every registered mode, then
# evaluate single-task accuracy, task addition (every merge for the standard mode) and task negation (ImageNet
# control).
#   bash launch_scripts/vision_table.sh ViT-B-32 [DATA_LOCATION] [SAVE] [SUITE]
# SUITE: 8 (the paper's tasks, default), 14 or 20 (the TALL-masks suites; vision.datasets.SUITES lists them).
# Prepare the data first: python vision/prepare_datasets.py --dataset suite$SUITE --data-location DATA_LOCATION
# Extra flags for every script can be passed through EXTRA_ARGS, e.g. EXTRA_ARGS="--wandb".
# GPUs: with N visible GPUs (NGPU, default: nvidia-smi's count) the independent fine-tunes of a mode run
# N at a time, one task per GPU. NPROC_PER_TASK=K instead launches each fine-tune on K GPUs with torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: vision_table.sh MODEL [DATA_LOCATION] [SAVE] [SUITE]}
DATA=${2:-$HOME/data}
SAVE=${3:-runs}
SUITE=${4:-8}
PY=${PYTHON:-python}
DOMAIN=vision
SUITE_TASKS=$("$PY" -c 'import sys; from vision.datasets import suite; print(*suite(sys.argv[1]))' "$SUITE")
read -r -a TASKS <<< "$SUITE_TASKS"
RESULTS="$SAVE/$MODEL-suite$SUITE-results.json"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
COMMON=(--model "$MODEL" --data-location "$DATA" --save "$SAVE" --results-json "$RESULTS"
        --eval-datasets "$(IFS=,; echo "${TASKS[*]}")" ${EXTRA[@]+"${EXTRA[@]}"})
source launch_scripts/_table.sh
run_table
