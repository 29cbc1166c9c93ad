#!/usr/bin/env bash
# The sparsity ablation (Fig. 8): TaLoS fine-tunes of every task at each sparsity k, their single-task and task
# addition evaluations, then the plot of single-task and normalised addition accuracy against k.
#   bash launch_scripts/sparsity_ablation.sh DOMAIN MODEL [SAVE]
#   TASKS=Cars,DTD EXTRA_ARGS="--data-location ~/data" bash launch_scripts/sparsity_ablation.sh vision ViT-B-32 runs
# TASKS (comma-separated, default: the domain's paper tasks) is the task suite; SPARSITIES (default the paper's
# 0.75 0.85 0.90 0.95 0.99); EXTRA_ARGS carries every other flag. Runs that exist are skipped (k = 0.9 is the
# table sweep's TaLoS run).
set -euo pipefail
cd "$(dirname "$0")/.."
DOMAIN=${1:?usage: sparsity_ablation.sh DOMAIN MODEL [SAVE]}
MODEL=${2:?usage: sparsity_ablation.sh DOMAIN MODEL [SAVE]}
SAVE=${3:-runs}
PY=${PYTHON:-python}
TASKS=${TASKS:-$("$PY" -c "import sys; sys.path[0] = '.'; from $DOMAIN.args import TASKS; print(','.join(TASKS))")}
SPARSITIES=${SPARSITIES:-0.75 0.85 0.9 0.95 0.99}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
COMMON=(--model "$MODEL" --save "$SAVE" ${EXTRA[@]+"${EXTRA[@]}"})
for k in $SPARSITIES; do  # each k: TaLoS fine-tunes, single-task and addition (the one sweep plan)
  "$PY" -m talos.app.sweep --domain "$DOMAIN" --tasks "$TASKS" --modes talos --merges sum --merge-modes "" \
    --protocols single_task,addition --results "$SAVE/$DOMAIN-$MODEL-sparsity-$k.json" -- "${COMMON[@]}" --sparsity "$k"
done
"$PY" "$DOMAIN/analyze.py" sparsity_ablation "${COMMON[@]}" --finetuning-mode talos --eval-datasets "$TASKS" \
  --sparsities "${SPARSITIES// /,}"
