"""Real-size dry run on CPU: the paper's models from their configs (random init, no downloads), every mode.

    bash launch_scripts/paper_dryrun.sh out/dryrun          # = python -m benchmarks.paper_dryrun --out out/dryrun

Models: ViT-B-32, ViT-B-16 and ViT-L-14 (open_clip configs, 224 px, ``--pretrained none``) and t5-small / t5-base
(the released T5Config sizes, random init, written once as a local model folder; no hub access). For each model
and each mode of ``talos.modes.run_order()`` a child process runs the real scripts: ``vision/finetune.py`` (or
``nlp/finetune.py``) ``main()`` with one calibration batch per round (``--calibration-batches 1``) and two
optimizer steps at batch 2, then ``eval_single_task.py`` ``main()`` (one batch of 2 per split). The only change
to the scripts' path: vision has no step flag, so its ``TrainConfig`` is cut to ``steps=2`` (nlp uses
``--num-steps 2``). Data are tiny generated datasets in the real on-disk layouts: ``EuroSAT_splits/{train,test}/
<class>/*.jpg`` and ``qasc/{train,validation}.jsonl`` (QASC rows), prompted by a word-level tokenizer trained on
them (T5's sentencepiece model would need a download; the model keeps T5's 32,128-entry vocabulary).

Printed per model: eligible entries (the parameters TaLoS scores), densely trained extra entries, the entries
kept trainable at sparsity 0.9 (the ``talos`` mask), and per mode the trainable tensors and entries, the peak
resident memory of the child process and the seconds of calibration, fine-tuning and evaluation (model loading
included). ``--in-process`` runs the jobs in this process (tests: fast, but peak memory is then cumulative).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence
from unittest import mock

if __package__ in (None, ""):  # `python benchmarks/paper_dryrun.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

PAPER_MODELS = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "t5-small", "t5-base"]
#: The released google-t5 configs' sizes (the rest are T5Config's defaults, which are t5-small's).
T5_SIZES = {
    "t5-small": {"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8},
    "t5-base": {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12},
}
T5_VOCAB = 32128
BATCH = 2  # training, calibration and evaluation batch
STEPS = 2  # optimizer steps
VISION_TASK, NLP_TASK = "EuroSAT", "qasc"


def domain(model: str) -> str:
    """``"nlp"`` for T5 sizes and the project's tiny NLP configs, ``"vision"`` for open_clip names."""
    from nlp.models import is_tiny

    return "nlp" if model in T5_SIZES or is_tiny(model) else "vision"


# ----------------------------------------------------------------------------------------------------------
# Data and models in their real on-disk forms
# ----------------------------------------------------------------------------------------------------------
def make_vision_data(root: Path, per_class: int = 2, n_test: int = BATCH) -> Path:
    """EuroSAT's layout (``EuroSAT_splits/{train,test}/<class>/*.jpg``): 10 classes × ``per_class`` train images
    (EuroSATVal = 10% of them = one batch of 2) and ``n_test`` test images; returns ``--data-location``."""
    import numpy as np
    from PIL import Image

    from vision.datasets import EUROSAT_CLASSNAMES

    rng = np.random.default_rng(0)
    classes = sorted(EUROSAT_CLASSNAMES)
    test_counts = [1] * n_test + [0] * (len(classes) - n_test)
    for split, counts in (("train", [per_class] * len(classes)), ("test", test_counts)):
        for cls, n in zip(classes, counts):
            d = root / "EuroSAT_splits" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{cls}_{i}.jpg")
    return root


def make_nlp_data(root: Path, n_train: int = 2 * BATCH, n_validation: int = 2 * BATCH) -> tuple[Path, Path]:
    """QASC rows as local copies (``qasc/{train,validation}.jsonl``; validation halves into val and test, one batch
    each) and a word-level tokenizer trained on their prompts; returns (``--data-location``, ``--tokenizer``)."""
    from nlp.datasets import clear_cache, get_examples
    from nlp.synthetic import SYNTHETIC_TASKS, build_tokenizer

    rng = random.Random(0)
    (root / NLP_TASK).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_validation)):
        rows = [SYNTHETIC_TASKS["synth_qa"](rng, i) for i in range(n)]  # QASC's row format
        (root / NLP_TASK / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    clear_cache()
    texts = [t for s in ("train", "val", "test") for e in get_examples(NLP_TASK, s, data_location=str(root))
             for t in (e.prompt, *e.choices)]
    build_tokenizer(texts, root / "tokenizer")
    return root, root / "tokenizer"


def make_t5_folder(name: str, out: Path, tokenizer_dir: Path) -> Path:
    """A local model folder holding a random-init T5 of ``name``'s released size (seed 0)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from nlp.models import load_tokenizer

    if (out / "config.json").exists():
        return out
    tok = load_tokenizer(str(tokenizer_dir))
    if len(tok) > T5_VOCAB:
        raise ValueError(f"tokenizer has {len(tok)} entries, more than T5's {T5_VOCAB}")
    config = T5Config(vocab_size=T5_VOCAB, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id, **T5_SIZES[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5ForConditionalGeneration(config).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# One job: fine-tune + single-task evaluation of one (model, mode) through the real scripts
# ----------------------------------------------------------------------------------------------------------
def script_args(model: str, mode: str, work: Path) -> list[str]:
    """The flags both scripts of ``model``'s domain get (fine-tuning adds ``--train-dataset``)."""
    common = ["--finetuning-mode", mode, "--save", str(work / "runs"), "--device", "cpu", "--precision", "fp32",
              "--no-progress", "--batch-size", str(BATCH), "--calibration-batch-size", str(BATCH),
              "--calibration-batches", "1", "--eval-batch-size", str(BATCH), "--num-workers", "0"]
    if domain(model) == "vision":
        return common + ["--model", model, "--pretrained", "none", "--data-location", str(work / "vision_data"),
                         "--eval-datasets", VISION_TASK, "--epochs", "1"]
    folder = model if model not in T5_SIZES else str(work / "models" / model)
    return common + ["--model", folder, "--tokenizer", str(work / "nlp_data" / "tokenizer"),
                     "--data-location", str(work / "nlp_data"), "--eval-datasets", NLP_TASK,
                     "--num-grad-accumulation", "1", "--num-steps", str(STEPS)]


@contextlib.contextmanager
def _measured(mode_name: str, record: dict[str, Any]) -> Iterator[None]:
    """Record what the mode sees (eligible / dense entries, mask, trainable tensors) and the calibration time,
    by wrapping the registered mode's ``masks`` and ``prepare`` for the duration."""
    from talos.modes import get_mode

    mode = get_mode(mode_name)
    masks_fn, prepare_fn = mode.masks, mode.prepare

    def masks(ctx):
        t0 = time.perf_counter()
        out = masks_fn(ctx)
        record["calibration_s"] = time.perf_counter() - t0
        return out

    def prepare(ctx, m):
        named = dict(ctx.model.named_parameters())
        record["eligible_entries"] = sum(named[n].numel() for n in ctx.eligible)
        record["dense_entries"] = sum(named[n].numel() for n in ctx.dense)
        if m is not None:
            record["kept_entries"] = int(sum(int(v.sum()) for v in m.values()))
        state = prepare_fn(ctx, m)
        record["trainable_tensors"] = len(state.named_params)
        return state

    mode.masks, mode.prepare = masks, prepare  # instance attributes shadow the methods
    try:
        yield
    finally:
        del mode.masks, mode.prepare


def _cut_to_steps(cfg_cls: Any) -> Any:
    """``TrainConfig`` with ``STEPS`` optimizer steps instead of epochs (vision scripts have no step flag)."""
    return lambda **kw: cfg_cls(**{**kw, "epochs": None, "steps": STEPS})


def run_job(model: str, mode: str, work: Path) -> dict[str, Any]:
    """Fine-tune then evaluate ``mode`` on ``model`` through the domain's scripts; returns the measurements."""
    import torch

    if domain(model) == "vision":
        import vision.finetune as ft
        from vision import eval_single_task as ev
        task, patch = VISION_TASK, mock.patch.object(ft, "TrainConfig", _cut_to_steps(ft.TrainConfig))
    else:
        import nlp.finetune as ft
        from nlp import eval_single_task as ev
        task, patch = NLP_TASK, contextlib.nullcontext()
    args = script_args(model, mode, work)
    record: dict[str, Any] = {"model": model, "mode": mode, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    with _measured(mode, record), patch:
        metrics = ft.main(args + ["--train-dataset", task])
    t1 = time.perf_counter()
    result = ev.main(args)
    t2 = time.perf_counter()
    record.update(finetune_s=t1 - t0, eval_s=t2 - t1, steps=metrics.get("steps"),
                  trainable_entries=metrics.get("trainable_entries"),
                  test_accuracy=result["test"]["finetuned"][task],
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB on Linux
    return record


# ----------------------------------------------------------------------------------------------------------
# Sweep and table
# ----------------------------------------------------------------------------------------------------------
def prepare(models: Sequence[str], work: Path) -> None:
    """Write the data (and the T5 model folders) the jobs read."""
    if any(domain(m) == "vision" for m in models) and not (work / "vision_data").exists():
        make_vision_data(work / "vision_data")
    if any(domain(m) == "nlp" for m in models):
        if not (work / "nlp_data" / "tokenizer").exists():
            make_nlp_data(work / "nlp_data")
        for m in models:
            if m in T5_SIZES:
                make_t5_folder(m, work / "models" / m, work / "nlp_data" / "tokenizer")


def _child(model: str, mode: str, work: Path, timeout: float) -> dict[str, Any]:
    out = work / "records" / f"{model}-{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.paper_dryrun", "--job", model, mode, "--work", str(work),
           "--record", str(out)]
    repo = Path(__file__).resolve().parents[1]
    try:
        p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, "mode": mode, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": model, "mode": mode, "error": f"exit {p.returncode}: {tail}"}
    return json.loads(out.read_text())


def _fmt(v: Any, spec: str = ",") -> str:
    return "–" if v is None else format(v, spec)


def table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: one summary row per model, then one row per (model, mode)."""
    lines = ["| model | eligible entries | dense entries | kept at 0.9 (`talos`) | s, modes run |",
             "|---|---:|---:|---:|---:|"]
    models = list(dict.fromkeys(r["model"] for r in records))
    for m in models:
        rs = [r for r in records if r["model"] == m]
        elig = next((r["eligible_entries"] for r in rs if "eligible_entries" in r), None)
        dense = next((r["dense_entries"] for r in rs if "dense_entries" in r), None)
        kept = next((r.get("kept_entries") for r in rs if r["mode"] == "talos"), None)
        total = sum(r.get("finetune_s", 0) + r.get("eval_s", 0) for r in rs)
        lines.append(f"| {m} | {_fmt(elig)} | {_fmt(dense)} | {_fmt(kept)} | {total:.0f} |")
    lines += ["", "| model | mode | trainable tensors | trainable entries | peak RSS GiB | calibration s | "
                  "fine-tune s | eval s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | FAILED: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['mode']} | {_fmt(r.get('trainable_tensors'))} | "
                     f"{_fmt(r.get('trainable_entries'))} | {r['peak_rss_gib']:.1f} | "
                     f"{_fmt(r.get('calibration_s'), '.1f')} | {r['finetune_s']:.1f} | {r['eval_s']:.1f} |")
    return "\n".join(lines)


def _previous(out: Path) -> list[dict[str, Any]]:
    path = out / "dryrun.json"
    return json.loads(path.read_text()) if path.exists() else []


def _default_modes() -> list[str]:
    """Every registered mode, ``talos`` and ``standard`` first (they give the per-model counts), dependencies kept."""
    from talos.modes import run_order

    order = run_order()
    return [m for m in ("talos", "standard") if m in order] + [m for m in order if m not in ("talos", "standard")]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep (or one ``--job``); prints and writes ``OUT/dryrun.{json,md}``; returns the records."""
    from talos.modes import run_order

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(PAPER_MODELS), help="comma-separated")
    p.add_argument("--modes", default=",".join(_default_modes()),
                   help="comma-separated, in dependency order (run mode by mode, each over all models)")
    p.add_argument("--out", default="out/paper_dryrun", help="where dryrun.json and dryrun.md go")
    p.add_argument("--work", default=None, help="data, models and runs (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per (model, mode) job")
    p.add_argument("--in-process", action="store_true", help="run jobs here (no per-job peak memory)")
    p.add_argument("--resume", action="store_true",
                   help="keep the records of OUT/dryrun.json and skip their (model, mode) jobs (same --work)")
    p.add_argument("--job", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.job:  # child process: one job, its record as JSON
        rec = run_job(a.job[0], a.job[1], Path(a.work))
        Path(a.record).write_text(json.dumps(rec))
        return [rec]
    models, modes = [m for m in a.models.split(",") if m], [m for m in a.modes.split(",") if m]
    unknown = [m for m in modes if m not in run_order()]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; valid: {', '.join(run_order())}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(a.work) if a.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dryrun_")))
        prepare(models, work)
        records = [r for r in _previous(out) if "error" not in r] if a.resume else []
        done = {(r["model"], r["mode"]) for r in records}
        for mode in modes:  # mode-major: every model gets the first modes before any gets the last ones
            for m in models:
                if (m, mode) in done:
                    continue
                rec = run_job(m, mode, work) if a.in_process else _child(m, mode, work, a.timeout)
                records.append(rec)
                print(json.dumps(rec), flush=True)
                (out / "dryrun.json").write_text(json.dumps(records, indent=1))  # partial results survive
    order = PAPER_MODELS + models + [r["model"] for r in records]
    records.sort(key=lambda r: (order.index(r["model"]), _default_modes().index(r["mode"])))
    (out / "dryrun.json").write_text(json.dumps(records, indent=1))
    md = table(records)
    (out / "dryrun.md").write_text(md + "\n")
    print(md)
    if any("error" in r for r in records):
        raise SystemExit(1)
    return records


if __name__ == "__main__":
    main()
