#!/usr/bin/env bash
# The paper's T5 tables on CUDA GPUs: fine-tune the 7 NLP tasks with every registered mode, then evaluate
# single-task accuracy, task addition and task negation (RTE control) per mode and every merge of the standard
# task vectors (the sweep of talos/app/sweep.py), and write SAVE/nlp-MODEL-results.{json,md}.
#   bash launch_scripts/nlp_table.sh t5-base [STORYCLOZE_DIR] [SAVE]
# Datasets come from the Hugging Face hub (cached on first use); StoryCloze 2016 is a manual download (its
# val/test CSVs in STORYCLOZE_DIR, default $STORYCLOZE_DIR). Extra flags for every script go through
# EXTRA_ARGS, e.g. EXTRA_ARGS="--wandb --num-steps 20000". Paper settings are the flag defaults (lr 1e-4,
# 64 x 16 examples per step, 75,000 constant-lr steps, bf16 on CUDA, max length 128, sparsity 0.9).
# GPUs: with N visible GPUs (NGPU, default: nvidia-smi's count) the 7 independent fine-tunes of a mode run
# N at a time, one task per GPU (logs in SAVE/finetune-*.log). NPROC_PER_TASK=K instead launches each fine-tune
# on K GPUs with torchrun. A failed fine-tune stops the sweep. DRY_RUN=1 prints the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: nlp_table.sh MODEL [STORYCLOZE_DIR] [SAVE]}
STORYCLOZE=${2:-${STORYCLOZE_DIR:-}}
SAVE=${3:-runs}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
exec ${PYTHON:-python} -m talos.app.sweep --domain nlp --suite 7 --run gpus \
  --results "$SAVE/nlp-${MODEL//\//__}-results.json" ${NGPU:+--ngpu "$NGPU"} \
  ${NPROC_PER_TASK:+--nproc-per-task "$NPROC_PER_TASK"} ${DRY_RUN:+--dry-run} -- \
  --model "$MODEL" --save "$SAVE" ${STORYCLOZE:+--storycloze-dir "$STORYCLOZE"} ${EXTRA[@]+"${EXTRA[@]}"}
