"""Helpers shared by test modules of several packages: torchrun-style process groups on CPU, run folders."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch

RUN_FILES = ["calibration.json", "config.json", "finetuned.safetensors", "manifest.json", "mask.safetensors",
             "metrics.json", "task_vector.safetensors"]  # a completed TaLoS fine-tuning run, one copy of each


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_env(rank: int, world: int, port: int) -> None:
    """The environment ``torchrun`` gives rank ``rank`` of ``world`` (one torch thread: ranks share the cores)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def spawn_ranks(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` spawned processes and wait for all of them."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="spawn")


def assert_one_copy_of_the_run(run_dir: Path, world: int = 2) -> None:
    """A fine-tuning run written by ``world`` ranks holds each artifact once (rank 0 writes) and says so."""
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == RUN_FILES  # (.lock)
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == world


class AnalysisRuns:
    """standard + talos fine-tuning runs of ``tasks`` (gradient drift every 2 steps) in ``save``, talos'
    single-task and addition results, and :meth:`figure` to draw one figure over them with ``domain``/analyze.py.

    ``argv(save, *extra)`` gives the domain's flags for a run folder ``save``."""

    def __init__(self, domain: str, model: str, argv: Callable[..., list[str]], save: Path, tasks: list[str]) -> None:
        import importlib

        script = lambda name: importlib.import_module(f"{domain}.{name}")  # noqa: E731
        self.analyze, self.argv, self.save = script("analyze"), argv, save
        self.eval_dir = save / domain / model / "eval"
        for mode in ("standard", "talos"):
            for task in tasks:
                script("finetune").main(argv(save, "--finetuning-mode", mode, "--train-dataset", task,
                                             "--gradient-drift-every", "2"))
        self.single = script("eval_single_task").main(argv(save, "--finetuning-mode", "talos"))
        self.addition = script("eval_task_addition").main(argv(save, "--finetuning-mode", "talos"))

    def figure(self, name: str, *extra: str) -> dict[str, Any]:
        """Draw figure ``name``; checks the PNG has content and its results.json holds the returned numbers."""
        numbers = self.analyze.main([name, *self.argv(self.save, *extra)])
        (d,) = (self.eval_dir / f"figure_{name}").iterdir()
        assert (d / f"{name}.png").stat().st_size > 5000
        assert json.loads((d / "results.json").read_text()) == json.loads(json.dumps(numbers))
        return numbers


def _finetune_then_evaluate(rank: int, world: int, port: int, domain: str, argv: list[str], task: str,
                            results: str) -> None:
    """One rank: fine-tune ``task`` then evaluate it single-task into ``results`` (a torchrun worker)."""
    import importlib

    join_env(rank, world, port)
    importlib.import_module(f"{domain}.finetune").main(argv + ["--train-dataset", task])
    importlib.import_module(f"{domain}.eval_single_task").main(argv + ["--results-json", results])


def distributed_run_matches_one_process(domain: str, model: str, argv: Callable[..., list[str]], task: str,
                                        save: Path) -> Path:
    """Fine-tune and evaluate ``task`` (talos) on 2 ranks: the run folder holds one copy of each artifact, and a
    fresh one-process evaluation of the same task vector gives the accuracy the sharded ranks summed. Returns
    the run folder. ``argv(save, *extra)`` gives the domain's flags."""
    import importlib
    import shutil

    results = save.parent / "results.json"
    args = argv(save, "--finetuning-mode", "talos", "--eval-datasets", task)
    spawn_ranks(_finetune_then_evaluate, domain, args, task, str(results))
    (d,) = list((save / domain / model / "talos" / task).iterdir())
    assert_one_copy_of_the_run(d)
    sharded = json.loads(results.read_text())["single_task"]["talos"]
    shutil.rmtree(save / domain / model / "eval")  # force a fresh single-process evaluation
    single = importlib.import_module(f"{domain}.eval_single_task").main(args)
    assert single["test"]["finetuned"] == sharded and set(sharded) == {task}
    return d


def assert_resume_matches_uninterrupted(domain: str, model: str, argv: Callable[..., list[str]], task: str,
                                        stop_after: int, root: Path) -> None:
    """Fine-tuning ``task`` (talos) stopped after ``stop_after`` steps leaves a checkpoint and no task vector;
    resumed, it ends with the task vector of an uninterrupted run, bit for bit. ``argv(save, *extra)``."""
    import importlib

    from talos.task_vector import TaskVector

    finetune = importlib.import_module(f"{domain}.finetune")
    run = lambda save: next((save / domain / model / "talos" / task).iterdir())  # noqa: E731  (one run folder)
    finetune.main(argv(root / "a"))
    part = finetune.main(argv(root / "b", "--stop-after", str(stop_after)))
    assert part["interrupted"] and part["steps"] == stop_after
    d = run(root / "b")
    assert (d / "checkpoint.pt").exists() and not (d / "task_vector.safetensors").exists()
    finetune.main(argv(root / "b"))
    a = TaskVector.load(run(root / "a") / "task_vector.safetensors")
    b = TaskVector.load(d / "task_vector.safetensors")
    assert a.keys() and set(a.keys()) == set(b.keys())
    for n in a.keys():
        assert torch.equal(a[n], b[n]), n


def sweep(domain: str, argv: Callable[..., list[str]], modes: list[str], tasks: list[str], root: Path) -> Any:
    """Every mode fine-tuned on every task and evaluated by the three protocols, then every merge of the standard
    task vectors in addition and negation, all exported to one results.json. Returns ``.save`` (the run folder),
    ``.metrics`` (fine-tuning metrics by (mode, task)) and ``.results`` (results.json). ``argv(save, *extra)``
    gives the domain's flags."""
    import importlib
    from types import SimpleNamespace

    from talos.merges import MERGES

    save, results = root / "runs", root / "results.json"
    script = lambda name: importlib.import_module(f"{domain}.{name}")  # noqa: E731
    protocols = [script(n) for n in ("eval_single_task", "eval_task_addition", "eval_task_negation")]
    export = ["--results-json", str(results)]
    metrics = {}
    for mode in modes:
        for task in tasks:
            flags = argv(save, "--finetuning-mode", mode, "--train-dataset", task)
            metrics[mode, task] = script("finetune").main(flags)
        for protocol in protocols:
            protocol.main(argv(save, "--finetuning-mode", mode, *export))
    for merge in MERGES.names():
        protocols[1].main(argv(save, "--finetuning-mode", "standard", "--merge", merge, *export))
        if merge != "sum":  # sum's negation row is the standard negation above
            protocols[2].main(argv(save, "--finetuning-mode", "standard", "--merge", merge, *export))
    return SimpleNamespace(save=save, metrics=metrics, results=json.loads(results.read_text()))


def finetune_artifacts_config(run_dir: Path) -> dict[str, Any]:
    """Checks a completed sparse fine-tuning run holds its artifacts (and no checkpoint); returns its config.json."""
    for f in ("config.json", "mask.safetensors", "calibration.json", "finetuned.safetensors",
              "task_vector.safetensors", "metrics.json"):
        assert (run_dir / f).exists(), f
    assert not (run_dir / "checkpoint.pt").exists()  # removed once the run completed
    cfg = json.loads((run_dir / "config.json").read_text())
    assert "git_commit" in cfg and cfg["versions"]["torch"]
    return cfg


def assert_finetune_skips_when_done(finetune: Any, argv: list[str], run_dir: Path) -> None:
    """``finetune.main(argv)`` on a completed run returns its metrics.json and rewrites nothing."""
    stamp = (run_dir / "task_vector.safetensors").stat().st_mtime_ns
    assert finetune.main(argv) == json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "task_vector.safetensors").stat().st_mtime_ns == stamp


def assert_results_hold_every_mode_and_merge(res: dict[str, Any], modes: list[str], tasks: list[str]) -> None:
    """results.json of :func:`sweep`: a row per mode in each protocol, per merge in addition and negation, and
    the sum merge's rows are the standard mode's protocol rows."""
    from talos.merges import MERGES

    for mode in modes:
        assert set(res["single_task"][mode]) == set(tasks), mode
        assert set(res["addition"][mode]) == {"absolute", "normalized", "coef"}, mode
        assert set(res["negation"][mode]) == {"target", "control", "coef"}, mode
    assert set(res["single_task"]["zeroshot"]) == set(tasks)
    assert set(res["merges"]) == set(MERGES.names())
    assert set(res["negation_merges"]) == set(MERGES.names())
    assert res["negation_merges"]["sum"] == res["negation"]["standard"]
    assert res["merges"]["sum"] == res["addition"]["standard"]
