"""Cost of every fine-tuning mode, vision and nlp, measured through the scripts' own code (the paper's cost table).

    python benchmarks/efficiency.py --preset cpu     # open_clip ViT-S-32 + a 4-layer T5, one CPU thread, ~10 min
    python benchmarks/efficiency.py --preset paper   # ViT-B/32, B/16, L/14 (batch 128), T5 small/base/large (CUDA)
    bash launch_scripts/efficiency.sh [cpu|paper]    # the same, plus the --grad-checkpointing trade

Models as the scripts build them, random weights (``vision.models.load_clip(name, "none")``,
``nlp.models.load_model(name, None, config=...)``); every mode through ``talos.modes`` (masks, prepare) and
``talos.train.train`` on one fixed batch (nlp batches from ``nlp.scoring.RankCollator``). Per mode: median seconds
per optimizer step, peak memory (CUDA ``max_memory_allocated``, on CPU the peak RSS) and what training adds to the
memory in use before ``mode.prepare``, trainable entries, frozen eligible tensors, optimizer state
(``masked_state_bytes``); each in its own ``python -m benchmarks.efficiency --one JOB`` process, so peaks do not
mix. Calibration (``calibrate_masks`` through the talos mode) per example and round, beside a plain forward+backward
and the anchor (``fisher_scores_reference``). With one CPU thread, times are that thread's CPU time (other
processes on shared cores do not inflate them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python benchmarks/efficiency.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from talos.fisher import fisher_scores_reference  # noqa: E402
from talos.io import atomic_write_json, load_tensors, save_tensors  # noqa: E402
from talos.modes import MODES, ModeContext, get_mode, run_order  # noqa: E402
from talos.optim import masked_state_bytes  # noqa: E402
from talos.train import TrainConfig, build_optimizer, train  # noqa: E402

from benchmarks.efficiency_report import check_targets, markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


@dataclass(frozen=True)
class Backbone:
    """One model: an open_clip name (vision) or a T5 ``config`` (nlp), and its batches."""

    domain: str
    name: str
    batch: int  # examples per optimizer step
    calib_batch: int  # official: 64 / 16 / 2 for ViT-B/32 / B/16 / L/14, 32 for T5
    calib_batches: int
    config: dict | None = None  # nlp: T5Config values (None: the project's tiny config `name`)
    prompt_len: int = 0  # nlp: prompt tokens per example
    answer_len: int = 0  # nlp: tokens per answer choice


@dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    threads: int = 1  # torch threads per process (0: torch's default)
    warmup: int = 2
    steps: int = 5
    precision: str = "fp32"
    grad_checkpointing: bool = False
    seed: int = 0


def _t5(d_model: int, d_ff: int, layers: int, heads: int, vocab: int = 32128) -> dict:
    return dict(d_model=d_model, d_ff=d_ff, d_kv=64, num_layers=layers, num_heads=heads, vocab_size=vocab,
                feed_forward_proj="relu", tie_word_embeddings=True)


PRESETS: dict[str, tuple[list[Backbone], Settings]] = {
    "test": ([Backbone("vision", "talos-tiny-vit", 4, 4, 1),
              Backbone("nlp", "talos-tiny-t5", 4, 4, 1, prompt_len=8, answer_len=3)],
             Settings(warmup=1, steps=2)),
    # one thread: on a small shared machine two OpenMP threads stall on each other whenever a core is busy
    "cpu": ([Backbone("vision", "ViT-S-32", 8, 32, 3),
             Backbone("nlp", "T5-d512-L4", 8, 32, 3, _t5(512, 2048, 4, 8, vocab=8192), prompt_len=64, answer_len=8)],
            Settings()),
    # nlp: one micro-batch of 64 (x16 accumulation in the paper)
    "paper": ([Backbone("vision", "ViT-B-32", 128, 64, 4), Backbone("vision", "ViT-B-16", 128, 16, 4),
               Backbone("vision", "ViT-L-14", 128, 2, 8),
               Backbone("nlp", "t5-small", 64, 32, 2, _t5(512, 2048, 6, 8), prompt_len=128, answer_len=16),
               Backbone("nlp", "t5-base", 64, 32, 2, _t5(768, 3072, 12, 12), prompt_len=128, answer_len=16),
               Backbone("nlp", "t5-large", 64, 32, 2, _t5(1024, 4096, 24, 16), prompt_len=128, answer_len=16)],
              Settings(device="cuda", threads=0, warmup=3, steps=10, precision="bf16")),
}
LR = {"vision": (1e-5, 0.1), "nlp": (1e-4, 0.0)}  # the scripts' default lr and weight decay



@dataclass
class Built:
    """A fresh model with the parts a ModeContext and the training loop take."""

    model: Any
    eligible: list
    dense: list
    forward_fn: Callable
    loss_fn: Callable
    lora_targets: Callable
    train_batch: Any
    calib_batches: list


class _RandomTokens:
    """A tokenizer for ``RankCollator``: a prompt is ``lens[0]`` random ids, an answer ``lens[1]`` (cost depends on
    the lengths only)."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, vocab: int, lens: tuple[int, int], seed: int) -> None:
        self.vocab, self.lens, self.g = vocab, lens, torch.Generator().manual_seed(seed)

    def __call__(self, texts: list | None = None, *, text_target: list | None = None, **_: Any) -> dict:
        n, items = (self.lens[0], texts) if texts is not None else (self.lens[1], text_target)
        return {"input_ids": torch.randint(2, self.vocab, (len(items), n), generator=self.g).tolist()}


def build(bb: Backbone, s: Settings) -> Built:
    """The model as the domain's scripts build it (random weights), and random batches on the device."""
    torch.manual_seed(s.seed)  # the same θ0 in every process: masks computed in one apply to the others
    dev = torch.device(s.device)
    if bb.domain == "vision":
        from vision.common import logits_forward
        from vision.models import ImageClassifier, lora_targets, load_clip, split_parameters

        clip = load_clip(bb.name, "none")[0]
        if s.grad_checkpointing:  # as vision/common.py: open_clip's non-reentrant per-block checkpointing
            clip.visual.set_grad_checkpointing(True)
        size = clip.visual.image_size[0]
        head = F.normalize(torch.randn(10, clip.visual.output_dim), dim=-1) * 100.0  # like a zero-shot head
        model = ImageClassifier(clip.visual, head).to(dev)
        eligible, dense = split_parameters(model, freeze_embeddings=False)
        g = torch.Generator().manual_seed(s.seed + 1)
        batch = lambda n: (torch.randn(n, 3, size, size, generator=g).to(dev),  # noqa: E731
                           torch.randint(0, 10, (n,), generator=g).to(dev))
        return Built(model, eligible, dense, logits_forward, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                     lora_targets, batch(bb.batch), [batch(bb.calib_batch) for _ in range(bb.calib_batches)])
    from transformers import AutoConfig

    from nlp.models import decoder_start_id, eligible_parameters, load_config, load_model, lora_targets
    from nlp.scoring import Example, RankCollator, answer_loss, choice_log_likelihoods

    config = AutoConfig.for_model("t5", **bb.config) if bb.config else load_config(bb.name)
    model, kind = load_model(bb.name, None, config=config)
    if s.grad_checkpointing:  # non-reentrant, so Fisher scoring keeps its fast path (T5 checkpoints in train mode)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(dev)
    tok = _RandomTokens(model.config.vocab_size, (bb.prompt_len, bb.answer_len), s.seed + 1)
    start = decoder_start_id(model, tok)
    examples = lambda n: [Example("", ("a", "b"), 0)] * n  # noqa: E731
    on_dev = lambda b: {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    train = RankCollator(tok, kind, bb.prompt_len, start, only_label=True)(examples(bb.batch))
    calib = [on_dev(RankCollator(tok, kind, bb.prompt_len, start)(examples(bb.calib_batch)))
             for _ in range(bb.calib_batches)]
    return Built(model, eligible_parameters(model), [], choice_log_likelihoods, answer_loss, lora_targets,
                 on_dev(train), calib)


def mode_context(b: Built, s: Settings, *, load_task_vector: Callable | None = None,
                 on_round: Callable | None = None) -> ModeContext:
    """The one place a ``ModeContext`` is built: the model parts, every method setting at the scripts' default."""
    return ModeContext(model=b.model, eligible=list(b.eligible), dense=list(b.dense), forward_fn=b.forward_fn,
                       calibration_batches=lambda: b.calib_batches, lora_targets=b.lora_targets, seed=s.seed,
                       progress=False, load_task_vector=load_task_vector, on_round=on_round)


def _mem_mb(peak: bool, s: Settings) -> float:
    """Peak or current memory: CUDA allocations, or this process's resident set (VmHWM / VmRSS)."""
    if s.device.startswith("cuda"):
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / MB
    key = "VmHWM:" if peak else "VmRSS:"
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) / 1024


def _now(s: Settings) -> float:
    """Seconds after the queued CUDA work; with one torch thread on CPU that thread's CPU time, which other
    processes on shared cores do not inflate."""
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.thread_time() if s.device == "cpu" and s.threads == 1 else time.perf_counter()


def train_steps(b: Built, state: Any, s: Settings, steps: int, lr: float, wd: float) -> list[float]:
    """``talos.train.train`` for ``steps`` optimizer steps on ``b.train_batch``; the seconds of each step."""
    n = len(b.train_batch[1]) if isinstance(b.train_batch, tuple) else len(b.train_batch["labels"])
    stamps = [_now(s)]

    cfg = TrainConfig(steps=steps, batch_size=n, lr=lr, weight_decay=wd, warmup=0, schedule="constant",
                      precision=s.precision, seed=s.seed, checkpoint_every=10**9, log_every=10**9)
    train(state.model, list(range(n * steps)), b.loss_fn, state.named_params, state.masks, cfg, dense=state.dense,
          device=s.device, collate_fn=lambda _: b.train_batch, progress=False, on_step=lambda _: stamps.append(_now(s)))
    return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]


def measure_mode(bb: Backbone, s: Settings, mode_name: str, workdir: Path) -> dict:
    """One mode's training cost on a fresh model (its masks read from ``workdir``, written by ``calibrate``)."""
    b, mode = build(bb, s), get_mode(mode_name)
    masks = load_tensors(workdir / f"{mode_name}.safetensors") if mode.sparse else None
    named = dict(b.model.named_parameters())
    eligible = [named[n] for n in b.eligible]  # by identity: LoRA's parametrizations rename them
    if s.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: the peak RSS restarts from the current one (building the model is not training)
        Path("/proc/self/clear_refs").write_text("5")
    base = _mem_mb(False, s)
    state = mode.prepare(mode_context(b, s), masks)
    times = train_steps(b, state, s, s.warmup + s.steps, *LR[bb.domain])[s.warmup:]
    peak = _mem_mb(True, s)
    opt = build_optimizer(state.named_params, state.masks, state.dense, *LR[bb.domain])  # what train() steps with
    for _, p in state.named_params:
        p.grad = torch.zeros_like(p)
    opt.step()  # allocates the state as a training step does
    m = state.masks
    return {"step_s": statistics.median(times), "step_times_s": times, "peak_mem_mb": peak, "base_mem_mb": base,
            "train_mem_mb": peak - base, "eligible_tensors": len(eligible),
            "trainable": sum(int(m[n].sum()) if m is not None and n in m else p.numel() for n, p in state.named_params),
            "frozen_tensors": sum(not p.requires_grad for p in eligible),
            "optimizer_state_mb": masked_state_bytes(opt) / MB}


def calibrate(bb: Backbone, s: Settings, workdir: Path | None, other_masks: list[str]) -> dict:
    """TaLoS calibration timed per example, beside a plain forward+backward and the anchor; then the masks of
    ``other_masks`` (LoTA's from a few real ``standard`` steps), all saved to ``workdir``."""
    b = build(bb, s)
    leaves = [p for n, p in b.model.named_parameters() if n in set(b.eligible)]

    def plain() -> float:  # eval mode, gradients of the eligible tensors, as scoring takes them
        b.model.eval()
        t = _now(s)
        for batch in b.calib_batches:
            torch.autograd.grad(b.forward_fn(b.model, batch).float().logsumexp(-1).sum(), leaves, allow_unused=True)
        return _now(s) - t

    n = bb.calib_batch * bb.calib_batches
    plain()  # warm-up
    plains, rounds = [plain()], []
    t = _now(s)
    masks = get_mode("talos").masks(mode_context(b, s, on_round=lambda r, d, m: rounds.append(r)))
    total = _now(s) - t
    peak = _mem_mb(True, s)
    plains += [plain(), plain()]
    t = _now(s)
    fisher_scores_reference(b.model, b.calib_batches[:1], b.forward_fn, params=b.eligible,
                            generator=torch.Generator().manual_seed(s.seed))
    anchor = (_now(s) - t) / bb.calib_batch
    if workdir is not None:
        save_tensors(workdir / "talos.safetensors", masks)
        for name in other_masks:
            ctx = mode_context(build(bb, s), s, load_task_vector=lambda src: _task_vector(bb, s, src))
            save_tensors(workdir / f"{name}.safetensors", get_mode(name).masks(ctx))
    return {"per_example_s": total / (len(rounds) * n), "plain_per_example_s": statistics.median(plains) / n,
            "anchor_per_example_s": anchor, "total_s": total, "rounds": len(rounds), "examples": n,
            "peak_mem_mb": peak}


def _task_vector(bb: Backbone, s: Settings, mode_name: str) -> Any:
    """A real task vector of ``mode_name`` (a dense mode): a few of its training steps from θ0."""
    b, mode = build(bb, s), get_mode(mode_name)
    state = mode.prepare(mode_context(b, s), None)
    lr, wd = LR[bb.domain]
    train_steps(b, state, s, 3, lr * 10, wd)
    return state.task_vector()


def run_job(job: dict) -> dict:
    """One measurement in this process: ``{"kind": "train" | "calibrate", "backbone", "settings", ...}``."""
    bb, s = Backbone(**job["backbone"]), Settings(**job["settings"])
    if s.threads:
        torch.set_num_threads(s.threads)
    if job["kind"] == "train":
        return measure_mode(bb, s, job["mode"], Path(job["workdir"]))
    return calibrate(bb, s, Path(job["workdir"]) if job.get("workdir") else None, job.get("masks", []))


def run_fresh_process(module: str, job: dict, threads: int, what: str) -> dict:
    """``python -m <module> --one JOB --out FILE`` in a fresh process (its own peak memory, allocator state and
    caches), ``threads`` OpenMP/MKL threads (0: their default); returns the JSON it wrote."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--one", json.dumps(job), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode or not out.exists():
            raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_isolated(job: dict) -> dict:
    """``run_job`` in a fresh ``python -m benchmarks.efficiency --one`` process (its own peak memory)."""
    print(f"[{job['backbone']['domain']}] {job['backbone']['name']}: {job['kind']} {job.get('mode', '')}", flush=True)
    return run_fresh_process("benchmarks.efficiency", job, job["settings"]["threads"],
                             f"{job['kind']} {job.get('mode', '')}")


def run_pair(preset: str, pair: list[Backbone], s: Settings, modes: list[str], run: Callable[[dict], dict]) -> dict:
    """One vision and/or nlp backbone: every mode's row, the calibration, the targets; ``run`` runs one job."""
    t0, res = time.time(), {"preset": preset, "device": s.device, "settings": asdict(s), "calibration": {},
                            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "backbones": {}}
    for bb in pair:
        res["backbones"][bb.domain], rows = bb.name, {}
        for m in modes:
            if get_mode(m).source_mode is not None:  # posthoc: evaluates standard's task vectors, trains nothing
                rows[m] = {"trained_by": get_mode(m).source_mode}
            elif s.grad_checkpointing and get_mode(m).eval_linearized:  # refused by the scripts (vision/args.py)
                rows[m] = {"unsupported": "torch.func.jvp cannot run through activation checkpointing"}
        with tempfile.TemporaryDirectory(prefix="talos_efficiency_") as work:
            job = {"backbone": asdict(bb), "settings": asdict(s), "workdir": work}
            sparse = [m for m in modes if m not in rows and get_mode(m).sparse and m != "talos"]
            res["calibration"][bb.domain] = run({**job, "kind": "calibrate", "masks": sparse})
            rows.update({m: run({**job, "kind": "train", "mode": m}) for m in modes if m not in rows})
        res[bb.domain] = {m: rows[m] for m in modes}
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    env = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "git_commit": git.stdout.strip(),
           **{p: version(p) for p in ("torch", "open_clip_torch", "transformers")}}
    return {**res, "wall_s": time.time() - t0, "env": env, "targets": check_targets(res)}


def calibration_only(preset: str, backbones: list[Backbone], s: Settings, n: int, run: Callable[[dict], dict]) -> dict:
    """Only the TaLoS calibration, ``n`` processes per backbone: per-run ratios to a plain fwd+bwd, their median."""
    res: dict[str, Any] = {"preset": preset, "device": s.device, "runs": n, "settings": asdict(s), "calibration": {}}
    for bb in backbones:
        rows = [run({"kind": "calibrate", "backbone": asdict(bb), "settings": asdict(s)}) for _ in range(n)]
        ratios = [r["per_example_s"] / r["plain_per_example_s"] for r in rows]
        res["calibration"][f"{bb.domain}:{bb.name}"] = {"median_ratio": statistics.median(ratios), "ratios": ratios,
                                                        "runs": rows}
        print(f"[{bb.domain}] {bb.name}: calibration / plain fwd+bwd per example "
              f"{', '.join(f'{x:.3f}' for x in ratios)} -> median {statistics.median(ratios):.3f}x")
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags of launch_scripts/efficiency.sh and the README."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--out", help="JSON path (default benchmarks/results/efficiency_<preset>[_gc].json; tables in .md); "
                   "with several backbone pairs (paper) one file per pair, suffixed with their names")
    p.add_argument("--domains", default="vision,nlp", help="comma-separated subset of vision,nlp")
    p.add_argument("--modes", help="comma-separated modes (default: every mode finetune.py trains)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing (blocks / T5 layers)")
    for flag in ("device", "threads", "steps", "warmup"):
        p.add_argument(f"--{flag}", type=str if flag == "device" else int, help=f"override the preset's {flag}")
    p.add_argument("--baseline", help="a result JSON of the same preset: adds a table of time and memory ratios to it")
    p.add_argument("--calibration-only", type=int, default=0, metavar="N", help="only time the TaLoS calibration, "
                   "N processes per backbone; writes --out (default benchmarks/results/calibration_<preset>.json)")
    p.add_argument("--in-process", action="store_true", help="no process per measurement (tests; peaks then mix)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # one job (JSON), its result written to --out
    args = p.parse_args(argv)
    args.domains, args.modes = args.domains.split(","), args.modes.split(",") if args.modes else run_order()
    if not set(args.domains) <= {"vision", "nlp"}:
        p.error(f"--domains must be a subset of vision,nlp, got {args.domains}")
    if bad := [m for m in args.modes if m not in MODES.names()]:
        p.error(f"unknown modes {bad}; valid: {', '.join(MODES.names())}")
    args.modes = sorted(args.modes, key=lambda m: m != "standard")  # the reference of every ratio first
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every backbone pair of the preset, write ``--out`` (JSON) and its ``.md``; returns the results."""
    args = parse_args(argv)
    if args.one:
        atomic_write_json(args.out, run_job(json.loads(args.one)))
        return []
    backbones, s = PRESETS[args.preset]
    s = replace(s, grad_checkpointing=args.grad_checkpointing,
                **{k: v for k in ("device", "threads", "steps", "warmup") if (v := getattr(args, k)) is not None})
    s = s if s.device.startswith("cuda") else replace(s, precision="fp32")
    run = run_job if args.in_process else run_isolated
    results = ROOT / "benchmarks" / "results"
    if args.calibration_only:
        res = calibration_only(args.preset, [bb for bb in backbones if bb.domain in args.domains], s,
                               args.calibration_only, run)
        atomic_write_json(args.out or results / f"calibration_{args.preset}.json", res)
        return [res]
    per = [[bb for bb in backbones if bb.domain == d] for d in args.domains]
    pairs = [[col[i] for col in per if i < len(col)] for i in range(max(map(len, per)))]
    suffixes = ["_" + "_".join(bb.name for bb in pair) if len(pairs) > 1 else "" for pair in pairs]
    stem = Path(args.out or results / f"efficiency_{args.preset}{'_gc' * s.grad_checkpointing}.json")
    bases = [Path(args.baseline).with_stem(Path(args.baseline).stem + x) if args.baseline else None for x in suffixes]
    if missing := [str(b) for b in bases if b is not None and not b.exists()]:
        raise SystemExit(f"--baseline: no such file {missing}")  # before any measurement
    out = []
    for pair, suffix, base in zip(pairs, suffixes, bases):
        res = run_pair(args.preset, pair, s, args.modes, run)
        md = markdown(res, json.loads(base.read_text()) if base else None, base.name if base else "")
        path = stem.with_stem(stem.stem + suffix)
        atomic_write_json(path, res)
        path.with_suffix(".md").write_text(md)
        print(f"\n{md}\nwrote {path} and {path.with_suffix('.md')}")
        out.append(res)
    return out


if __name__ == "__main__":
    main()
