"""The sweep plan (talos/app/sweep.py): its order, the merge rule, that every mode x merge result reaches
results.json, its commands and dry run, and the three runners (in-process, subprocess, GPUs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from talos.app import sweep
from talos.app.sweep import Command, Evaluate, Finetune, GpuLayout, Report, SweepError, build_plan
from talos.merges import MERGES
from talos.modes import MODES, run_order
from talos.stages import PROTOCOLS, export_results


# ---------------------------------------------------------------------------------------------------------- plan
def test_dependency_order_keeps_the_given_order_but_puts_requirements_first():
    assert MODES.get("lota").requires == ("standard",) and MODES.get("posthoc").source_mode == "standard"
    assert sweep.dependency_order(["talos", "lota", "posthoc", "standard"]) == ["talos", "standard", "lota", "posthoc"]
    assert sweep.dependency_order(["standard", "linear", "lota", "talos"]) == ["standard", "linear", "lota", "talos"]
    assert sweep.dependency_order(["lota"]) == ["lota"]  # standard's runs are the script's to check, not added
    assert sweep.dependency_order(sorted(n for n in MODES.names() if MODES.get(n).trains)) == run_order()
    with pytest.raises(ValueError, match="valid choices: .*talos"):
        sweep.dependency_order(["nope"])


def test_plan_order_every_mode_then_merges_then_report():
    tasks = ["A", "B"]
    plan = build_plan("vision", tasks, modes=["talos", "lota", "standard"], merges=["ties", "sum"])
    per_mode = lambda m: [Finetune(m, "A"), Finetune(m, "B"), Evaluate("single_task", m), Evaluate("addition", m),
                          Evaluate("negation", m)]
    assert plan.steps == (*per_mode("talos"), *per_mode("standard"), *per_mode("lota"),
                          Evaluate("addition", "standard", "ties"), Evaluate("negation", "standard", "ties"),
                          Report())
    assert plan.modes == ("talos", "standard", "lota") and plan.merges == ("ties", "sum")
    assert [s.protocol for s in per_mode("x")[2:]] == list(PROTOCOLS)


def test_the_merge_rule():
    # sum of a mode the plan evaluates is that mode's own row; every other merge runs in addition and negation
    assert sweep.merge_evaluations(["sum", "ties"], ["standard"], ["standard", "talos"]) == [
        Evaluate("addition", "standard", "ties"), Evaluate("negation", "standard", "ties")]
    # a merge mode the plan does not fine-tune (its runs exist): sum too, in both protocols
    assert sweep.merge_evaluations(["sum"], ["standard"], ["talos"]) == [
        Evaluate("addition", "standard", "sum"), Evaluate("negation", "standard", "sum")]
    assert sweep.merge_evaluations(["dare", "sum"], ["standard", "talos"], ["standard", "talos"]) == [
        Evaluate("addition", "standard", "dare"), Evaluate("negation", "standard", "dare"),
        Evaluate("addition", "talos", "dare"), Evaluate("negation", "talos", "dare")]


def test_default_plan_covers_every_registered_mode_and_merge():
    plan = build_plan("nlp", ["t1", "t2", "t3"])
    assert plan.modes == tuple(run_order()) and plan.merges == tuple(MERGES.names())
    finetunes = [s for s in plan.steps if isinstance(s, Finetune)]
    assert sorted((s.mode, s.task) for s in finetunes) == sorted((m, t) for m in run_order() for t in plan.tasks)
    merged = {(s.protocol, s.merge) for s in plan.steps if isinstance(s, Evaluate) and s.merge}
    assert merged == {(p, m) for m in MERGES.names() if m != "sum" for p in ("addition", "negation")}
    assert isinstance(plan.steps[-1], Report) and sum(isinstance(s, Report) for s in plan.steps) == 1


@pytest.mark.parametrize("merge_modes", [("standard",), ("standard", "talos")])
def test_every_mode_x_merge_result_lands_in_results_json(tmp_path, merge_modes):
    """Feed every evaluation of the plan to the results export: no merge row may be missing."""
    plan = build_plan("vision", ["A"], modes=["standard", "talos"], merge_modes=merge_modes)
    path = tmp_path / "results.json"
    rows = {"addition": {"absolute": 0.5, "normalized": 0.6, "coef": 0.3},
            "negation": {"target": 0.2, "control": 0.7, "coef": {"A": 0.5}}}
    for i, s in enumerate(x for x in plan.steps if isinstance(x, Evaluate) and x.protocol != "single_task"):
        row = {**rows[s.protocol], "coef": i}  # each evaluation its own value, to see which row is which
        export_results(str(path), s.protocol, s.mode, row, merge=s.merge or "sum")
    res = json.loads(path.read_text())
    want = {m if mode == "standard" else f"{m} ({mode})" for mode in merge_modes for m in MERGES.names()
            if mode == "standard" or m != "sum"}
    assert set(res["merges"]) == set(res["negation_merges"]) == want
    assert res["merges"]["sum"] == res["addition"]["standard"]
    assert res["negation_merges"]["sum"] == res["negation"]["standard"]
    assert set(res["addition"]) == set(res["negation"]) == {"standard", "talos"}


def test_plan_rejects_bad_selections():
    with pytest.raises(ValueError, match="valid choices: .*ties"):
        build_plan("vision", ["A"], merges=["tie"])
    with pytest.raises(ValueError, match="valid: vision, nlp"):
        build_plan("audio", ["A"])
    with pytest.raises(ValueError, match="without repeats"):
        build_plan("vision", ["A", "A"])


def test_protocols_select_the_evaluations_of_every_mode():
    plan = build_plan("vision", ["A", "B"], modes=["talos"], merges=["sum"], merge_modes=[],
                      protocols=["single_task", "addition"])
    assert plan.steps == (Finetune("talos", "A"), Finetune("talos", "B"), Evaluate("single_task", "talos"),
                          Evaluate("addition", "talos"), Report())
    with pytest.raises(ValueError, match="valid: single_task, addition, negation"):
        build_plan("vision", ["A"], protocols=["sideways"])


def test_suites_are_read_from_the_domains():
    from nlp.args import TASKS
    from vision.datasets import SUITES

    assert sweep.suite_tasks("vision", "14") == SUITES["14"] and sweep.suite_tasks("nlp", "7") == TASKS
    with pytest.raises(ValueError, match="valid: 8, 14, 20"):
        sweep.suite_tasks("vision", "13")


# ------------------------------------------------------------------------------------------------------ commands
def test_commands_put_the_common_flags_first_and_the_step_flags_last():
    plan = build_plan("nlp", ["a", "b"], modes=["standard"], merges=["sum", "ties"])
    cmds = sweep.commands(plan, ["--model", "t5-small"], "out/r.json")
    shared = ("--model", "t5-small", "--eval-datasets", "a,b", "--results-json", "out/r.json")
    assert [(c.script, c.argv) for c in cmds] == [
        ("nlp/finetune.py", (*shared, "--finetuning-mode", "standard", "--train-dataset", "a")),
        ("nlp/finetune.py", (*shared, "--finetuning-mode", "standard", "--train-dataset", "b")),
        ("nlp/eval_single_task.py", (*shared, "--finetuning-mode", "standard")),
        ("nlp/eval_task_addition.py", (*shared, "--finetuning-mode", "standard")),
        ("nlp/eval_task_negation.py", (*shared, "--finetuning-mode", "standard")),
        ("nlp/eval_task_addition.py", (*shared, "--finetuning-mode", "standard", "--merge", "ties")),
        ("nlp/eval_task_negation.py", (*shared, "--finetuning-mode", "standard", "--merge", "ties")),
        ("-m talos.app.report", ("out/r.json", "--out", "out/r.md"))]
    assert cmds[0].module == "nlp.finetune" and cmds[-1].module == "talos.app.report"
    assert cmds[-1].shell() == "python -m talos.app.report out/r.json --out out/r.md"
    with pytest.raises(ValueError, match="--train-dataset"):
        sweep.commands(plan, ["--train-dataset=a"], "r.json")


def test_cli_dry_run_prints_the_plan(capsys):
    sweep.main(["--domain", "vision", "--tasks", "A,B", "--results", "o/r.json", "--modes", "standard,talos",
                "--merges", "sum,dare", "--dry-run", "--", "--model", "x y"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * (2 + 3) + 2 + 1
    assert lines[0] == ("python vision/finetune.py --model 'x y' --eval-datasets A,B --results-json o/r.json "
                        "--finetuning-mode standard --train-dataset A")
    assert lines[-2].startswith("python vision/eval_task_negation.py") and lines[-2].endswith("--merge dare")
    assert not Path("o").exists()  # a dry run writes nothing


@pytest.mark.parametrize("bad, message", [
    (["--tasks", "A", "--modes", "nope"], "unknown fine-tuning mode 'nope'; valid choices: "),
    (["--suite", "13"], "unknown suite '13'; valid: 8, 14, 20"),
    (["--tasks", "A", "--", "--merge", "ties"], "the sweep sets --merge itself")])
def test_cli_refuses_bad_input_before_running(bad, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        sweep.main(["--domain", "vision", "--results", str(tmp_path / "r.json"), *bad])
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------- runners
RECORDER = """import os, sys
with open(os.environ["SWEEP_LOG"], "a") as f:
    f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "all") + "|" + " ".join(sys.argv[1:]) + "\\n")
print("output of", *sys.argv[1:])
sys.exit(3 if "--fail" in sys.argv else 0)
"""


def _recorded(tmp_path, monkeypatch, fail_task=None):
    """Commands of a 2-mode plan whose script records its GPU and arguments instead of training."""
    script = tmp_path / "rec.py"
    script.write_text(RECORDER)
    monkeypatch.setenv("SWEEP_LOG", str(tmp_path / "calls.log"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plan = build_plan("vision", ["A", "B", "C"], modes=["standard", "talos"], merges=["sum"])
    cmds = []
    for c in sweep.commands(plan, [], tmp_path / "r.json"):
        argv = ("--fail",) if isinstance(c.step, Finetune) and c.step.task == fail_task else ()
        cmds.append(Command(c.label, str(script), argv + (c.label,), c.step))
    return cmds


def _calls(tmp_path):
    return (tmp_path / "calls.log").read_text().splitlines() if (tmp_path / "calls.log").exists() else []


def test_gpu_runner_one_task_per_gpu_with_logs(tmp_path, monkeypatch):
    cmds = _recorded(tmp_path, monkeypatch)
    layout = GpuLayout(2, log_dir=tmp_path / "logs", log_prefix="finetune-r")
    layout.log_dir.mkdir()
    sweep.run_gpus(cmds, layout, announce=lambda s: None)
    calls = _calls(tmp_path)
    fts = sorted(c for c in calls if "finetune" in c)
    assert fts == sorted(["0|finetune standard A", "1|finetune standard B", "0|finetune standard C",
                          "0|finetune talos A", "1|finetune talos B", "0|finetune talos C"])
    assert [c for c in calls if "finetune" not in c] == [f"all|{c.label}" for c in cmds if c.step.__class__ is not
                                                         Finetune]
    # every evaluation of a mode starts after all of that mode's fine-tunes
    assert max(calls.index(c) for c in calls if "finetune standard" in c) < calls.index("all|single_task standard")
    assert (layout.log_dir / "finetune-r-talos-B.log").read_text() == "output of finetune talos B\n"
    assert len(list(layout.log_dir.glob("*.log"))) == 6


def test_gpu_runner_a_failed_finetune_stops_the_sweep(tmp_path, monkeypatch):
    cmds = _recorded(tmp_path, monkeypatch, fail_task="A")
    layout = GpuLayout(2, log_dir=tmp_path)
    with pytest.raises(SweepError, match=r"finetune standard A: exit status 3 \(log: .*standard-A.log\)"):
        sweep.run_gpus(cmds, layout, announce=lambda s: None)
    calls = _calls(tmp_path)
    assert "0|--fail finetune standard A" in calls and "1|finetune standard B" in calls  # (already running)
    assert not any("standard C" in c or "single_task" in c or "talos" in c for c in calls)  # nothing new starts


def test_gpu_runner_without_gpus_and_with_torchrun(tmp_path, monkeypatch):
    cmds = _recorded(tmp_path, monkeypatch)
    sweep.run_gpus(cmds, GpuLayout(0), announce=lambda s: None)
    assert [c.split("|")[0] for c in _calls(tmp_path)] == ["all"] * len(cmds)
    launched = []
    monkeypatch.setattr(sweep, "run_subprocess", lambda c, launcher=(), **kw: launched.append((c.label, launcher)))
    shown = []
    sweep.run_gpus(cmds, GpuLayout(4, nproc_per_task=2), announce=shown.append)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert launched == [(c.label, torchrun if isinstance(c.step, Finetune) else ()) for c in cmds]
    assert shown[0].startswith("python -m torch.distributed.run --standalone --nproc_per_node=2 ")


def test_subprocess_runner_raises_on_failure(tmp_path, monkeypatch):
    cmds = _recorded(tmp_path, monkeypatch, fail_task="A")
    with pytest.raises(SweepError, match="finetune standard A: exit status 3"):
        sweep.run_sequence(cmds, sweep.run_subprocess, announce=lambda s: None)
    assert _calls(tmp_path) == ["all|--fail finetune standard A"]


def test_in_process_runner_calls_main_in_order_and_stops_at_a_failure(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_sweep_domain"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "finetune.py").write_text(
        "CALLS = []\ndef main(argv):\n    CALLS.append(list(argv))\n"
        "    if '--fail' in argv:\n        raise KeyError('boom')\n"
        "    return {'interrupted': '--stop' in argv}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cmd = lambda *argv: Command("ft", "fake_sweep_domain/finetune.py", argv, Finetune("m", "t"))
    shown = []
    sweep.run_sequence([cmd("--a", "x y"), cmd("--b")], sweep.run_in_process, announce=shown.append)
    import fake_sweep_domain.finetune as mod

    assert mod.CALLS == [["--a", "x y"], ["--b"]] and shown[0] == "+ python fake_sweep_domain/finetune.py --a 'x y'"
    with pytest.raises(KeyError):
        sweep.run_sequence([cmd("--fail"), cmd("--never")], sweep.run_in_process, announce=shown.append)
    assert mod.CALLS[-1] == ["--fail"]
    with pytest.raises(SweepError, match="stopped before its last step"):
        sweep.run_in_process(cmd("--stop"))


def test_run_commands_calls_each_scripts_main_in_order(tmp_path, monkeypatch, capsys):
    from talos.app import run_commands

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
