"""The demo pipeline: fine-tuning modes and merges on a toy world, then report and figures.

    python -m vision.demo.run OUTDIR                       (what launch_scripts/demo.sh runs)
    python -m vision.demo.run OUTDIR --full                (every registered mode and merge)
    python -m vision.demo.run OUTDIR --world overlapping   (the shared-scene world)

``--world disjoint`` (default) has six tasks with images from six unlike domains, as the paper's datasets
are; ``--world overlapping`` has six tasks that read the same scenes (:mod:`vision.demo.world`). By default
the demo runs the modes of :data:`DEFAULT_MODES` (non-linear FT, TaLoS, one linearized and one sparse
baseline) and the merges of :data:`DEFAULT_MERGES`; ``--full`` runs every mode in ``talos.modes.run_order()``
and every merge in ``talos.merges.MERGES`` (new ones are picked up automatically).

Steps, each printed as the equivalent shell command before it runs:

1. ``python -m vision.demo.world``: the task image folders under ``OUTDIR/data`` (seeded, cached).
2.-4. The sweep plan of :mod:`talos.app.sweep`, the one the launch scripts run: for every mode (after the
   modes it requires) ``vision/finetune.py`` once per task (calibration + fine-tuning), then
   ``vision/eval_single_task.py``, ``vision/eval_task_addition.py`` and ``vision/eval_task_negation.py``; for
   every merge but ``sum`` (the standard mode's own rows) ``vision/eval_task_addition.py`` and
   ``vision/eval_task_negation.py --finetuning-mode standard --merge M``; ``python -m talos.app.report`` (results.md).
5. ``python -m vision.demo.figures`` (PNGs, diagnostics.json).

All of them load the committed toy CLIP (``--model talos-toy-clip --pretrained vision/demo/toy_clip.safetensors``).
By default the scripts' ``main(argv)`` run in this one process (importing torch and open_clip ~90 times
would cost several minutes of the CPU budget); ``--subprocess`` runs each as its own ``python`` process
instead, exactly as printed. A step that fails (e.g. a mode under construction) is reported and the demo
goes on with the others; the exit status is 1 if any step failed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from talos.app.sweep import Command, Finetune, build_plan, commands, run_in_process, run_subprocess

REPO = Path(__file__).resolve().parents[2]

#: Modes and merges of the default (five-minute) demo; ``--full`` runs every registered one.
DEFAULT_MODES = ["standard", "linear", "lota", "talos"]
DEFAULT_MERGES = ["sum", "ties", "tall_masks"]

#: The demo's settings: identical for every mode and both worlds (nothing here is tuned per method).
#: lr chosen on non-linear FT's mean validation accuracy alone (disjoint world, these settings, the checkpoint
#: pre-trained with 10% scenes): 1e-4: 87.2, 3e-4: 92.8, 1e-3: 91.1. (With the first checkpoint, 40% scenes,
#: the same rule chose 1e-3, and no lr or epoch count let non-linear task addition beat zero-shot by more
#: than 1.2 points: that checkpoint's features of the six disjoint tasks were entangled; see issue 16.)
#: 600 images per task and 11 coefficients (0, 0.1, ..., 1; the paper uses 21) keep the default demo
#: within about five minutes on 2 cores.
SETTINGS = {
    "n_train": 600,  # images per task (10% of them form <Task>Val: calibration and coefficient choice)
    "n_test": 300,
    "world_seed": 0,
    "epochs": 5,
    "batch_size": 64,
    "lr": 3e-4,
    "warmup": 10,
    "calibration_batch_size": 32,
    "eval_batch_size": 500,
    "n_eval_points": 11,
}


def common_args(out: Path, checkpoint: str, control: str, s: dict) -> list[str]:
    """The flags every script of the demo shares (the sweep adds the tasks and the results file)."""
    return ["--model", "talos-toy-clip", "--pretrained", checkpoint, "--data-location", str(out / "data"),
            "--save", str(out / "runs"), "--control-dataset", control,
            "--epochs", str(s["epochs"]), "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]),
            "--warmup-length", str(s["warmup"]), "--calibration-batch-size", str(s["calibration_batch_size"]),
            "--eval-batch-size", str(s["eval_batch_size"]), "--n-eval-points", str(s["n_eval_points"]),
            "--num-workers", "0", "--device", "cpu",
            "--plugins", "vision.demo.tasks"]  # the demo's tasks are a dataset plugin, not library datasets


def plan(out: Path, checkpoint: str, tasks: list[str], control: str, modes: list[str], merges: list[str],
         s: dict) -> list[Command]:
    """The demo's commands: the world's images, the sweep's plan (:mod:`talos.app.sweep`), then the figures."""
    common = common_args(out, checkpoint, control, s)
    sweep_plan = build_plan("vision", tasks, modes=modes, merges=merges)
    world = Command("world", "-m vision.demo.world",
                    ("--data-location", str(out / "data"), "--tasks", ",".join(tasks + [control]),
                     "--n-train", str(s["n_train"]), "--n-test", str(s["n_test"]), "--seed", str(s["world_seed"])))
    figures = Command("figures", "-m vision.demo.figures",
                      (*common, "--eval-datasets", ",".join(tasks), "--results-json", str(out / "results.json"),
                       "--figures-dir", str(out), "--modes", ",".join(sweep_plan.modes)))
    return [world, *commands(sweep_plan, common, out / "results.json", out / "results.md"), figures]


@dataclass
class Outcome:
    """What became of one command: its wall time and its error (None: it succeeded)."""

    seconds: float = 0.0
    error: str | None = None


def _mode(cmd: Command) -> str | None:
    return getattr(cmd.step, "mode", None)


def _run_one(cmd: Command, in_subprocesses: bool) -> None:
    if in_subprocesses:
        run_subprocess(cmd)
    elif cmd.label == "report":
        with contextlib.redirect_stdout(io.StringIO()):  # the tables are printed once, at the end
            run_in_process(cmd)
    else:
        run_in_process(cmd)


def run_steps(cmds: list[Command], out: Path, in_subprocesses: bool, quiet: bool = False
              ) -> tuple[list[Outcome], float]:
    """Run ``cmds`` in order under an overall progress bar; a failing command is recorded and skipped over
    (with the later evaluations of its mode). Returns each command's outcome and the wall time in seconds."""
    from tqdm.auto import tqdm

    t0 = time.time()
    failed_modes: dict[str, str] = {}
    outcomes = [Outcome() for _ in cmds]
    bar = tqdm(total=len(cmds), desc="demo", unit="step", disable=quiet, position=0)
    for i, (cmd, res) in enumerate(zip(cmds, outcomes), 1):
        bar.set_postfix_str(cmd.label)
        tqdm.write(f"[{i}/{len(cmds)} {_fmt(time.time() - t0)}] {cmd.label}\n  + {cmd.shell()}")
        mode = _mode(cmd)
        if mode in failed_modes and not isinstance(cmd.step, Finetune):
            res.error = f"skipped: {mode} failed earlier ({failed_modes[mode]})"
            tqdm.write(f"  ! {res.error}")
            bar.update()
            continue
        ts = time.time()
        try:
            _run_one(cmd, in_subprocesses)
        except Exception as e:  # noqa: BLE001 - a failing step must not stop the demo
            res.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            logging.getLogger("talos").error("step %s failed:\n%s", cmd.label, traceback.format_exc())
            tqdm.write(f"  ! FAILED: {res.error} (traceback in {out / 'demo.log'})")
            if mode:
                failed_modes.setdefault(mode, res.error)
        res.seconds = time.time() - ts
        bar.update()
    bar.close()
    return outcomes, time.time() - t0


def _setup_logging(out: Path) -> None:
    """INFO and above to OUTDIR/demo.log, warnings to the console (the scripts' basicConfig is then a no-op)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fh = logging.FileHandler(out / "demo.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    fh.setLevel(logging.INFO)
    ch = logging.StreamHandler(sys.stderr)
    ch.setLevel(logging.WARNING)
    root.addHandler(fh)
    root.addHandler(ch)


def _fmt(sec: float) -> str:
    return f"{int(sec // 60):d}:{int(sec % 60):02d}"


def summary_tables(results: dict, diag: dict | None) -> str:
    """Zero-shot vs fine-tuned per task, and TaLoS vs non-linear FT on the headline numbers."""
    lines = []
    st = results.get("single_task", {})
    zs = st.get("zeroshot", {})
    if zs:
        tasks = list(zs)
        lines += ["## Zero-shot vs fine-tuned (test accuracy, %)", "",
                  "| task | classes (chance) | zero-shot | " + " | ".join(m for m in st if m != "zeroshot") + " |",
                  "|---|---:|---:|" + "---:|" * (len(st) - 1)]
        from vision.demo.world import TASKS

        for t in tasks:
            c = TASKS[t].n_classes if t in TASKS else 0
            cells = [f"{100 * st[m][t]:.1f}" if t in st[m] else "-" for m in st if m != "zeroshot"]
            lines.append(f"| {t} | {c} ({100 / max(1, c):.0f}) | {100 * zs[t]:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    add, neg = results.get("addition", {}), results.get("negation", {})
    if zs and (add or results.get("merges")):
        base = sum(zs.values()) / len(zs)
        rows = [(m, r) for m, r in add.items()] + [(f"merge {m}", r) for m, r in results.get("merges", {}).items()]
        lines += [f"## Task addition vs zero-shot (mean absolute test accuracy; zero-shot {100 * base:.1f})", "",
                  "| method | α (chosen on Val) | absolute | gain over zero-shot (points) | normalised |",
                  "|---|---:|---:|---:|---:|"]
        for m, r in rows:
            lines.append(f"| {m} | {r['coef']:g} | {100 * r['absolute']:.1f} | {100 * (r['absolute'] - base):+.1f} | "
                         f"{100 * r['normalized']:.1f} |")
        lines.append("")
    if "talos" in add and "standard" in add:
        a, b = add["talos"], add["standard"]
        lines += ["## TaLoS vs non-linear fine-tuning (standard)", "",
                  f"- addition, normalised accuracy: talos {100 * a['normalized']:.1f} vs standard "
                  f"{100 * b['normalized']:.1f} ({'talos higher' if a['normalized'] > b['normalized'] else 'talos not higher'})",
                  f"- addition, absolute accuracy: talos {100 * a['absolute']:.1f} vs standard {100 * b['absolute']:.1f}"]
        if "talos" in neg and "standard" in neg:
            a, b = neg["talos"], neg["standard"]
            lines.append(f"- negation, target accuracy (lower is better): talos {100 * a['target']:.1f} vs standard "
                         f"{100 * b['target']:.1f}; control talos {100 * a['control']:.1f} vs standard "
                         f"{100 * b['control']:.1f}")
        lines.append("")
    if diag:
        norms = diag.get("task_vector_norm", {})
        if norms:
            lines += ["## Task vectors: L2 norm (mean over tasks) and mean |cosine| between tasks", "",
                      "| mode | norm | mean abs cosine |", "|---|---:|---:|"]
            for m, per in norms.items():
                cs = diag["task_vector_cosine"][m]
                off = [abs(cs[a][b]) for a in cs for b in cs if a != b]
                lines.append(f"| {m} | {sum(per.values()) / len(per):.3f} | {sum(off) / max(1, len(off)):.3f} |")
            lines.append("")
        iou = diag.get("talos_masks", {}).get("iou")
        if iou:
            off = [iou[a][b] for a in iou for b in iou if a != b]
            lines += [f"TaLoS masks: density {sum(diag['talos_masks']['density'].values()) / len(iou):.3f}, "
                      f"mean IoU across tasks {sum(off) / len(off):.3f} (min {min(off):.3f}, max {max(off):.3f}).", ""]
        xi = diag.get("xi", {})
        if xi:
            alphas = diag["alphas"]
            idx = [i for i, a in enumerate(alphas) if 0 <= a <= 1]
            lines += [f"Mean disentanglement error ξ over α1, α2 ∈ [0, 1] ({' + '.join(diag['pair'])}): "
                      + ", ".join(f"{m} {sum(xi[m][i][j] for i in idx for j in idx) / len(idx) ** 2:.3f}" for m in xi),
                      ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from vision.demo import CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=None, help="output folder (default: out/demo, out/demo-overlapping)")
    p.add_argument("--world", default="disjoint", choices=["disjoint", "overlapping"],
                   help="disjoint: one image domain per task (the paper's setting); overlapping: all tasks read "
                        "the same scenes")
    p.add_argument("--full", action="store_true", help="every registered mode and merge (default: "
                   f"modes {','.join(DEFAULT_MODES)}; merges {','.join(DEFAULT_MERGES)})")
    p.add_argument("--subprocess", action="store_true", help="run every step as its own python process")
    p.add_argument("--modes", default=None, help="comma-separated modes (overrides the default and --full)")
    p.add_argument("--merges", default=None, help="comma-separated merges (overrides the default and --full)")
    p.add_argument("--tasks", default=None, help="comma-separated target tasks (default: the world's six)")
    p.add_argument("--checkpoint", default=os.path.relpath(CHECKPOINT, REPO))
    p.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="torch CPU threads (default: 2 where 2 cores are available; a fine-tune step is 1.75x "
                        "faster with 2 than with 1 on a 2-core Xeon, and the tiny model gains little beyond)")
    p.add_argument("--no-progress", action="store_true", help="no overall progress bar")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a demo setting (fast loops: --set epochs=1 --set n_eval_points=5); "
                        f"keys: {', '.join(SETTINGS)}")
    return p


def _selection(a: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(modes, merges) to run: explicit lists, else all registered with --full, else the defaults."""
    from talos.merges import MERGES
    from talos.modes import MODES, run_order

    modes = a.modes.split(",") if a.modes else run_order() if a.full else list(DEFAULT_MODES)
    merges = a.merges.split(",") if a.merges else MERGES.names() if a.full else list(DEFAULT_MERGES)
    for kind, names, valid in (("mode", modes, list(MODES)), ("merge", merges, MERGES.names())):
        bad = [n for n in names if n not in valid]
        if bad:
            p.error(f"unknown {kind} {', '.join(bad)}; valid: {', '.join(valid)}")
    return modes, merges


def main(argv: Sequence[str] | None = None) -> int:
    from vision.demo.world import WORLDS

    p = build_parser()
    a = p.parse_args(argv)
    settings = dict(SETTINGS)
    for kv in a.set:
        key, _, value = kv.partition("=")
        if key not in SETTINGS:
            p.error(f"unknown setting {key!r}; valid: {', '.join(SETTINGS)}")
        settings[key] = type(SETTINGS[key])(value)
    modes, merges = _selection(a, p)
    targets, control = WORLDS[a.world]
    tasks = a.tasks.split(",") if a.tasks else list(targets)
    bad = [t for t in tasks if t not in targets]
    if bad:
        p.error(f"task(s) {', '.join(bad)} not in the {a.world} world; valid: {', '.join(targets)}")
    out = Path(a.out or ("out/demo" if a.world == "disjoint" else f"out/demo-{a.world}"))
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # for --subprocess steps
        os.environ[var] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)  # rebuilt from the (cached) runs every time
    _setup_logging(out)

    cmds = plan(out, a.checkpoint, tasks, control, modes, merges, settings)
    print(f"demo ({a.world} world): {len(cmds)} steps, modes {' '.join(modes)}; merges {' '.join(merges)}; "
          f"log {out / 'demo.log'}", flush=True)
    outcomes, wall = run_steps(cmds, out, a.subprocess, a.no_progress)
    timing = {"world": a.world, "wall_seconds": round(wall, 1), "per_mode_seconds": {},
              "steps": [{"label": c.label, "seconds": round(o.seconds, 2), "error": o.error}
                        for c, o in zip(cmds, outcomes)],
              "settings": settings, "threads": a.threads, "subprocess": a.subprocess}
    return _write_summary(out, cmds, outcomes, timing)


def _write_summary(out: Path, cmds: list[Command], outcomes: list[Outcome], timing: dict) -> int:
    """timings.json, the demo's own tables appended to results.md; 1 if a step failed or was skipped."""
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    diag_path = out / "diagnostics.json"
    diag = json.loads(diag_path.read_text()) if diag_path.exists() else None
    extra = summary_tables(results, diag)
    per_mode: dict[str, float] = {}
    for c, o in zip(cmds, outcomes):
        key = _mode(c) or c.label.split()[0]
        per_mode[key] = per_mode.get(key, 0.0) + o.seconds
    timing["per_mode_seconds"] = {k: round(v, 1) for k, v in per_mode.items()}
    (out / "timings.json").write_text(json.dumps(timing, indent=1) + "\n")
    md_path = out / "results.md"
    md = md_path.read_text() if md_path.exists() else ""
    failures = [(c, o) for c, o in zip(cmds, outcomes) if o.error]
    tail = [f"Demo wall time {_fmt(timing['wall_seconds'])} ({len(cmds)} steps; per mode: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in per_mode.items()) + ")."]
    if failures:
        tail.append("Failed or skipped steps: " + "; ".join(f"{c.label}: {o.error}" for c, o in failures))
    md_path.write_text(md.rstrip() + "\n\n" + extra + "\n" + "\n".join(tail) + "\n")
    print("\n" + md_path.read_text())
    print(f"results: {out / 'results.json'}, {md_path}; figures: "
          + ", ".join(str(x) for x in sorted(out.glob("*.png"))))
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
