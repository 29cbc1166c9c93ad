"""The demo pipeline: every registered fine-tuning mode and merge on the toy world, then report and figures.

    python -m vision.demo.run OUTDIR            (what launch_scripts/demo.sh runs)

Steps, each printed as the equivalent shell command before it runs:

1. ``python -m vision.demo.world``: the task image folders under ``OUTDIR/data`` (seeded, cached).
2. For every mode in ``talos.modes.run_order()`` (new modes are picked up automatically):
   ``vision/finetune.py`` once per task (calibration + fine-tuning), then ``vision/eval_single_task.py``,
   ``vision/eval_task_addition.py`` and ``vision/eval_task_negation.py``.
3. For every merge in ``talos.merges.MERGES``: ``vision/eval_task_addition.py --finetuning-mode standard --merge M``
   and (but ``sum``) ``vision/eval_task_negation.py`` with the same flags.
4. ``python -m talos.report`` (results.md) and ``python -m vision.demo.figures`` (PNGs, diagnostics.json).

All of them load the committed toy CLIP (``--model talos-toy-clip --pretrained vision/demo/toy_clip.safetensors``).
By default the scripts' ``main(argv)`` run in this one process (importing torch and open_clip ~90 times
would cost several minutes of the CPU budget); ``--subprocess`` runs each as its own ``python`` process
instead, exactly as printed. A step that fails (e.g. a mode under construction) is reported and the demo
goes on with the others; the exit status is 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]

#: The demo's settings: identical for every mode (nothing here is tuned per method). lr = the toy CLIP's
#: pre-training peak lr: at 3e-4 non-linear FT reached lower single-task accuracy on every task (chosen on
#: standard FT alone). 11 coefficients (0, 0.1, ..., 1) instead of the paper's 21 keep the CPU budget.
SETTINGS = {
    "n_train": 1000,  # images per task (10% of them form <Task>Val: calibration and coefficient choice)
    "n_test": 400,
    "world_seed": 0,
    "epochs": 5,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup": 10,
    "calibration_batch_size": 32,
    "eval_batch_size": 500,
    "n_eval_points": 11,
}


@dataclass
class Step:
    label: str
    script: str  # path relative to the repository root, or "-m module"
    argv: list[str]
    mode: str | None = None
    seconds: float = 0.0
    error: str | None = None
    depends: list[str] = field(default_factory=list)

    def command(self) -> str:
        head = ["python", *self.script.split()] if self.script.startswith("-m ") else ["python", self.script]
        return " ".join(shlex.quote(a) for a in head + self.argv)


def common_args(out: Path, checkpoint: str, tasks: list[str], control: str, s: dict) -> list[str]:
    return ["--model", "talos-toy-clip", "--pretrained", checkpoint, "--data-location", str(out / "data"),
            "--save", str(out / "runs"), "--eval-datasets", ",".join(tasks), "--control-dataset", control,
            "--epochs", str(s["epochs"]), "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]),
            "--warmup-length", str(s["warmup"]), "--calibration-batch-size", str(s["calibration_batch_size"]),
            "--eval-batch-size", str(s["eval_batch_size"]), "--n-eval-points", str(s["n_eval_points"]),
            "--num-workers", "0", "--device", "cpu", "--results-json", str(out / "results.json")]


def plan(out: Path, checkpoint: str, tasks: list[str], control: str, modes: list[str], merges: list[str],
         s: dict) -> list[Step]:
    common = common_args(out, checkpoint, tasks, control, s)
    steps = [Step("world", "-m vision.demo.world",
                  ["--data-location", str(out / "data"), "--tasks", ",".join(tasks + [control]),
                   "--n-train", str(s["n_train"]), "--n-test", str(s["n_test"]), "--seed", str(s["world_seed"])])]
    for m in modes:
        for t in tasks:
            steps.append(Step(f"finetune {m} {t}", "vision/finetune.py",
                              common + ["--finetuning-mode", m, "--train-dataset", t], mode=m))
        for proto in ("single_task", "task_addition", "task_negation"):
            steps.append(Step(f"{proto} {m}", f"vision/eval_{proto}.py", common + ["--finetuning-mode", m], mode=m))
    for mg in merges:
        steps.append(Step(f"merge {mg}", "vision/eval_task_addition.py",
                          common + ["--finetuning-mode", "standard", "--merge", mg], mode="standard"))
        if mg != "sum":  # the sum merge is the standard row of the negation table
            steps.append(Step(f"negation merge {mg}", "vision/eval_task_negation.py",
                              common + ["--finetuning-mode", "standard", "--merge", mg], mode="standard"))
    steps.append(Step("report", "-m talos.report", [str(out / "results.json"), "--out", str(out / "results.md")]))
    steps.append(Step("figures", "-m vision.demo.figures",
                      common + ["--figures-dir", str(out), "--modes", ",".join(modes)]))
    return steps


def _in_process(step: Step) -> None:
    if step.script == "-m vision.demo.world":
        from vision.demo import world

        world.main(step.argv)
    elif step.script == "-m talos.report":
        import contextlib
        import io

        from talos import report

        with contextlib.redirect_stdout(io.StringIO()):  # the tables are printed once, at the end
            report.main(step.argv)
    elif step.script == "-m vision.demo.figures":
        from vision.demo import figures

        figures.main(step.argv)
    elif step.script == "vision/finetune.py":
        from vision import finetune

        res = finetune.main(step.argv)
        if isinstance(res, dict) and res.get("interrupted"):
            raise RuntimeError("fine-tuning was interrupted")
    else:
        from vision import evaluate

        protocol = {"vision/eval_single_task.py": "single_task", "vision/eval_task_addition.py": "addition",
                    "vision/eval_task_negation.py": "negation"}[step.script]
        evaluate.main(protocol, step.argv)


def _subprocess(step: Step) -> None:
    head = [sys.executable, *step.script.split()] if step.script.startswith("-m ") else [sys.executable, step.script]
    r = subprocess.run(head + step.argv, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"exit status {r.returncode}")


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
            c = len(TASKS[t].classnames) if t in TASKS else 0
            cells = [f"{100 * st[m][t]:.1f}" if t in st[m] else "-" for m in st if m != "zeroshot"]
            lines.append(f"| {t} | {c} ({100 / max(1, c):.0f}) | {100 * zs[t]:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    add, neg = results.get("addition", {}), results.get("negation", {})
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


def main(argv: Sequence[str] | None = None) -> int:
    from vision.demo import CHECKPOINT
    from vision.demo.world import CONTROL_TASK, TARGET_TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="out/demo", help="output folder")
    p.add_argument("--subprocess", action="store_true", help="run every step as its own python process")
    p.add_argument("--modes", default=None, help="comma-separated modes (default: all, in run_order())")
    p.add_argument("--merges", default=None, help="comma-separated merges (default: all registered)")
    p.add_argument("--tasks", default=",".join(TARGET_TASKS))
    p.add_argument("--checkpoint", default=os.path.relpath(CHECKPOINT, REPO))
    p.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="torch CPU threads (default: 2 where 2 cores are available; a fine-tune step is 1.75x "
                        "faster with 2 than with 1 on a 2-core Xeon, and the tiny model gains little beyond)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a demo setting (fast loops: --set epochs=1 --set n_eval_points=5); "
                        f"keys: {', '.join(SETTINGS)}")
    a = p.parse_args(argv)
    settings = dict(SETTINGS)
    for kv in a.set:
        key, _, value = kv.partition("=")
        if key not in SETTINGS:
            p.error(f"unknown setting {key!r}; valid: {', '.join(SETTINGS)}")
        settings[key] = type(SETTINGS[key])(value)
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # for --subprocess steps
        os.environ[var] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)  # rebuilt from the (cached) runs every time
    _setup_logging(out)

    from talos.merges import MERGES
    from talos.modes import run_order

    modes = a.modes.split(",") if a.modes else run_order()
    merges = a.merges.split(",") if a.merges else MERGES.names()
    steps = plan(out, a.checkpoint, a.tasks.split(","), CONTROL_TASK, modes, merges, settings)
    t0 = time.time()
    failed_modes: dict[str, str] = {}
    print(f"demo: {len(steps)} steps, modes {' '.join(modes)}; merges {' '.join(merges)}; log {out / 'demo.log'}",
          flush=True)
    for i, st in enumerate(steps, 1):
        print(f"[{i}/{len(steps)} {_fmt(time.time() - t0)}] {st.label}\n  + {st.command()}", flush=True)
        if st.mode in failed_modes and st.label.split()[0] != "finetune":
            st.error = f"skipped: {st.mode} failed earlier ({failed_modes[st.mode]})"
            print(f"  ! {st.error}", flush=True)
            continue
        ts = time.time()
        try:
            _subprocess(st) if a.subprocess else _in_process(st)
        except Exception as e:  # noqa: BLE001 - a failing step must not stop the demo
            st.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            logging.getLogger("talos").error("step %s failed:\n%s", st.label, traceback.format_exc())
            print(f"  ! FAILED: {st.error} (traceback in {out / 'demo.log'})", flush=True)
            if st.mode:
                failed_modes.setdefault(st.mode, st.error)
        st.seconds = time.time() - ts
    wall = time.time() - t0

    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    diag_path = out / "diagnostics.json"
    diag = json.loads(diag_path.read_text()) if diag_path.exists() else None
    extra = summary_tables(results, diag)
    per_mode: dict[str, float] = {}
    for st in steps:
        per_mode[st.mode or st.label.split()[0]] = per_mode.get(st.mode or st.label.split()[0], 0.0) + st.seconds
    timing = {"wall_seconds": round(wall, 1), "per_mode_seconds": {k: round(v, 1) for k, v in per_mode.items()},
              "steps": [{"label": s.label, "seconds": round(s.seconds, 2), "error": s.error} for s in steps],
              "settings": settings, "threads": a.threads, "subprocess": a.subprocess}
    (out / "timings.json").write_text(json.dumps(timing, indent=1) + "\n")
    md_path = out / "results.md"
    md = md_path.read_text() if md_path.exists() else ""
    failures = [s for s in steps if s.error]
    tail = [f"Demo wall time {_fmt(wall)} ({len(steps)} steps; per mode: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in per_mode.items()) + ")."]
    if failures:
        tail.append("Failed or skipped steps: " + "; ".join(f"{s.label}: {s.error}" for s in failures))
    md_path.write_text(md.rstrip() + "\n\n" + extra + "\n" + "\n".join(tail) + "\n")
    print("\n" + md_path.read_text())
    print(f"results: {out / 'results.json'}, {md_path}; figures: "
          + ", ".join(str(x) for x in sorted(out.glob("*.png"))))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
