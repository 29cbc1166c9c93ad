#!/usr/bin/env bash
# The cost table of every fine-tuning mode, vision and nlp (benchmarks/efficiency.py), then the time/memory
# trade of activation checkpointing on the same preset.
#   bash launch_scripts/efficiency.sh [cpu|paper] [extra flags for benchmarks/efficiency.py]
# cpu:   open_clip ViT-S-32 + a 4-layer T5, 1 thread per measurement; writes
#        benchmarks/results/efficiency_cpu.{json,md} and efficiency_cpu_gc.{json,md}
# paper: ViT-B/32, B/16, L/14 (batch 128) and T5 small/base/large (batch 64) on CUDA; one file per backbone pair
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-cpu}
shift || true
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
$PY benchmarks/efficiency.py --preset "$PRESET" "$@"
# activation checkpointing: its trade on the dense baseline, TaLoS and LoRA (linear cannot run under it)
$PY benchmarks/efficiency.py --preset "$PRESET" --grad-checkpointing --modes standard,talos,lora,linear \
    --baseline "benchmarks/results/efficiency_${PRESET}.json" "$@"
echo "efficiency ($PRESET): $(( $(date +%s) - start )) s"
