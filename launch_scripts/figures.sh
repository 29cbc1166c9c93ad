#!/usr/bin/env bash
# The paper's figures from the runs of a table sweep (launch_scripts/<domain>_table.sh) for one model and task
# suite: each figure's PNG and the JSON of its numbers go to SAVE/<domain>/<model>/eval/figure_<name>/<hash>/
# (skipped when they exist).
#   bash launch_scripts/figures.sh DOMAIN MODEL [SAVE]
#   EXTRA_ARGS="--data-location ~/data --max-examples 2000" bash launch_scripts/figures.sh vision ViT-B-32 runs
# EXTRA_ARGS carries every other flag, exactly as given to the sweep (data location, task suite through
# --eval-datasets, hyperparameters), so the runs resolve to the same folders. FIGURES picks the figures; the
# default is every figure the table sweep feeds. gradient_drift also needs fine-tunes run with
# --gradient-drift-every N (add it to the sweep's EXTRA_ARGS) and sparsity_ablation the sweep of
# launch_scripts/sparsity_ablation.sh (which draws it): FIGURES="gradient_drift" bash launch_scripts/figures.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
DOMAIN=${1:?usage: figures.sh DOMAIN MODEL [SAVE]}
MODEL=${2:?usage: figures.sh DOMAIN MODEL [SAVE]}
SAVE=${3:-runs}
PY=${PYTHON:-python}
FIGURES=${FIGURES:-sensitivity_transfer disentanglement accuracy_ratio linearized mask_overlap}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
for figure in $FIGURES; do
  "$PY" "$DOMAIN/analyze.py" "$figure" --model "$MODEL" --save "$SAVE" ${EXTRA[@]+"${EXTRA[@]}"}
done
