#!/usr/bin/env bash
# The paper's T5 tables on CUDA GPUs: fine-tune the 7 NLP tasks with every registered mode, then evaluate
# single-task accuracy, task addition (every merge for the standard mode) and task negation (RTE control).
#   bash launch_scripts/nlp_table.sh t5-base [STORYCLOZE_DIR] [SAVE]
# Datasets come from the Hugging Face hub (cached on first use); StoryCloze 2016 is a manual download (its
# val/test CSVs in STORYCLOZE_DIR, default $STORYCLOZE_DIR). Extra flags for every script go through
# EXTRA_ARGS, e.g. EXTRA_ARGS="--wandb --num-steps 20000". Paper settings are the flag defaults (lr 1e-4,
# 64 x 16 examples per step, 75,000 constant-lr steps, bf16 on CUDA, max length 128, sparsity 0.9).
# GPUs: with N visible GPUs (NGPU, default: nvidia-smi's count) the 7 independent fine-tunes of a mode run
# N at a time, one task per GPU. NPROC_PER_TASK=K instead launches each fine-tune on K GPUs with torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: nlp_table.sh MODEL [STORYCLOZE_DIR] [SAVE]}
STORYCLOZE=${2:-${STORYCLOZE_DIR:-}}
SAVE=${3:-runs}
PY=${PYTHON:-python}
DOMAIN=nlp
TASKS=(qasc wiki_qa quartz paws story_cloze winogrande wsc)
RESULTS="$SAVE/nlp-${MODEL//\//__}-results.json"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
COMMON=(--model "$MODEL" --save "$SAVE" --results-json "$RESULTS" ${EXTRA[@]+"${EXTRA[@]}"})
if [ -n "$STORYCLOZE" ]; then COMMON+=(--storycloze-dir "$STORYCLOZE"); fi
source launch_scripts/_table.sh
run_table
