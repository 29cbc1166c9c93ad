#!/usr/bin/env bash
# The paper's vision tables on CUDA GPUs: fine-tune every task of a suite with every registered mode, then
# evaluate single-task accuracy, task addition and task negation (ImageNet control) per mode and every merge of
# the standard task vectors (the sweep of talos/app/sweep.py), and write SAVE/MODEL-suiteSUITE-results.{json,md}.
#   bash launch_scripts/vision_table.sh ViT-B-32 [DATA_LOCATION] [SAVE] [SUITE]
# SUITE: 8 (the paper's tasks, default), 14 or 20 (the TALL-masks suites; vision.datasets.SUITES lists them).
# Prepare the data first: python vision/prepare_datasets.py --dataset suite$SUITE --data-location DATA_LOCATION
# Extra flags for every script can be passed through EXTRA_ARGS, e.g. EXTRA_ARGS="--wandb".
# GPUs: with N visible GPUs (NGPU, default: nvidia-smi's count) the independent fine-tunes of a mode run
# N at a time, one task per GPU (logs in SAVE/finetune-*.log). NPROC_PER_TASK=K instead launches each fine-tune
# on K GPUs with torchrun. A failed fine-tune stops the sweep. DRY_RUN=1 prints the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: vision_table.sh MODEL [DATA_LOCATION] [SAVE] [SUITE]}
DATA=${2:-$HOME/data}
SAVE=${3:-runs}
SUITE=${4:-8}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
exec ${PYTHON:-python} -m talos.app.sweep --domain vision --suite "$SUITE" --run gpus \
  --results "$SAVE/$MODEL-suite$SUITE-results.json" ${NGPU:+--ngpu "$NGPU"} \
  ${NPROC_PER_TASK:+--nproc-per-task "$NPROC_PER_TASK"} ${DRY_RUN:+--dry-run} -- \
  --model "$MODEL" --data-location "$DATA" --save "$SAVE" ${EXTRA[@]+"${EXTRA[@]}"}
