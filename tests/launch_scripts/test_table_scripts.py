"""The paper-table launch scripts (`launch_scripts/*_table.sh`) hand their arguments to the sweep plan.

Their dry run (DRY_RUN=1) prints the commands the sweep would run; the plan itself is tested in
tests/talos/app/test_sweep.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from talos.merges import MERGES
from talos.modes import run_order

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(ROOT / "launch_scripts" / script), *args], env=full_env, capture_output=True,
                          text=True, timeout=120)


def _flag(line: str, flag: str) -> str:
    return re.search(rf" {flag} (\S+)", line).group(1)


def test_vision_table_spreads_each_modes_finetunes_over_the_gpus(tmp_path):
    from vision.datasets import SUITES

    out = _dry_run("vision_table.sh", "ViT-B-32", "/data", str(tmp_path), "14", NGPU="3",
                   EXTRA_ARGS="--wandb --epochs 1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    tasks, modes = SUITES["14"], run_order()
    results = f"{tmp_path}/ViT-B-32-suite14-results.json"
    finetunes = [ln for ln in lines if "vision/finetune.py" in ln]
    assert len(finetunes) == len(modes) * len(tasks)
    for i, ln in enumerate(finetunes):  # the fine-tunes of mode i // len(tasks), task i % len(tasks), on its GPU
        assert ln.startswith(f"CUDA_VISIBLE_DEVICES={i % len(tasks) % 3} python vision/finetune.py --model ViT-B-32 "
                             f"--data-location /data --save {tmp_path} --wandb --epochs 1 --eval-datasets ")
        assert (_flag(ln, "--finetuning-mode"), _flag(ln, "--train-dataset")) == (modes[i // len(tasks)],
                                                                                  tasks[i % len(tasks)])
        assert ln.endswith(f"> {tmp_path}/finetune-ViT-B-32-suite14-results-{modes[i // len(tasks)]}-"
                           f"{tasks[i % len(tasks)]}.log 2>&1  # in parallel with the other GPUs")
    evals = [ln for ln in lines if "/eval_" in ln]
    assert all(ln.startswith("python vision/eval_") for ln in evals)
    assert all(_flag(ln, "--eval-datasets") == ",".join(tasks) and _flag(ln, "--results-json") == results
               for ln in finetunes + evals)
    merges = [(ln.split()[1], _flag(ln, "--merge")) for ln in evals if " --merge " in ln]
    assert merges == [(f"vision/eval_task_{p}.py", m) for m in MERGES.names() if m != "sum"
                      for p in ("addition", "negation")]
    assert lines[-1] == f"python -m talos.app.report {results} --out {results[:-5]}.md"


def test_nlp_table_torchrun_per_task_and_the_paper_tasks(tmp_path):
    from nlp.args import TASKS

    out = _dry_run("nlp_table.sh", "google/t5-base", "/sc", str(tmp_path), NPROC_PER_TASK="2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    finetunes = [ln for ln in lines if "nlp/finetune.py" in ln]
    assert [_flag(ln, "--train-dataset") for ln in finetunes] == TASKS * len(run_order())
    assert all(ln.startswith("python -m torch.distributed.run --standalone --nproc_per_node=2 nlp/finetune.py "
                             "--model google/t5-base --save ") and " --storycloze-dir /sc " in ln for ln in finetunes)
    assert all(_flag(ln, "--results-json") == f"{tmp_path}/nlp-google__t5-base-results.json" for ln in lines[:-1])

