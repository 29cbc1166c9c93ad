"""The experiment sweep: one typed plan of fine-tunes, evaluations, merges and report, and the runners that run it.

Every table launch script, smoke run and the demo consume this plan::

    python -m talos.app.sweep --domain vision --suite 8 --run gpus --results runs/r.json -- --model ViT-B-32 ...
    python -m talos.app.sweep --domain nlp --tasks qasc,wsc --results out/r.json --dry-run -- --model t5-small

The plan (:func:`build_plan`), in order: for each mode, after the modes it requires (:func:`dependency_order`),
its fine-tune of every task, then its single-task, addition and negation evaluations; then every merge of the
merge modes' task vectors in addition and negation (:func:`merge_evaluations`); then the markdown report.
Each step is one script call, ``python <domain>/<script>.py <flags>`` (:func:`commands`), run by one of
:data:`RUNNERS`: ``inprocess`` (each script's ``main(argv)`` in this process: importing torch and the model
libraries dominates tiny CPU runs), ``subprocess`` (one process each) or ``gpus`` (a mode's fine-tunes NGPU at a
time, one task per GPU with its log in a file, or each on K GPUs with torchrun). The first failure stops the
sweep. Scripts skip runs that are finished, so rerunning a sweep only runs what is missing.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

#: The evaluation script of each protocol (``talos.stages.PROTOCOLS``), ``<domain>/<script>.py``.
PROTOCOL_SCRIPTS = {"single_task": "eval_single_task", "addition": "eval_task_addition",
                    "negation": "eval_task_negation"}
#: The domain packages; each holds ``finetune.py`` and the evaluation scripts, each with ``main(argv)``.
DOMAINS = ("vision", "nlp")
#: Flags the plan sets per step or per sweep; the common script flags must not carry them.
PLAN_FLAGS = ("--finetuning-mode", "--train-dataset", "--merge", "--eval-datasets", "--results-json")


class SweepError(RuntimeError):
    """A step of the sweep failed (the message names it and where its log is)."""


@dataclass(frozen=True)
class Finetune:
    """Fine-tune ``mode`` on ``task`` (the fine-tunes of one mode are independent of each other)."""

    mode: str
    task: str


@dataclass(frozen=True)
class Evaluate:
    """Evaluate ``mode``'s task vectors under ``protocol``; ``merge`` None is the mode's own row (sum)."""

    protocol: str
    mode: str
    merge: str | None = None


@dataclass(frozen=True)
class Report:
    """Render results.json as markdown."""


Step = Union[Finetune, Evaluate, Report]


@dataclass(frozen=True)
class Plan:
    """What a sweep runs, in order (``steps``), and the selection it was built from."""

    domain: str
    tasks: tuple[str, ...]
    modes: tuple[str, ...]
    merges: tuple[str, ...]
    merge_modes: tuple[str, ...]
    steps: tuple[Step, ...]


def suite_tasks(domain: str, suite: str) -> list[str]:
    """The tasks of a named suite, as the domain's ``args.DOMAIN.suites`` declares them (vision "8", "14", "20";
    nlp "7", the paper's)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    return importlib.import_module(f"{domain}.args").DOMAIN.suite(suite)


def dependency_order(modes: Iterable[str]) -> list[str]:
    """``modes`` reordered so each comes after the selected modes it requires (otherwise in the given order).

    Requirements outside the selection are not added: the fine-tuning script checks that their runs exist.
    Over every mode that trains, in registry order, this is :func:`talos.modes.run_order`.
    """
    from talos.modes import MODES

    selected = list(dict.fromkeys(modes))
    out: list[str] = []

    def visit(name: str) -> None:
        if name in out:
            return
        m = MODES.get(name)  # an unknown name raises with the valid ones
        for req in m.requires + ((m.source_mode,) if m.source_mode else ()):
            if req in selected:
                visit(req)
        out.append(name)

    for name in selected:
        visit(name)
    return out


def merge_evaluations(merges: Sequence[str], merge_modes: Sequence[str], modes: Sequence[str]) -> list[Evaluate]:
    """The merge rows: every merge of each merge mode's task vectors, in addition and in negation.

    ``sum`` of a mode the plan evaluates anyway is that mode's own addition and negation row (the scripts'
    default merge), which results.json already files under ``sum`` too; it is not run twice.
    """
    out = []
    for merge in merges:
        for mode in merge_modes:
            if merge == "sum" and mode in modes:
                continue
            out += [Evaluate("addition", mode, merge), Evaluate("negation", mode, merge)]
    return out


def build_plan(domain: str, tasks: Sequence[str], *, modes: Sequence[str] | None = None,
               merges: Sequence[str] | None = None, merge_modes: Sequence[str] = ("standard",),
               protocols: Sequence[str] | None = None) -> Plan:
    """The sweep over ``tasks``: ``modes`` (default: every mode that trains), each evaluated by ``protocols``
    (default: all three), and ``merges`` (default: every registered merge, applied to the task vectors of
    ``merge_modes``). Unknown names raise with the valid ones."""
    from talos.merges import MERGES
    from talos.modes import MODES, run_order

    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"the tasks must be a non-empty list without repeats, got {list(tasks)}")
    protocols = list(PROTOCOL_SCRIPTS if protocols is None else protocols)
    unknown = [p for p in protocols if p not in PROTOCOL_SCRIPTS]
    if unknown or not protocols:
        raise ValueError(f"unknown or no protocols {unknown}; valid: {', '.join(PROTOCOL_SCRIPTS)}")
    modes = dependency_order(run_order() if modes is None else modes)
    merges = list(dict.fromkeys(MERGES.names() if merges is None else merges))
    for name in merges:
        MERGES.get(name)
    for name in merge_modes:
        MODES.get(name)
    steps: list[Step] = []
    for mode in modes:
        if MODES.get(mode).trains:
            steps += [Finetune(mode, task) for task in tasks]
        steps += [Evaluate(protocol, mode) for protocol in PROTOCOL_SCRIPTS if protocol in protocols]
    steps += merge_evaluations(merges, merge_modes, modes)
    steps.append(Report())
    return Plan(domain, tuple(tasks), tuple(modes), tuple(merges), tuple(merge_modes), tuple(steps))


@dataclass(frozen=True)
class Command:
    """One script call: what ``python <script> <argv>`` runs (``script`` a path, or ``-m module``)."""

    label: str
    script: str
    argv: tuple[str, ...]
    step: Step | None = None

    @property
    def module(self) -> str:
        """The module whose ``main(argv)`` the command runs."""
        if self.script.startswith("-m "):
            return self.script[3:]
        if not self.script.endswith(".py"):
            raise ValueError(f"expected '<domain>/<script>.py' or '-m module', got {self.script!r}")
        return self.script.removesuffix(".py").replace("/", ".")

    def args(self, python: str = "python") -> list[str]:
        """The process's argument list."""
        return [python, *self.script.split(maxsplit=1), *self.argv]

    def shell(self, python: str = "python") -> str:
        """The command as a shell line."""
        return shlex.join(self.args(python))


def step_label(step: Step) -> str:
    """A short name for logs and timings: ``finetune talos Cars``, ``addition standard merge ties``."""
    if isinstance(step, Finetune):
        return f"finetune {step.mode} {step.task}"
    if isinstance(step, Evaluate):
        return f"{step.protocol} {step.mode}" + (f" merge {step.merge}" if step.merge else "")
    return "report"


def commands(plan: Plan, common: Sequence[str], results: str | os.PathLike, report: str | os.PathLike | None = None
             ) -> list[Command]:
    """The plan's script calls: ``common`` flags (those of every script), then the flags of the step.

    Every evaluation writes its rows into ``results`` (``--results-json``); the report renders it to ``report``
    (default: ``results`` with the suffix ``.md``).
    """
    clash = sorted({a.split("=")[0] for a in common} & set(PLAN_FLAGS))
    if clash:
        raise ValueError(f"the sweep sets {', '.join(clash)} itself: leave it out of the common script flags")
    results = str(results)
    report = str(report) if report is not None else str(Path(results).with_suffix(".md"))
    shared = [*common, "--eval-datasets", ",".join(plan.tasks), "--results-json", results]
    out = []
    for step in plan.steps:
        if isinstance(step, Finetune):
            cmd = (f"{plan.domain}/finetune.py",
                   [*shared, "--finetuning-mode", step.mode, "--train-dataset", step.task])
        elif isinstance(step, Evaluate):
            cmd = (f"{plan.domain}/{PROTOCOL_SCRIPTS[step.protocol]}.py", [*shared, "--finetuning-mode", step.mode]
                   + (["--merge", step.merge] if step.merge else []))
        else:
            cmd = ("-m talos.app.report", [results, "--out", report])
        out.append(Command(step_label(step), cmd[0], tuple(cmd[1]), step))
    return out


# ------------------------------------------------------------------------------------------------------- runners
def run_in_process(cmd: Command) -> object:
    """Call the command's ``main(argv)`` in this process (exceptions propagate); returns what it returns."""
    result = importlib.import_module(cmd.module).main(list(cmd.argv))
    if isinstance(result, dict) and result.get("interrupted"):  # e.g. --stop-after: no task vector to evaluate
        raise SweepError(f"{cmd.label}: fine-tuning stopped before its last step")
    return result


def run_subprocess(cmd: Command, *, env: dict[str, str] | None = None, log: Path | None = None,
                   launcher: Sequence[str] = ()) -> None:
    """Run the command as its own Python process (through ``launcher``, e.g. torchrun, when given); a non-zero
    exit raises. Output goes to ``log`` when given (created anew), else to this process's streams."""
    args = [sys.executable, *launcher, *cmd.args(sys.executable)[1:]] if launcher else cmd.args(sys.executable)
    with open(log, "w") if log is not None else contextlib.nullcontext() as f:
        rc = subprocess.run(args, env=env, stdout=f, stderr=subprocess.STDOUT if f else None).returncode
    if rc != 0:
        raise SweepError(f"{cmd.label}: exit status {rc}" + (f" (log: {log})" if log else "") + f"\n  {cmd.shell()}")


def torchrun(nproc: int) -> list[str]:
    """The launcher of one fine-tune on ``nproc`` GPUs (arguments after ``python``)."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def visible_gpus() -> int:
    """The number of GPUs ``nvidia-smi -L`` lists (0 without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if line.strip()) if out.returncode == 0 else 0


@dataclass(frozen=True)
class GpuLayout:
    """How the ``gpus`` runner spreads a mode's fine-tunes: ``ngpu`` > 1 runs them ``ngpu`` at a time, one task
    per GPU, each logging to ``log_dir/finetune-<results name>-<mode>-<task>.log``; ``nproc_per_task`` > 1
    instead runs each on that many GPUs with torchrun. Otherwise (and for every evaluation) one at a time."""

    ngpu: int
    nproc_per_task: int = 1
    log_dir: Path = Path(".")
    log_prefix: str = "finetune"

    def log(self, step: Finetune) -> Path:
        """The log file of a background fine-tune."""
        return self.log_dir / f"{self.log_prefix}-{step.mode}-{step.task}.log"

    def placement(self, group: Sequence[Command]) -> list[tuple[Command, int | None]]:
        """Each command of a group of independent fine-tunes with its GPU (None: the foreground, every GPU)."""
        spread = self.ngpu > 1 and self.nproc_per_task <= 1 and isinstance(group[0].step, Finetune)
        return [(c, i % self.ngpu if spread else None) for i, c in enumerate(group)]


def parallel_groups(cmds: Sequence[Command]) -> list[list[Command]]:
    """Consecutive fine-tunes of one mode form a group (independent of each other); every other command is
    a group of its own."""
    groups: list[list[Command]] = []
    for c in cmds:
        prev = groups[-1][-1].step if groups else None
        if isinstance(c.step, Finetune) and isinstance(prev, Finetune) and prev.mode == c.step.mode:
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups


def _run_on_gpus(placed: list[tuple[Command, int]], layout: GpuLayout) -> None:
    """One worker per GPU runs its commands in turn; after a failure no worker starts another one."""
    failures: list[str] = []
    stop = threading.Event()

    def worker(gpu: int) -> None:
        for cmd, g in placed:
            if g != gpu or stop.is_set():
                continue
            try:
                run_subprocess(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}, log=layout.log(cmd.step))
            except SweepError as e:
                failures.append(str(e))
                stop.set()

    threads = [threading.Thread(target=worker, args=(g,)) for g in sorted({g for _, g in placed})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SweepError("\n".join(failures))


def run_gpus(cmds: Sequence[Command], layout: GpuLayout, announce: Callable[[str], None] = print) -> None:
    """Run the commands in order, each group of fine-tunes spread over the GPUs as ``layout`` says."""
    for group in parallel_groups(cmds):
        placed = layout.placement(group)
        lines = gpu_lines(placed, layout)
        if placed[0][1] is not None:
            for line in lines:
                announce(line)
            _run_on_gpus(placed, layout)  # type: ignore[arg-type]  (every GPU is set in a spread group)
            continue
        for (cmd, _), line in zip(placed, lines):
            announce(line)
            multi = isinstance(cmd.step, Finetune) and layout.nproc_per_task > 1
            run_subprocess(cmd, launcher=torchrun(layout.nproc_per_task) if multi else ())


def gpu_lines(placed: Sequence[tuple[Command, int | None]], layout: GpuLayout) -> list[str]:
    """The shell lines of a placed group, as :func:`run_gpus` runs them."""
    lines = []
    for cmd, gpu in placed:
        if gpu is not None:
            lines.append(f"CUDA_VISIBLE_DEVICES={gpu} {cmd.shell()} > {shlex.quote(str(layout.log(cmd.step)))} 2>&1"
                         f"  # in parallel with the other GPUs")
        elif isinstance(cmd.step, Finetune) and layout.nproc_per_task > 1:
            lines.append(shlex.join(["python", *torchrun(layout.nproc_per_task), *cmd.args()[1:]]))
        else:
            lines.append(cmd.shell())
    return lines


def run_sequence(cmds: Sequence[Command], run_one: Callable[[Command], object],
                 announce: Callable[[str], None] = print) -> None:
    """Run the commands one after another; the first failure stops the sweep."""
    for cmd in cmds:
        announce("+ " + cmd.shell())
        run_one(cmd)


RUNNERS = ("inprocess", "subprocess", "gpus")


# ----------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The sweep's own flags (the script flags follow ``--``)."""
    p = argparse.ArgumentParser(
        prog="python -m talos.app.sweep", description=__doc__.split("\n\n")[0],
        usage="%(prog)s --domain D (--tasks A,B | --suite S) --results PATH [options] -- SCRIPT FLAGS")
    p.add_argument("--domain", required=True, choices=DOMAINS)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tasks", help="comma-separated tasks")
    group.add_argument("--suite", help="a named task suite (vision: 8, 14, 20; nlp: 7)")
    p.add_argument("--modes", help="comma-separated fine-tuning modes (default: every registered mode that trains)")
    p.add_argument("--merges", help="comma-separated merges (default: every registered merge)")
    p.add_argument("--merge-modes", default="standard", help="comma-separated modes whose task vectors every merge combines (default: standard)")
    p.add_argument("--protocols", help="comma-separated protocols of every mode (default: single_task, addition, "
                                       "negation)")
    p.add_argument("--results", required=True, help="results.json every evaluation writes into")
    p.add_argument("--report", help="markdown report (default: RESULTS with .md)")
    p.add_argument("--fresh", action="store_true",
                   help="delete RESULTS first (the evaluations re-add their rows from their finished runs)")
    p.add_argument("--run", default="subprocess", choices=RUNNERS,
                   help="inprocess: every script's main(argv) in this process; subprocess: one process each; "
                        "gpus: a mode's fine-tunes spread over the GPUs (default: subprocess)")
    p.add_argument("--ngpu", type=int, default=None, help="gpus: GPUs to spread over (default: nvidia-smi -L)")
    p.add_argument("--nproc-per-task", type=int, default=1, help="gpus: run each fine-tune on K GPUs (torchrun)")
    p.add_argument("--log-dir", help="gpus: folder of the fine-tune logs (default: RESULTS' folder)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    return p


def _split_csv(s: str | None) -> list[str] | None:
    return None if s is None else [x for x in s.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    """Build the plan from the flags and run it (or print it with ``--dry-run``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = build_parser()
    a = p.parse_args(own)
    try:
        tasks = _split_csv(a.tasks) if a.tasks is not None else suite_tasks(a.domain, a.suite)
        plan = build_plan(a.domain, tasks or [], modes=_split_csv(a.modes), merges=_split_csv(a.merges),
                          merge_modes=_split_csv(a.merge_modes) or [], protocols=_split_csv(a.protocols))
        cmds = commands(plan, common, a.results, a.report)
        if a.nproc_per_task < 1 or (a.ngpu is not None and a.ngpu < 0):
            raise ValueError("--nproc-per-task must be at least 1 and --ngpu at least 0")
    except ValueError as e:
        p.error(str(e))
    results = Path(a.results)
    layout = None
    if a.run == "gpus":
        ngpu = visible_gpus() if a.ngpu is None else a.ngpu
        layout = GpuLayout(ngpu, a.nproc_per_task, Path(a.log_dir) if a.log_dir else results.parent,
                           f"finetune-{results.stem}")
    if a.dry_run:
        lines = ([line for g in parallel_groups(cmds) for line in gpu_lines(layout.placement(g), layout)]
                 if layout else [c.shell() for c in cmds])
        print("\n".join(lines))
        return 0
    results.parent.mkdir(parents=True, exist_ok=True)
    if a.fresh:
        results.unlink(missing_ok=True)
    if layout is not None:
        layout.log_dir.mkdir(parents=True, exist_ok=True)
        run_gpus(cmds, layout, announce=lambda s: print("+ " + s, flush=True))
    else:
        run_sequence(cmds, run_in_process if a.run == "inprocess" else run_subprocess,
                     announce=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
