"""No silent wrong result (issue 18), end to end on the tiny CLIP: bad flags before any folder, divergence,
exact resume in every window (real SIGKILLs in second processes), untrusted artifacts, prerequisites."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from talos.io import ArtifactError
from talos.task_vector import TaskVector
from talos.train import DivergenceError
from vision import eval_single_task, eval_task_addition, finetune

REPO = Path(__file__).resolve().parents[2]
TASK = ["--finetuning-mode", "talos", "--train-dataset", "SynthShapes", "--eval-datasets", "SynthShapes"]


def common(data, save, *extra):
    return ["--model", "talos-tiny-vit", "--pretrained", "none", "--data-location", str(data), "--save", str(save),
            "--eval-datasets", "SynthShapes,SynthColors", "--control-dataset", "SynthControl", "--batch-size", "16",
            "--lr", "1e-3", "--warmup-length", "2", "--epochs", "1", "--calibration-batch-size", "8",
            "--eval-batch-size", "64", "--num-workers", "0", "--device", "cpu", "--no-progress",
            "--n-eval-points", "3", *extra]


def run_dir(save, mode="talos", task="SynthShapes"):
    (d,) = list((save / "vision" / "talos-tiny-vit" / mode / task).iterdir())
    return d


def tv(save, mode="talos", task="SynthShapes") -> TaskVector:
    return TaskVector.load(run_dir(save, mode, task) / "task_vector.safetensors")


def same(a: TaskVector, b: TaskVector) -> bool:
    return set(a.keys()) == set(b.keys()) and all(torch.equal(a[k], b[k]) for k in a.keys())


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run (workers 0) every resume is compared with, bitwise."""
    save = tmp_path_factory.mktemp("ref") / "runs"
    finetune.main(common(data, save, *TASK))
    return tv(save)


def _killed(data, save, patch: str, *extra) -> int:
    """Run finetune.py in a second process that SIGKILLs itself where ``patch`` says; returns its exit code."""
    code = f"import os, signal, sys\n{patch}\nfrom vision import finetune\nfinetune.main(sys.argv[1:])\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TALOS_PLUGINS": "vision.synthetic"}  # (the flag's env form)
    return subprocess.run([sys.executable, "-c", code, *common(data, save, *TASK, *extra)], env=env,
                          capture_output=True, timeout=300).returncode


# ---------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--lr", "inf"], ["--wd", "nan"], ["--grad-clip", "nan"],
                                 ["--checkpoint-every", "0"], ["--num-workers", "-1"], ["--ties-k", "5"],
                                 ["--dare-p", "1.5"], ["--pretrained", "/nonexistent/weights.pt"]])
def test_bad_flags_fail_before_any_folder(data, tmp_path, bad, capsys):
    save = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        finetune.main(common(data, save, *TASK, *bad))
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not save.exists()


def test_pretrained_file_hashed_by_content(data, tmp_path, monkeypatch):
    from talos.app.runs import finetune_hparams
    from vision.args import parse_args

    monkeypatch.setenv("TALOS_CACHE_DIR", str(tmp_path / "cache"))
    w = tmp_path / "w.pt"
    w.write_bytes(b"one")
    args = parse_args(common(data, tmp_path, *TASK, "--pretrained", str(w)), need_train_dataset=True)
    a = finetune_hparams(args, "SynthShapes")["pretrained"]
    w.write_bytes(b"two")  # same path, other weights: another run
    args = parse_args(common(data, tmp_path, *TASK, "--pretrained", str(w)), need_train_dataset=True)
    assert a.startswith("sha256:") and finetune_hparams(args, "SynthShapes")["pretrained"] != a


def test_random_init_head_cache_depends_on_seed(data, tmp_path):
    from vision.args import parse_args
    from vision.common import head_hparams

    h = [head_hparams(parse_args(common(data, tmp_path, "--seed", s)), ["a"], ["{}"]) for s in ("0", "1")]
    assert h[0] != h[1]
    tag = [head_hparams(parse_args(common(data, tmp_path, "--seed", s, "--pretrained", "openai")), ["a"], ["{}"])
           for s in ("0", "1")]
    assert tag[0] == tag[1]  # pretrained weights do not depend on the seed


# ---------------------------------------------------------------------------------------------- divergence
def test_divergence_is_an_error_and_never_a_finished_run(data, tmp_path):
    save = tmp_path / "runs"
    with pytest.raises(DivergenceError, match="optimizer step"):
        finetune.main(common(data, save, *TASK, "--lr", "1e30", "--grad-clip", "0"))
    d = run_dir(save)
    assert not (d / "task_vector.safetensors").exists() and not (d / "metrics.json").exists()


def test_evaluation_refuses_a_non_finite_task_vector(data, tmp_path):
    save = tmp_path / "runs"
    args = ["--finetuning-mode", "standard", "--train-dataset", "SynthShapes", "--eval-datasets", "SynthShapes"]
    finetune.main(common(data, save, *args))
    d = run_dir(save, "standard")
    t = tv(save, "standard")
    k = next(iter(t.keys()))
    t[k].view(-1)[0] = float("nan")
    t.save(d / "task_vector.safetensors")
    (d / "manifest.json").unlink()  # as a folder written before manifests (only the content is checked)
    with pytest.raises(DivergenceError, match="non-finite"):
        eval_single_task.main(common(data, save, *args))


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.slow  # (the fast mid-epoch test below also compares workers 2 with workers 0)
def test_workers_do_not_change_results(data, tmp_path, reference):
    finetune.main(common(data, tmp_path / "runs", *TASK, "--num-workers", "2"))
    assert same(tv(tmp_path / "runs"), reference)


def test_resume_after_mask_before_first_checkpoint(data, tmp_path, reference):
    save = tmp_path / "runs"
    finetune.main(common(data, save, *TASK))
    d = run_dir(save)
    for f in d.iterdir():  # as if killed right after the mask was saved
        if f.name not in ("mask.safetensors", "manifest.json", "config.json", "calibration.json"):
            f.unlink()
    finetune.main(common(data, save, *TASK))
    assert same(tv(save), reference)


def test_stop_during_calibration_then_rerun(data, tmp_path, reference, monkeypatch):
    import talos.modes.talos_mode as tm

    real = tm.calibrate_masks

    def interrupted(*a, **kw):
        def cb(r, d, m):
            if r == 2:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "callback": cb})

    monkeypatch.setattr(tm, "calibrate_masks", interrupted)
    save = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        finetune.main(common(data, save, *TASK))
    monkeypatch.setattr(tm, "calibrate_masks", real)
    torch.manual_seed(999)  # whatever the global RNG holds now
    finetune.main(common(data, save, *TASK))
    assert same(tv(save), reference)


def test_resume_mid_epoch_with_workers(data, tmp_path, reference):
    save = tmp_path / "runs"
    out = finetune.main(common(data, save, *TASK, "--num-workers", "2", "--stop-after", "3"))  # epoch 0 of 6 steps
    assert out["interrupted"]
    finetune.main(common(data, save, *TASK, "--num-workers", "2"))
    assert same(tv(save), reference)


@pytest.mark.slow
def test_sigkill_after_the_mask(data, tmp_path, reference):
    save = tmp_path / "runs"
    rc = _killed(data, save, "import talos.stages as p\np.train = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)")
    assert rc == -signal.SIGKILL and (run_dir(save) / "mask.safetensors").exists()
    finetune.main(common(data, save, *TASK))
    assert same(tv(save), reference)


@pytest.mark.slow
def test_sigkill_mid_epoch_with_workers_and_mid_write(data, tmp_path, reference):
    save = tmp_path / "runs"
    patch = ("import talos.train as t\nreal = t.record_artifact\n"
             "def rec(p):\n    real(p)\n    os.kill(os.getpid(), signal.SIGKILL)\nt.record_artifact = rec")
    rc = _killed(data, save, patch, "--num-workers", "2", "--checkpoint-every", "3")
    assert rc == -signal.SIGKILL and (run_dir(save) / "checkpoint.pt").exists()
    # a second kill in the middle of writing the next checkpoint leaves a temp file behind ...
    patch = ("import talos.io as io, torch\nreal = torch.save\n"
             "def half(obj, f):\n    open(f, 'wb').write(b'partial')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
             "torch.save = half")
    assert _killed(data, save, patch, "--num-workers", "2", "--checkpoint-every", "3") == -signal.SIGKILL
    assert list(run_dir(save).glob(".checkpoint.pt.*.tmp"))
    finetune.main(common(data, save, *TASK, "--num-workers", "2"))
    assert not list(run_dir(save).glob(".*.tmp"))  # ... which the next run cleans
    assert same(tv(save), reference)


# ---------------------------------------------------------------------------------------------- artifacts
def test_truncated_task_vector_is_recomputed_not_skipped(data, tmp_path, reference):
    save = tmp_path / "runs"
    finetune.main(common(data, save, *TASK))
    f = run_dir(save) / "task_vector.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(FileNotFoundError, match="task_vector.safetensors: size"):  # evaluation names it ...
        eval_single_task.main(common(data, save, "--finetuning-mode", "talos", "--eval-datasets", "SynthShapes"))
    out = finetune.main(common(data, save, *TASK))  # ... and fine-tuning rebuilds it
    assert not out.get("interrupted") and same(tv(save), reference)


@pytest.mark.slow  # (tests/talos/test_reliability.py checks flipped bytes on the manifest itself)
def test_flipped_byte_in_a_dense_vector_is_refused(data, tmp_path):
    save = tmp_path / "runs"
    args = ["--finetuning-mode", "standard", "--train-dataset", "SynthShapes", "--eval-datasets", "SynthShapes"]
    finetune.main(common(data, save, *args))
    f = run_dir(save, "standard") / "task_vector.safetensors"
    b = bytearray(f.read_bytes())
    b[-10] ^= 0x01
    f.write_bytes(bytes(b))
    with pytest.raises(FileNotFoundError) as e:
        eval_single_task.main(common(data, save, *args))
    assert str(f) in str(e.value) and "content hash differs" in str(e.value) and "vision/finetune.py" in str(e.value)


def test_damaged_json_is_recomputed_or_named(data, tmp_path):
    from talos.report import update_results

    save, results = tmp_path / "runs", tmp_path / "results.json"
    args = ["--finetuning-mode", "standard", "--train-dataset", "SynthShapes", "--eval-datasets", "SynthShapes"]
    first = finetune.main(common(data, save, *args))
    metrics = run_dir(save, "standard") / "metrics.json"
    metrics.write_text('{"steps": ')  # a finished run with damaged metrics: fine-tuning runs again
    assert finetune.main(common(data, save, *args))["task_vector_norm"] == first["task_vector_norm"]
    res = eval_single_task.main(common(data, save, *args))
    (ev,) = list((save / "vision" / "talos-tiny-vit" / "eval" / "single_task").iterdir())
    (ev / "results.json").write_text("{")  # damaged evaluation results: recomputed, not a crash
    assert eval_single_task.main(common(data, save, *args)) == res
    results.write_text('{"single_task": ')  # the shared results file cannot be rebuilt here: named
    with pytest.raises(ArtifactError, match="results.json: not valid JSON.*--results-json"):
        update_results(results, "merges", "sum", 1)


def test_finetune_on_a_locked_run_exits_naming_the_pid(data, tmp_path):
    from talos.io import RunLock
    from vision.args import parse_args
    from vision.common import RUNS

    save = tmp_path / "runs"
    run = RUNS.finetune(parse_args(common(data, save, *TASK), need_train_dataset=True), "SynthShapes")
    lock = RunLock(run.dir)  # held through another open file: flock conflicts as with another process
    with pytest.raises(RuntimeError, match=f"PID {os.getpid()}"):
        finetune.main(common(data, save, *TASK))
    lock.release()
    assert not (run.dir / "config.json").exists()


@pytest.mark.slow
def test_second_finetune_on_a_locked_run_exits_naming_the_pid(data, tmp_path):
    from talos.io import RunLock
    from vision.args import parse_args
    from vision.common import RUNS

    save = tmp_path / "runs"
    run = RUNS.finetune(parse_args(common(data, save, *TASK), need_train_dataset=True), "SynthShapes")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys, time\nfrom talos.io import RunLock\nRunLock(sys.argv[1])\nprint('ok', flush=True)\ntime.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.dir)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "ok"
        with pytest.raises(RuntimeError, match=f"PID {proc.pid}"):
            finetune.main(common(data, save, *TASK))
    finally:
        proc.kill()
        proc.wait()
    assert not (run.dir / "task_vector.safetensors").exists()
    RunLock(run.dir).release()


# ---------------------------------------------------------------------------------------------- prerequisites
def test_missing_prerequisites_listed_with_complete_commands(data, tmp_path):
    save = tmp_path / "runs"
    argv = common(data, save, "--finetuning-mode", "talos", "--sparsity", "0.8")
    with pytest.raises(FileNotFoundError) as e:
        eval_task_addition.main(argv)
    msg = str(e.value)
    assert "2 fine-tuning run(s) needed first" in msg and "SynthShapes" in msg and "SynthColors" in msg
    commands = [line.strip() for line in msg.splitlines() if line.strip().startswith("python vision/finetune.py")]
    assert len(commands) == 2
    for c in commands:  # each command, run as printed, produces exactly the run the evaluation reads
        finetune.main(shlex.split(c)[2:])
    eval_task_addition.main(argv)
