"""The paper-table sweeps (`launch_scripts/*_table.sh`) run every mode, spread fine-tunes over GPUs, stop on failure.

A stub `python` records each command (and the CUDA_VISIBLE_DEVICES it saw) instead of training, so these
tests check the sweep's shape without a GPU, data or model weights.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from talos.merges import MERGES
from talos.modes import run_order
from vision.datasets import SUITES

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "vision": ("vision_table.sh", ["ViT-B-32", "/data"], ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST",
                                                          "RESISC45", "SUN397", "SVHN"]),
    "nlp": ("nlp_table.sh", ["t5-base", ""], ["qasc", "wiki_qa", "quartz", "paws", "story_cloze",
                                             "winogrande", "wsc"]),
}


def _stub(tmp_path: Path) -> Path:
    """A `python` that answers the registry queries and logs every other call as `<gpu>|<args>`.

    The registry answers are computed here, in-process, so the scripts see the real mode and merge lists
    without paying a torch import per call.
    """
    modes, merges = " ".join(run_order()), " ".join(MERGES.names())
    suites = "".join(f'if [ "$1" = "-c" ] && [[ "$2" == *suite* ]] && [ "$3" = {k} ]; then echo {" ".join(v)}; exit; fi\n'
                     for k, v in SUITES.items())
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = "-c" ] && [[ "$2" == *run_order* ]]; then echo {modes}; exit; fi\n'
        f'if [ "$1" = "-c" ] && [[ "$2" == *MERGES* ]]; then echo {merges}; exit; fi\n'
        + suites +
        'if [ "$1" = "-c" ]; then echo "unexpected snippet: $2" >&2; exit 9; fi\n'
        'echo "${CUDA_VISIBLE_DEVICES:-all}|$*" >> "$STUB_LOG"\n'
        'if [ -n "${FAIL_ON:-}" ] && [[ " $* " == *" $FAIL_ON "* ]]; then exit 3; fi\n'
    )
    stub.chmod(0o755)
    return stub


def _run(domain: str, tmp_path: Path, *extra: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    script, args, _ = SCRIPTS[domain]
    log = tmp_path / "calls.log"
    full_env = {**os.environ, "PYTHON": str(_stub(tmp_path)), "STUB_LOG": str(log), **env}
    out = subprocess.run(["bash", str(ROOT / "launch_scripts" / script), *args, str(tmp_path / "runs"), *extra],
                         env=full_env, capture_output=True, text=True, timeout=120)
    return out, (log.read_text().splitlines() if log.exists() else [])


@pytest.mark.parametrize("domain", sorted(SCRIPTS))
def test_one_task_per_gpu_every_mode_and_merge(domain, tmp_path):
    out, calls = _run(domain, tmp_path, NGPU="3")
    assert out.returncode == 0, out.stderr
    tasks = SCRIPTS[domain][2]
    finetunes = [c for c in calls if f"{domain}/finetune.py" in c]
    assert len(finetunes) == len(run_order()) * len(tasks)
    for mode in run_order():
        mine = [c for c in finetunes if f"--finetuning-mode {mode} " in c]
        assert sorted(c.split("--train-dataset ")[1].split()[0] for c in mine) == sorted(tasks)
        assert sorted(c.split("|")[0] for c in mine) == sorted(str(i % 3) for i in range(len(tasks)))
    for kind in ("eval_single_task", "eval_task_addition", "eval_task_negation"):
        assert sum(f"{domain}/{kind}.py" in c for c in calls) >= len(run_order())
    merges = [c for c in calls if "--merge " in c and "eval_task_addition" in c]
    assert sorted(c.split("--merge ")[1].split()[0] for c in merges) == sorted(MERGES.names())
    negations = [c for c in calls if "--merge " in c and "eval_task_negation" in c]
    assert sorted(c.split("--merge ")[1].split()[0] for c in negations) == sorted(set(MERGES.names()) - {"sum"})
    assert "talos.report" in calls[-1]
    assert len(list((tmp_path / "runs").glob("finetune-*.log"))) == len(finetunes)


@pytest.mark.parametrize("domain", sorted(SCRIPTS))
def test_without_nvidia_smi_runs_in_the_foreground(domain, tmp_path):
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}  # no nvidia-smi on PATH: NGPU is 0, not an error
    out, calls = _run(domain, tmp_path, **env)
    assert out.returncode == 0, out.stderr
    assert all(c.startswith("all|") for c in calls)


@pytest.mark.parametrize("domain", sorted(SCRIPTS))
def test_a_failed_background_finetune_stops_the_sweep(domain, tmp_path):
    failing = SCRIPTS[domain][2][1]
    out, calls = _run(domain, tmp_path, NGPU="2", FAIL_ON=failing)
    assert out.returncode != 0
    assert not any("eval_" in c for c in calls)  # nothing is evaluated on a missing task vector


def test_torchrun_per_task(tmp_path):
    out, calls = _run("vision", tmp_path, NPROC_PER_TASK="2")
    assert out.returncode == 0, out.stderr
    launches = [c for c in calls if "vision/finetune.py" in c]
    assert launches and all("-m torch.distributed.run --standalone --nproc_per_node=2" in c for c in launches)


@pytest.mark.parametrize("suite", ["14", "20"])
def test_vision_suite_argument(tmp_path, suite):
    out, calls = _run("vision", tmp_path, suite, NGPU="0")
    assert out.returncode == 0, out.stderr
    tasks = SUITES[suite]
    finetunes = [c for c in calls if "vision/finetune.py" in c]
    assert sorted(c.split("--train-dataset ")[1].split()[0] for c in finetunes) == sorted(tasks * len(run_order()))
    evals = [c for c in calls if "eval_" in c]
    assert evals and all(f"--eval-datasets {','.join(tasks)} " in c for c in evals)
    assert all(f"-suite{suite}-results.json" in c for c in evals)


def test_vision_unknown_suite_stops_before_any_run(tmp_path):
    out, calls = _run("vision", tmp_path, "13")
    assert out.returncode != 0 and calls == []
