"""launch_scripts/figures.sh and sparsity_ablation.sh call the analysis commands with the sweep's flags (a stub
`python` records each call instead of running it)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, script: str, *args: str, **env: str) -> list[str]:
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$STUB_LOG"\n')
    stub.chmod(0o755)
    out = subprocess.run(["bash", str(ROOT / "launch_scripts" / script), *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), **env}, timeout=60)
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
    fts = [c for c in calls if c.startswith("vision/finetune.py")]
    assert len(fts) == 2 * len(ks) and all("--finetuning-mode talos" in c for c in fts)
    assert [c.split("--sparsity ")[1].split()[0] for c in fts] == [k for k in ks for _ in range(2)]
    assert sum(c.startswith("vision/eval_task_addition.py") for c in calls) == len(ks)
    assert calls[-1].startswith("vision/analyze.py sparsity_ablation")
    assert calls[-1].endswith("--sparsities 0.75,0.85,0.9,0.95,0.99") and "--eval-datasets Cars,DTD" in calls[-1]
