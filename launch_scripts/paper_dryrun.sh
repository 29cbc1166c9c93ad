#!/usr/bin/env bash
# Real-size dry run on CPU (random init, no downloads): ViT-B-32 / B-16 / L-14 and t5-small / t5-base, every mode,
# one calibration batch, two optimizer steps, one evaluation batch each. Logic: benchmarks/paper_dryrun.py.
# Usage: bash launch_scripts/paper_dryrun.sh [OUT=out/paper_dryrun] [extra flags, e.g. --models ViT-B-32]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out/paper_dryrun}"
shift || true
python -m benchmarks.paper_dryrun --out "$OUT" "$@"
