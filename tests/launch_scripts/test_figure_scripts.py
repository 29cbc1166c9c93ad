"""launch_scripts/figures.sh and sparsity_ablation.sh call the analysis commands with the sweep's flags (a stub
`python` records each call instead of running it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, script: str, *args: str, **env: str) -> list[str]:
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    # every call is recorded; a sweep call also runs for real as a dry run, so a command line the sweep
    # refuses (e.g. a flag it sets itself) fails the script
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$STUB_LOG"\n'
                    'if [ "$1 $2" = "-m talos.app.sweep" ]; then shift 2; '
                    'exec "$REAL_PY" -m talos.app.sweep --dry-run "$@" > /dev/null; fi\n')
    stub.chmod(0o755)
    out = subprocess.run(["bash", str(ROOT / "launch_scripts" / script), *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "REAL_PY": sys.executable, **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    return log.read_text().splitlines()


def test_figures_script_runs_each_figure_with_the_sweep_flags(tmp_path):
    calls = _run(tmp_path, "figures.sh", "vision", "ViT-B-32", "myruns", EXTRA_ARGS="--data-location /d")
    assert [c.split()[:2] for c in calls] == [["vision/analyze.py", f] for f in (
        "sensitivity_transfer", "disentanglement", "accuracy_ratio", "linearized", "mask_overlap")]
    assert all(c.endswith("--model ViT-B-32 --save myruns --data-location /d") for c in calls)
    calls = _run(tmp_path, "figures.sh", "nlp", "t5-base", FIGURES="gradient_drift")
    assert calls[-1] == "nlp/analyze.py gradient_drift --model t5-base --save runs"


def test_sparsity_ablation_sweeps_the_paper_sparsities_then_plots(tmp_path):
    calls = _run(tmp_path, "sparsity_ablation.sh", "vision", "ViT-B-32", TASKS="Cars,DTD")
    ks = ["0.75", "0.85", "0.9", "0.95", "0.99"]
    sweeps = [c for c in calls if c.startswith("-m talos.app.sweep")]
    assert len(sweeps) == len(ks) and len(calls) == len(ks) + 1  # one sweep per k, then the plot
    for k, c in zip(ks, sweeps):  # TaLoS only, single-task and addition, at sparsity k
        assert "--domain vision --tasks Cars,DTD --modes talos --merges sum" in c
        assert "--protocols single_task,addition" in c and c.endswith(f"-- --model ViT-B-32 --save runs --sparsity {k}")
    assert calls[-1].startswith("vision/analyze.py sparsity_ablation")
    assert calls[-1].endswith("--sparsities 0.75,0.85,0.9,0.95,0.99") and "--eval-datasets Cars,DTD" in calls[-1]
