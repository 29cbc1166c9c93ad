"""Shared flag groups, validation and run paths of the domain scripts (talos.cli)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from talos import cli
from talos.modes import MODES
from talos.task_vector import TaskVector


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="m")
    g = cli.add_method_flags(p, fisher_target="logit", fisher_target_help="", draws_help="",
                             calibration_batches_help="", calibration_batch_size=8,
                             calibration_batch_size_help=None, lora_scaling="alpha", lora_scaling_help="")
    cli.add_task_flags(g, tasks=["A", "B"], control="C")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--wd", type=float, default=0.0)
    cli.add_step_flags(g)
    cli.add_evaluation_flags(p, eval_batch_size=4, merge_defaults={})
    cli.add_run_flags(p, wandb_project="proj")
    return p


def _validate(args, *, need_train_dataset=False):
    cli.validate_common(args, need_train_dataset=need_train_dataset, check_task=_check_task)
    cli.resolve_device(args)
    return args


def _check_task(name: str) -> None:
    if name not in ("A", "B", "C"):
        raise ValueError(f"unknown task {name!r}; valid choices: A, B, C")


def _parse(*argv: str, **kw) -> argparse.Namespace:
    return cli.parse_validated(_parser(), _validate, list(argv), **kw)


def test_defaults_and_csv():
    args = _parse("--eval-datasets", "A,,B", "--device", "cpu")
    assert args.eval_datasets == ["A", "B"] and args.control_dataset == "C" and args.precision == "fp32"
    assert args.sparsity == 0.9 and args.calibration_batch_size == 8 and args.wandb_project == "proj"
    assert args.mode_sparse is MODES.get("talos").sparse


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "0"], "--sparsity must be in (0, 1)"),
    (["--sparsity", "1"], "--sparsity must be in (0, 1)"),
    (["--sparsity", "nan"], "--sparsity must be in (0, 1)"),
    (["--finetuning-mode", "nope"], "valid choices"),
    (["--merge", "nope"], "valid choices"),
    (["--eval-datasets", "A,Z"], "unknown task 'Z'"),
    (["--calibration-rounds", "0"], "--calibration-rounds"),
    (["--soft-mask", "1.5"], "--soft-mask"),
    (["--n-eval-points", "1"], "--n-eval-points"),
    (["--control-threshold", "0"], "--control-threshold"),
    (["--stop-after", "0"], "--stop-after"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--wd", "nan"], "--wd must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--lora-alpha", "inf"], "--lora-alpha must be a finite number"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be >= 1, got -5"),
    (["--ties-k", "5"], "--ties-k 5"),
    (["--dare-p", "1.5"], "--dare-p 1.5"),
    (["--tall-masks-lam", "-1"], "tall-masks"),
])
def test_bad_values_exit_with_the_reason_before_writing(argv, message, capsys, tmp_path):
    save = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        _parse(*argv, "--save", str(save), "--device", "cpu")
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not save.exists()


def test_train_dataset_required_only_for_finetuning(capsys):
    _parse()
    with pytest.raises(SystemExit):
        _parse(need_train_dataset=True)
    assert "--train-dataset is required" in capsys.readouterr().err


def test_method_hparams_follow_the_mode():
    for name in MODES.names():
        mode = MODES.get(name)
        h = cli.method_hparams(_parse("--finetuning-mode", name))
        assert ("sparsity" in h) == mode.sparse
        assert ("lora_rank" in h) == mode.uses_lora
        assert ("rounds" in h and "fisher_target" in h) == mode.needs_calibration
    assert not math.isnan(cli.method_hparams(_parse("--finetuning-mode", "talos"))["soft_mask"])


def test_run_paths_hash_hparams_and_name_the_producing_script(tmp_path):
    runs = cli.RunPaths("toy", lambda args, task: {"task": task, "lr": args.lr, "mode": args.finetuning_mode})
    args = _parse("--save", str(tmp_path), "--finetuning-mode", "posthoc")
    with pytest.raises(FileNotFoundError, match=r"python toy/finetune.py --train-dataset A --finetuning-mode standard"):
        runs.task_vectors(args, ["A"])  # posthoc reads the standard vectors
    std = argparse.Namespace(**{**vars(args), "finetuning_mode": "standard"})
    tv = TaskVector({"w": torch.arange(4.0)})
    run = runs.finetune(std, "A")
    run.dir.mkdir(parents=True)
    tv.save(run.task_vector)
    loaded = runs.task_vectors(args, ["A"])
    assert list(loaded) == ["A"] and torch.equal(loaded["A"]["w"], tv["w"])
    assert run.dir.is_relative_to(tmp_path / "toy")
    other = runs.finetune(argparse.Namespace(**{**vars(std), "lr": 2e-3}), "A")
    assert other.hash != run.hash  # a fine-tuning flag changes the folder ...
    e1, e2 = runs.evaluation(std, "addition"), runs.evaluation(argparse.Namespace(**{**vars(std), "lr": 2e-3}),
                                                               "addition")
    assert e1.hash != e2.hash  # ... and the folders of the evaluations that read it
    assert runs.evaluation(std, "addition", {"merge": "ties"}).hash != e1.hash


def test_run_commands_calls_each_scripts_main_in_order(tmp_path, monkeypatch, capsys):
    from talos import run_commands

    pkg = tmp_path / "fakedomain"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "script.py").write_text("CALLS = []\ndef main(argv):\n    CALLS.append(list(argv))\n"
                                   "    if '--fail' in argv:\n        raise RuntimeError('failed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cmds = tmp_path / "commands.txt"
    cmds.write_text("fakedomain/script.py --a 'x y'\n\nfakedomain/script.py --b\n")
    run_commands.main([str(cmds)])
    import fakedomain.script as mod

    assert mod.CALLS == [["--a", "x y"], ["--b"]]
    assert "+ python fakedomain/script.py --a 'x y'" in capsys.readouterr().out
    cmds.write_text("fakedomain/script.py --fail\nfakedomain/script.py --never\n")
    with pytest.raises(RuntimeError):
        run_commands.main([str(cmds)])
    assert mod.CALLS[-1] == ["--fail"]
    with pytest.raises(ValueError, match="expected"):
        run_commands.run_line("-m something")


def test_device_cuda_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        cli.resolve_device(argparse.Namespace(device="cuda", precision=None))
    with pytest.raises(ValueError, match="CUDA is not available"):
        cli.resolve_device(argparse.Namespace(device="cuda:1", precision="fp32"))
    with pytest.raises(ValueError, match="unknown --device"):
        cli.resolve_device(argparse.Namespace(device="gpu", precision=None))


def test_default_device_never_falls_back_silently_on_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "nvidia_gpu_present", lambda: True)  # a GPU whose CUDA failed to load
    with pytest.raises(ValueError, match="pass --device cpu"):
        cli.resolve_device(argparse.Namespace(device=None, precision=None))
    a = argparse.Namespace(device="cpu", precision=None)  # the CPU on purpose
    cli.resolve_device(a)
    assert (a.device, a.precision) == ("cpu", "fp32")
    monkeypatch.setattr(cli, "nvidia_gpu_present", lambda: False)  # a CPU machine
    b = argparse.Namespace(device=None, precision=None)
    cli.resolve_device(b)
    assert (b.device, b.precision) == ("cpu", "fp32")


def test_scripts_print_device_and_precision_first(capsys):
    cli.parse_validated(_parser(), _validate, ["--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[0] == "device: cpu (cpu), precision: fp32"
