"""Efficiency of every fine-tuning mode, in both domains, measured the same way (the paper's cost table).

Run:
    python benchmarks/efficiency.py --preset cpu      # small open_clip ViT + tiny T5, 2 CPU threads, < 10 min
    python benchmarks/efficiency.py --preset paper    # ViT-B/32, B/16, L/14 at batch 128, T5 small/base/large (CUDA)
    bash launch_scripts/efficiency.sh [cpu|paper]     # the same, plus the --grad-checkpointing trade
Writes ``--out`` (JSON) and the same path with ``.md`` (markdown tables and the target checks).

For each registered fine-tuning mode and backbone, one training iteration is what ``talos.train`` does per
optimizer step: forward of ``state.model`` from ``mode.prepare``, loss, backward, gradient clipping (1.0) over
the trainable tensors, ``build_optimizer(...)``'s step, ``zero_grad``. Reported per mode:

* ``step_s``: median seconds per iteration after warm-up (pooled over ``--repeats`` round-robin passes over
  the modes, so background load on shared cores hits every mode alike);
* ``peak_mem_mb``: CUDA ``max_memory_allocated`` during training, or on CPU the process peak RSS (VmHWM).
  Every job (each mode, the calibration, the masks) runs in its own process so peaks do not mix: by default
  forked from the orchestrator after it has imported torch/open_clip/transformers once (it never runs a torch
  op), so each child starts with the same resident libraries a fresh interpreter would have, and Linux resets
  VmHWM at the fork (``ru_maxrss`` would instead inherit the parent's peak); ``--isolation spawn`` starts a
  fresh interpreter per job instead. ``base_mem_mb`` is the RSS before ``mode.prepare`` (imports, model,
  data) and ``train_mem_mb = peak - base`` what training itself adds;
* ``trainable`` entries, ``frozen_tensors`` (eligible tensors that get no gradient at all), ``eligible_tensors``,
  ``optimizer_state_mb`` (``talos.optim.masked_state_bytes``: moments, steps, index/mask buffers).

Masks come from the real API on the benchmarked model, computed in separate subprocesses before training:
TaLoS from a real calibration (``MODES["talos"].masks``, also timed as the calibration cost), LoTA from the
task vector of a few real dense ``standard`` steps (``--lota-steps``; only the mask's shape matters for cost),
the ablations from their own ``masks``. ``posthoc`` trains nothing (it evaluates ``standard``'s task vectors
through the linearized model): its row is n/a and names the mode whose cost it reuses.

Calibration (per example; on CPU with one thread timed in CPU time of that thread, so other processes on
shared cores do not inflate it): TaLoS's whole calibration (``rounds`` Fisher passes with soft masks and global
thresholds) / (rounds x examples), after a warm-up forward+backward and Fisher pass, next to one plain
forward+backward (eval mode, gradients of the eligible tensors; timed between the calibration rounds and after
them, so both see the same machine load) and the anchor algorithm of the official code (one batched forward,
then one backward per example with ``retain_graph``). The anchor's backwards all cost the same (each walks the
whole batch graph), so by default only the first ``--anchor-examples`` of them are timed and the per-example
cost is ``forward / B + mean backward``; ``--anchor-examples 0`` runs all of them.

Activation checkpointing (``--grad-checkpointing``): open_clip's non-reentrant per-block checkpointing and
transformers' ``activation_checkpointing_enable(use_reentrant=False)`` (non-reentrant, so Fisher scoring keeps its
exact fast path; transformers checkpoints only in training mode). ``--baseline`` adds the time/memory ratios
against a run without it. The linearized modes cannot train under it (``torch.func.jvp``): reported n/a.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "EFFICIENCY_RESULT "
MB = 2**20

# ----------------------------------------------------------------------------------------------------------
# Presets. Backbones are data: an open_clip architecture name or an explicit vision tower config; a T5 config.
# ----------------------------------------------------------------------------------------------------------
#: T5 v1.0 architectures (google-t5/t5-*), built locally from their config values (random init, no download).
T5_SIZES = {
    "t5-small": dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8),
    "t5-base": dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12),
    "t5-large": dict(d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16),
}


@dataclass
class VisionSpec:
    """An open_clip image tower + a frozen random zero-shot-like head, trained on random images."""

    name: str
    arch: str | dict  # open_clip model name, or {"embed_dim": int, "vision_cfg": {...}}
    batch: int  # training batch of one iteration
    calib_batch: int  # calibration batch size (official: 64 / 16 / 2 for ViT-B/32 / B/16 / L/14)
    calib_batches: int = 2
    classes: int = 10
    lr: float = 1e-5
    wd: float = 0.1


@dataclass
class NLPSpec:
    """A T5ForConditionalGeneration from a T5Config (random init) on packed rank-classification batches."""

    name: str
    config: dict  # T5Config kwargs
    batch: int
    prompt_len: int  # encoder tokens per example
    answer_len: int  # decoder tokens per answer choice
    calib_batch: int = 32  # official nlp calibration batch
    calib_batches: int = 2
    choices: int = 2  # answer choices per calibration example (training uses the correct one only)
    lr: float = 1e-4
    wd: float = 0.0


@dataclass
class Config:
    preset: str
    vision: list[VisionSpec]
    nlp: list[NLPSpec]
    device: str = "cpu"
    threads: int = 2
    warmup: int = 2
    steps: int = 6
    repeats: int = 2
    rounds: int = 4  # calibration rounds
    sparsity: float = 0.9
    anchor_examples: int = 4
    plain_repeats: int = 3
    lota_steps: int = 3
    precision: str = "fp32"
    grad_checkpointing: bool = False
    modes: list[str] | None = None  # default: every registered mode
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        d = dict(d)
        d["vision"] = [VisionSpec(**v) for v in d["vision"]]
        d["nlp"] = [NLPSpec(**v) for v in d["nlp"]]
        return Config(**d)


def _t5(size: str, **kw: Any) -> dict:
    return dict(vocab_size=32128, feed_forward_proj="relu", tie_word_embeddings=True, **T5_SIZES[size], **kw)


PRESETS: dict[str, Config] = {
    # a few seconds: the schema test (tiny models, 1 warm-up + 2 timed steps)
    "test": Config(
        preset="test",
        vision=[VisionSpec("tiny-vit", {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                                                        "patch_size": 8, "head_width": 32}},
                           batch=4, calib_batch=4, calib_batches=1, classes=5)],
        nlp=[NLPSpec("tiny-t5", dict(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, feed_forward_proj="relu"),
                     batch=4, prompt_len=8, answer_len=3, calib_batch=4, calib_batches=1)],
        threads=1, warmup=1, steps=2, repeats=1, rounds=2, anchor_examples=2, plain_repeats=1, lota_steps=1,
    ),
    # CPU, < 10 minutes. One torch thread per job: on a 2-core machine shared with other work, 2 OpenMP threads
    # stall on each other's barriers whenever the other core is busy and timings become noise; 1 thread keeps
    # the ratios stable (pass --threads 2 on an idle machine). ViT: ViT-B/32's geometry (224 px, patch 32: 50
    # tokens) at width 512 and 6 layers; T5: 4+4 layers of t5-small's width, 8k vocabulary, 64-token prompts.
    "cpu": Config(
        preset="cpu",
        vision=[VisionSpec("ViT-w512-L6-p32", {"embed_dim": 256, "vision_cfg": {"image_size": 224, "layers": 6,
                                                                              "width": 512, "patch_size": 32,
                                                                              "head_width": 64}},
                           batch=8, calib_batch=32, calib_batches=3)],
        nlp=[NLPSpec("T5-d512-L4", dict(vocab_size=8192, d_model=512, d_ff=2048, d_kv=64, num_layers=4, num_heads=8,
                                        feed_forward_proj="relu"),
                     batch=8, prompt_len=64, answer_len=8, calib_batch=32, calib_batches=3)],
        threads=1, warmup=2, steps=5, repeats=2, plain_repeats=2,
    ),
    # the paper's models and batches on one CUDA device (random-init weights: cost does not depend on them);
    # calibration batches as in the official code; nlp: one micro-batch of 64 (x16 accumulation in the paper)
    "paper": Config(
        preset="paper",
        vision=[VisionSpec("ViT-B-32", "ViT-B-32", batch=128, calib_batch=64, calib_batches=4),
                VisionSpec("ViT-B-16", "ViT-B-16", batch=128, calib_batch=16, calib_batches=4),
                VisionSpec("ViT-L-14", "ViT-L-14", batch=128, calib_batch=2, calib_batches=8)],
        nlp=[NLPSpec("t5-small", _t5("t5-small"), batch=64, prompt_len=128, answer_len=16),
             NLPSpec("t5-base", _t5("t5-base"), batch=64, prompt_len=128, answer_len=16),
             NLPSpec("t5-large", _t5("t5-large"), batch=64, prompt_len=128, answer_len=16)],
        device="cuda", threads=0, warmup=3, steps=10, repeats=1, anchor_examples=8, plain_repeats=5,
        precision="bf16",
    ),
}

#: (name, domain-independent check) of the targets the cpu preset must meet, evaluated per domain.
TARGETS = [
    ("talos step <= 1.05x standard", lambda r: _ratio(r, "talos", "standard", "step_s"), "<=", 1.05),
    ("talos optimizer state <= 0.25x standard", lambda r: _ratio(r, "talos", "standard", "optimizer_state_mb"), "<=",
     0.25),
    ("talos peak memory <= 0.9x standard", lambda r: _ratio(r, "talos", "standard", "peak_mem_mb"), "<=", 0.9),
    ("linear step >= 1.5x standard", lambda r: _ratio(r, "linear", "standard", "step_s"), ">=", 1.5),
    ("talos step <= 0.7x linear", lambda r: _ratio(r, "talos", "linear", "step_s"), "<=", 0.7),
]
CALIBRATION_TARGETS = [
    ("calibration <= 1.0x plain fwd+bwd per example", "per_example_s", "plain_fwdbwd_per_example_s", "<=", 1.0),
    ("anchor >= 15x calibration per example", "anchor_per_example_s", "per_example_s", ">=", 15.0),
]


def _ratio(rows: dict, a: str, b: str, key: str) -> float | None:
    try:
        x, y = rows[a][key], rows[b][key]
    except KeyError:
        return None
    if x is None or y is None or not y:
        return None
    return x / y


# ----------------------------------------------------------------------------------------------------------
# Child side: everything below imports torch lazily, so the orchestrating parent stays small.
# ----------------------------------------------------------------------------------------------------------
def _rss_mb(field_name: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


@dataclass
class Bench:
    """One backbone, ready for the mode API: a fresh model plus its data, eligible set and forward/loss."""

    model: Any
    eligible: list[str]
    dense: list[str]
    forward_fn: Any  # per-example class scores, for calibration
    loss_fn: Any  # mean training loss of a batch
    train_batch: Any
    calib_batches: list
    lora_targets: Any
    fisher_target: str
    lr: float
    wd: float
    n_calib: int = 0
    extra: dict = field(default_factory=dict)


def _vision_bench(spec: VisionSpec, cfg: Config):
    import open_clip
    import torch
    import torch.nn.functional as F

    from vision.models import ImageClassifier, lora_targets, register_model_configs, split_parameters

    register_model_configs()
    if isinstance(spec.arch, str):
        mc = open_clip.get_model_config(spec.arch)
        if mc is None:
            raise ValueError(f"unknown open_clip architecture {spec.arch!r}")
        embed_dim, vision_cfg = mc["embed_dim"], mc["vision_cfg"]
    else:
        embed_dim, vision_cfg = spec.arch["embed_dim"], spec.arch["vision_cfg"]
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same θ0 in every subprocess: masks computed in one apply to the others
    # the image tower only (text tower never built: it would inflate the memory baseline)
    visual = open_clip.model._build_vision_tower(embed_dim, vision_cfg)
    head = F.normalize(torch.randn(spec.classes, embed_dim), dim=-1) * 100.0  # like a zero-shot head
    model = ImageClassifier(visual, head).to(dev)
    if cfg.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)  # open_clip: non-reentrant torch.utils.checkpoint per block
    eligible, dense = split_parameters(model, freeze_embeddings=False)
    size = vision_cfg["image_size"]
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def batch(n):
        x = torch.randn(n, 3, size, size, generator=g)
        return x.to(dev), torch.randint(0, spec.classes, (n,), generator=g).to(dev)

    return Bench(
        model=model, eligible=eligible, dense=dense,
        forward_fn=lambda m, b: m(b[0]),
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        train_batch=batch(spec.batch),
        calib_batches=[batch(spec.calib_batch) for _ in range(spec.calib_batches)],
        lora_targets=lora_targets, fisher_target="logit", lr=spec.lr, wd=spec.wd,
        n_calib=spec.calib_batch * spec.calib_batches,
    )


def _t5_lora_targets(model) -> dict:
    """q and v projection weights of every T5 attention (LoRA's targets, paper-notes §3)."""
    return {f"{n}.{p}.weight": None for n, m in model.named_modules() if type(m).__name__ == "T5Attention"
            for p in ("q", "v")}


def _t5_batch(B: int, T: int, C: int, L: int, vocab: int, g, dev) -> dict:
    """A packed seq2seq rank-classification batch, exactly the layout of ``nlp.scoring.RankCollator``."""
    import torch

    pad = start = 0
    targets = torch.randint(2, vocab, (B, C, L), generator=g)
    dec = torch.cat([torch.full((B, C, 1), start, dtype=torch.long), targets[:, :, :-1]], dim=2)
    pos = torch.arange(C * L)
    allowed = ((pos[:, None] // L) == (pos[None, :] // L)) & (pos[None, :] <= pos[:, None])
    b = {"kind": "seq2seq", "targets": targets, "target_mask": torch.ones(B, C, L, dtype=torch.bool),
         "choice_mask": torch.ones(B, C, dtype=torch.bool), "labels": torch.randint(0, C, (B,), generator=g),
         "input_ids": torch.randint(2, vocab, (B, T), generator=g),
         "attention_mask": torch.ones(B, T, dtype=torch.long),
         "decoder_input_ids": dec.reshape(B, C * L), "decoder_allowed": allowed[None, None].expand(B, 1, C * L, C * L)}
    del pad
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def _nlp_bench(spec: NLPSpec, cfg: Config):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    import nlp.models as nm
    from nlp.scoring import answer_loss, choice_log_likelihoods

    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    conf = T5Config(**{"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, **spec.config})
    model = T5ForConditionalGeneration(conf).float().to(dev)  # T5LayerNorm: rule built into talos.fisher
    if cfg.grad_checkpointing:
        # non-reentrant: reentrant checkpointing runs the block under no_grad (Fisher would lose its fast path).
        # transformers checkpoints only in training mode, so calibration (eval mode) is not affected.
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(cfg.seed + 1)
    V = conf.vocab_size
    return Bench(
        model=model, eligible=nm.eligible_parameters(model), dense=[],
        forward_fn=choice_log_likelihoods, loss_fn=answer_loss,
        train_batch=_t5_batch(spec.batch, spec.prompt_len, 1, spec.answer_len, V, g, dev),
        calib_batches=[_t5_batch(spec.calib_batch, spec.prompt_len, spec.choices, spec.answer_len, V, g, dev)
                       for _ in range(spec.calib_batches)],
        lora_targets=getattr(nm, "lora_targets", _t5_lora_targets), fisher_target="logit",
        lr=spec.lr, wd=spec.wd, n_calib=spec.calib_batch * spec.calib_batches,
    )


def build_bench(domain: str, spec: dict, cfg: Config) -> Bench:
    if domain == "vision":
        return _vision_bench(VisionSpec(**spec), cfg)
    if domain == "nlp":
        return _nlp_bench(NLPSpec(**spec), cfg)
    raise ValueError(f"unknown domain {domain!r}")


def make_context(b: Bench, cfg: Config, load_task_vector=None, mode: str = "talos"):
    from talos.modes import ModeContext, get_mode

    settings = get_mode(mode).settings.from_values(
        {"sparsity": cfg.sparsity, "calibration_rounds": cfg.rounds, "fisher_target": b.fisher_target})
    return ModeContext(
        model=b.model, eligible=list(b.eligible), dense=list(b.dense), forward_fn=b.forward_fn,
        calibration_batches=lambda: b.calib_batches, settings=settings, seed=cfg.seed, progress=False,
        lora_targets=b.lora_targets, load_task_vector=load_task_vector,
    )


def _sync(cfg: Config) -> None:
    if cfg.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _autocast(cfg: Config):
    import torch

    dev = cfg.device.split(":")[0]
    return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _train_steps(b: Bench, state, opt, cfg: Config, n: int) -> list[float]:
    """``n`` full iterations (forward, loss, backward, clip, step, zero_grad); seconds of each."""
    import torch

    params = [p for _, p in state.named_params]
    state.model.train()
    times = []
    for _ in range(n):
        _sync(cfg)
        t0 = time.perf_counter()
        with _autocast(cfg):
            loss = b.loss_fn(state.model, b.train_batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(cfg)
        times.append(time.perf_counter() - t0)
    return times


def _save_masks(path: Path, masks) -> None:
    from talos.io import save_tensors

    save_tensors(path, {n: m.cpu() for n, m in masks.items()})


def job_train(job: dict, cfg: Config) -> dict:
    """One mode's training iterations in this process (a fresh subprocess per mode: peaks do not mix)."""
    import torch

    from talos.io import load_tensors
    from talos.modes import get_mode
    from talos.optim import masked_state_bytes
    from talos.train import build_optimizer

    b = build_bench(job["domain"], job["spec"], cfg)
    mode = get_mode(job["mode"])
    manifest = json.loads((Path(job["workdir"]) / "masks.json").read_text())
    masks = load_tensors(manifest[mode.name]) if manifest.get(mode.name) else None
    ctx = make_context(b, cfg, mode=mode.name)
    named = dict(b.model.named_parameters())
    eligible_params = [named[n] for n in b.eligible]  # by identity: LoRA parametrizations rename them
    base = _rss_mb("VmRSS")
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    state = mode.prepare(ctx, masks)
    opt = build_optimizer(state.named_params, state.masks, state.dense, b.lr, b.wd)
    times = _train_steps(b, state, opt, cfg, cfg.warmup + cfg.steps)[cfg.warmup:]
    if cfg.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / MB
        base = None
    else:
        peak = _rss_mb("VmHWM")
    m = state.masks
    trainable = sum(int(m[n].sum()) if m is not None and n in m else p.numel() for n, p in state.named_params)
    out = {
        "step_s": statistics.median(times), "step_times_s": times, "peak_mem_mb": peak,
        "base_mem_mb": base, "train_mem_mb": None if base is None else peak - base,
        "trainable": trainable, "frozen_tensors": sum(not p.requires_grad for p in eligible_params),
        "eligible_tensors": len(eligible_params), "optimizer_state_mb": masked_state_bytes(opt) / MB,
        "optimizer": type(opt).__name__,
    }
    if hasattr(opt, "layouts"):
        lay = list(opt.layouts().values())
        out["state_layouts"] = {k: lay.count(k) for k in sorted(set(lay))}
    state.cleanup()
    return out


def job_calibration(job: dict, cfg: Config) -> dict:
    """TaLoS's real calibration on the benchmarked model (its masks are saved for training), timed per example
    next to a plain forward+backward and the anchor algorithm on the same calibration batches."""
    import torch

    from talos.fisher import fisher_scores
    from talos.modes import get_mode

    b = build_bench(job["domain"], job["spec"], cfg)
    # one torch thread on CPU: CPU time of this thread, which other processes on shared cores do not inflate
    clock = time.thread_time if cfg.device == "cpu" and cfg.threads == 1 else time.perf_counter
    model = b.model
    named = dict(model.named_parameters())
    leaves = [named[n] for n in b.eligible]
    plain_times: list[float] = []

    def plain_passes(batches, record: bool) -> float:
        """Plain forward + backward to the eligible tensors' gradients (eval mode, as in scoring); seconds."""
        flags = {p: p.requires_grad for p in model.parameters()}
        training = model.training
        for p in model.parameters():
            p.requires_grad_(False)
        for p in leaves:
            p.requires_grad_(True)
        model.eval()
        t_all = clock()
        with torch.enable_grad():
            for batch in batches:
                _sync(cfg)
                t = clock()
                out = b.forward_fn(model, batch)
                torch.autograd.grad(out.float().logsumexp(-1).sum(), leaves, allow_unused=True)
                del out
                _sync(cfg)
                if record:
                    plain_times.append((clock() - t) / _batch_size(batch))
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(training)
        return clock() - t_all

    plain_passes(b.calib_batches[:1], record=False)  # warm-up (allocator, kernels) before anything is timed
    # and one Fisher pass: a process's first scoring pays one-off page faults while its heap grows, which a
    # real calibration (the whole validation split, every round) amortises and a short benchmark would not
    fisher_scores(model, b.calib_batches[:1], b.forward_fn, params=b.eligible, target=b.fisher_target,
                  generator=torch.Generator().manual_seed(cfg.seed))
    # Plain passes are timed between the calibration rounds (and after them), so both see the same load from
    # whatever else runs on the machine; their time is taken out of the calibration's.
    in_rounds = [0.0]

    def on_round(r, density, keep):
        in_rounds[0] += plain_passes(b.calib_batches[:1], record=True)

    ctx = make_context(b, cfg)
    ctx.on_round = on_round
    _sync(cfg)
    t0 = clock()
    masks = get_mode("talos").masks(ctx)
    _sync(cfg)
    total = clock() - t0 - in_rounds[0]
    peak = torch.cuda.max_memory_allocated() / MB if cfg.device.startswith("cuda") else _rss_mb("VmHWM")
    _save_masks(Path(job["workdir"]) / "talos.safetensors", masks)
    for _ in range(cfg.plain_repeats):
        plain_passes(b.calib_batches, record=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in leaves:
        p.requires_grad_(True)
    model.eval()

    anchor_s, B, k = _anchor_per_example(b, leaves, cfg, clock)
    return {
        "per_example_s": total / (cfg.rounds * b.n_calib),
        "plain_fwdbwd_per_example_s": statistics.median(plain_times),
        "anchor_per_example_s": anchor_s,
        "total_s": total, "rounds": cfg.rounds, "examples": b.n_calib, "batch": B,
        "anchor_backwards_timed": k, "peak_mem_mb": peak, "clock": clock.__name__,
        "frozen_tensors": sum(not bool(m.any()) for m in masks.values()),
        "density": sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
    }


def _anchor_per_example(b: "Bench", leaves: list, cfg: Config, clock: Callable[[], float]) -> tuple[float, int, int]:
    """The anchor (official code) on the first calibration batch: one batched forward, then for each example one
    backward through the whole batch graph (retain_graph), squared gradients accumulated (on the host in the
    official code; here in place). Returns (seconds per example, batch size, backwards timed)."""
    import torch

    from talos.fisher import draw_labels, per_example_objective

    batch = b.calib_batches[0]
    B = _batch_size(batch)
    k = B if cfg.anchor_examples <= 0 else min(B, cfg.anchor_examples)
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in leaves]
    gen = torch.Generator().manual_seed(cfg.seed)
    _sync(cfg)
    t = clock()
    out = b.forward_fn(b.model, batch)
    obj = per_example_objective(out, draw_labels(out, 1, gen), b.fisher_target)
    _sync(cfg)
    t_fwd = clock() - t
    bwd = []
    for i in range(k):
        t = clock()
        gs = torch.autograd.grad(obj[i, 0], leaves, retain_graph=True, allow_unused=True)
        for s, gr in zip(scores, gs):
            if gr is not None:
                s += gr.float().square()
        _sync(cfg)
        bwd.append(clock() - t)
    return t_fwd / B + statistics.mean(bwd), B, k


def _batch_size(batch) -> int:
    return int(batch[0].shape[0]) if isinstance(batch, (tuple, list)) else int(batch["input_ids"].shape[0])


def job_masks(job: dict, cfg: Config) -> dict:
    """Masks of every trained mode other than TaLoS (already calibrated), through ``mode.masks``."""
    from talos.modes import get_mode

    workdir = Path(job["workdir"])
    manifest = {}
    for name in job["modes"]:
        mode = get_mode(name)
        if mode.source_mode is not None:
            continue
        if name == "talos":
            manifest[name] = str(workdir / "talos.safetensors")
            continue
        b = build_bench(job["domain"], job["spec"], cfg)

        def load_task_vector(src: str):
            # a real task vector of the required mode: a few of its own training steps from θ0
            from talos.train import build_optimizer

            b2 = build_bench(job["domain"], job["spec"], cfg)
            ctx2 = make_context(b2, cfg, mode=src)
            m2 = get_mode(src)
            st = m2.prepare(ctx2, m2.masks(ctx2))
            opt = build_optimizer(st.named_params, st.masks, st.dense, b2.lr * 10, b2.wd)
            _train_steps(b2, st, opt, cfg, cfg.lota_steps)
            tau = st.task_vector()
            st.cleanup()
            return tau

        masks = mode.masks(make_context(b, cfg, load_task_vector, mode=mode.name))
        if masks is None:
            manifest[name] = None
        else:
            path = workdir / f"{name}.safetensors"
            _save_masks(path, masks)
            manifest[name] = str(path)
    (workdir / "masks.json").write_text(json.dumps(manifest))
    return {"masks": manifest}


JOBS = {"train": job_train, "calibration": job_calibration, "masks": job_masks}


def run_job(job: dict) -> dict:
    """Run one job in this process (what a subprocess does with ``--job``)."""
    import torch

    cfg = Config.from_dict(job["config"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return JOBS[job["kind"]](job, cfg)


# ----------------------------------------------------------------------------------------------------------
# Parent side: orchestration, aggregation, report.
# ----------------------------------------------------------------------------------------------------------
ISOLATIONS = ("fork", "spawn", "none")


def _fork_job(job: dict) -> dict:
    """Run ``job`` in a child forked from this (import-only, torch-idle) process; its result comes back by pipe.

    The child starts with this process's resident pages (the imported libraries, as a fresh process would have)
    and its VmHWM is reset at the fork, so its peak is its own; no re-import per job.
    """
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            res = run_job(job)
        except BaseException as e:  # noqa: BLE001  (reported as this mode's error)
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        with os.fdopen(w, "wb") as f:
            f.write(json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"child process died (wait status {status})"}
    return json.loads(data)


def _spawn_job(job: dict) -> dict:
    """Run ``job`` in a fresh interpreter (``--job``); slower (imports per job) but works everywhere."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    threads = job["config"]["threads"]
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(job)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    return {"error": (tail.splitlines()[-1] if tail else f"exit {proc.returncode}"), "traceback": tail}


def _run_isolated(job: dict, isolation: str, log) -> dict:
    if isolation == "none":
        try:
            res = run_job(job)
        except Exception as e:  # noqa: BLE001  (recorded per mode, the rest of the table still runs)
            import traceback

            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    elif isolation == "fork":
        res = _fork_job(job)
    else:
        res = _spawn_job(job)
    if "error" in res:
        log(f"    job {job['kind']} {job.get('mode', '')} failed: {res.get('traceback') or res['error']}")
    return res


def preload(domains: list[str]) -> None:
    """Import what the jobs need once, in the parent, before any fork (no torch op runs here)."""
    import torch  # noqa: F401

    import talos.modes  # noqa: F401

    if "vision" in domains:
        import open_clip  # noqa: F401

        import vision.models  # noqa: F401
    if "nlp" in domains:
        import transformers.models.t5.modeling_t5  # noqa: F401

        import nlp.models  # noqa: F401
        import nlp.scoring  # noqa: F401


def registered_modes() -> list[str]:
    """Every registered mode, the dense baseline first (then in dependency order)."""
    from talos.modes import run_order

    order = run_order()
    return ["standard"] + [m for m in order if m != "standard"] if "standard" in order else order


def _mode_info() -> dict[str, str | None]:
    from talos.modes import MODES

    return {n: MODES.get(n).source_mode for n in MODES.names()}


def _unsupported(cfg: Config, mode: str) -> str | None:
    """Why ``mode`` cannot be benchmarked under ``cfg``, or None."""
    from talos.modes import MODES

    m = MODES.get(mode)
    if cfg.grad_checkpointing and m.eval_linearized and m.source_mode is None:
        return "not supported under activation checkpointing: torch.func.jvp cannot run through checkpointed blocks"
    return None


def run_pair(cfg: Config, vspec: VisionSpec | None, nspec: NLPSpec | None, *, isolation: str = "fork",
             log=print) -> dict:
    """The whole table for one vision and one nlp backbone (either may be None)."""
    modes = cfg.modes or registered_modes()
    sources = _mode_info()
    skipped = {m: why for m in modes if (why := _unsupported(cfg, m))}
    trained = [m for m in modes if sources[m] is None and m not in skipped]
    domains = [(d, s) for d, s in (("vision", vspec), ("nlp", nspec)) if s is not None]
    result: dict[str, Any] = {"vision": {}, "nlp": {}, "calibration": {}}
    runs: dict[str, dict[str, list[dict]]] = {d: {m: [] for m in trained} for d, _ in domains}
    work = Path(tempfile.mkdtemp(prefix="talos_efficiency_"))
    t_start = time.time()
    try:
        for d, spec in domains:
            wd = work / d
            wd.mkdir()
            base = {"config": cfg.to_dict(), "domain": d, "spec": asdict(spec), "workdir": str(wd)}
            log(f"[{d}] {spec.name}: calibration (talos masks) ...")
            t = time.time()
            result["calibration"][d] = _run_isolated({**base, "kind": "calibration"}, isolation, log)
            log(f"    {time.time() - t:.0f}s {_fmt_cal(result['calibration'][d])}")
            log(f"[{d}] masks of the other modes ...")
            mk = _run_isolated({**base, "kind": "masks", "modes": trained}, isolation, log)
            if "error" in mk:  # a mode whose mask failed is reported as failed, the others still run
                (wd / "masks.json").write_text(json.dumps({}))
        for r in range(cfg.repeats):
            for d, spec in domains:
                base = {"config": cfg.to_dict(), "domain": d, "spec": asdict(spec), "workdir": str(work / d)}
                for m in trained:
                    t = time.time()
                    res = _run_isolated({**base, "kind": "train", "mode": m}, isolation, log)
                    runs[d][m].append(res)
                    log(f"[{d}] pass {r + 1}/{cfg.repeats} {m:<15} {time.time() - t:5.1f}s  {_fmt_row(res)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for d, _ in domains:
        for m in modes:
            if sources[m] is not None:
                result[d][m] = {"step_s": None, "peak_mem_mb": None, "trainable": None, "frozen_tensors": None,
                                "optimizer_state_mb": None, "trained_by": sources[m],
                                "note": f"no training of its own: evaluates {sources[m]}'s task vectors through "
                                        "the linearized model, so its training cost is that of " + sources[m]}
            elif m in skipped:
                result[d][m] = {"step_s": None, "peak_mem_mb": None, "trainable": None, "frozen_tensors": None,
                                "optimizer_state_mb": None, "unsupported": skipped[m]}
            else:
                result[d][m] = _combine(runs[d][m])
    result.update({
        "device": _device_name(cfg), "preset": cfg.preset, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "backbones": {d: s.name for d, s in domains}, "isolation": isolation,
        "wall_s": time.time() - t_start, "config": cfg.to_dict(), "env": _env(),
    })
    result["targets"] = check_targets(result)
    return result


def _combine(rs: list[dict]) -> dict:
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return {"step_s": None, "peak_mem_mb": None, "trainable": None, "frozen_tensors": None,
                "optimizer_state_mb": None, "error": rs[0].get("error") if rs else "not run"}
    out = dict(ok[0])
    times = [t for r in ok for t in r["step_times_s"]]
    out["step_times_s"] = times
    out["step_s"] = statistics.median(times)
    out["peak_mem_mb"] = max(r["peak_mem_mb"] for r in ok)
    if all(r.get("train_mem_mb") is not None for r in ok):
        out["base_mem_mb"] = max(r["base_mem_mb"] for r in ok)
        out["train_mem_mb"] = max(r["train_mem_mb"] for r in ok)
    return out


def check_targets(result: dict) -> list[dict]:
    rows = []
    for d in ("vision", "nlp"):
        if not result.get(d):
            continue
        for name, fn, op, limit in TARGETS:
            v = fn(result[d])
            rows.append({"domain": d, "target": name, "value": v, "limit": limit,
                         "pass": None if v is None else (v <= limit if op == "<=" else v >= limit)})
        cal = result["calibration"].get(d, {})
        for name, a, b_, op, limit in CALIBRATION_TARGETS:
            v = cal[a] / cal[b_] if cal.get(a) and cal.get(b_) else None
            rows.append({"domain": d, "target": name, "value": v, "limit": limit,
                         "pass": None if v is None else (v <= limit if op == "<=" else v >= limit)})
    return rows


def _device_name(cfg: Config) -> str:
    if cfg.device.startswith("cuda"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            if out:
                return f"cuda ({out[0]})"
        except (OSError, subprocess.SubprocessError):
            pass
        return "cuda"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {cfg.threads or os.cpu_count()} threads)"


def _env() -> dict:
    out = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        from importlib.metadata import version

        for pkg in ("torch", "open_clip_torch", "transformers"):
            out[pkg] = version(pkg)
    except Exception:  # noqa: BLE001
        pass
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=str(ROOT)).stdout.strip()
    except OSError:
        pass
    return out


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    return (f"step {r['step_s'] * 1e3:8.1f} ms  peak {r['peak_mem_mb']:7.0f} MB  trainable {r['trainable']:>10,}  "
            f"frozen {r['frozen_tensors']:>3}  opt state {r['optimizer_state_mb']:7.2f} MB")


def _fmt_cal(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    return (f"calibration {r['per_example_s'] * 1e3:.2f} ms/example/round, "
            f"plain {r['plain_fwdbwd_per_example_s'] * 1e3:.2f}, "
            f"anchor {r['anchor_per_example_s'] * 1e3:.2f}")


def _num(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def trade_lines(result: dict, baseline: dict, name: str) -> list[str]:
    """How ``result`` compares with ``baseline`` (same preset, e.g. with vs without activation checkpointing)."""
    gc = result["config"]["grad_checkpointing"] and not baseline["config"]["grad_checkpointing"]
    what = "activation checkpointing: its trade" if gc else "comparison"
    lines = ["", f"### {what} versus `{name}` (same preset)", "",
             "| domain | mode | step (ms): baseline -> this | time x | peak mem (MB): baseline -> this | train mem x |",
             "|---|---|---:|---:|---:|---:|"]
    for d in ("vision", "nlp"):
        for m, r in (result.get(d) or {}).items():
            b = (baseline.get(d) or {}).get(m) or {}
            if not r.get("step_s") or not b.get("step_s"):
                continue
            tm = (r["train_mem_mb"] / b["train_mem_mb"]) if r.get("train_mem_mb") and b.get("train_mem_mb") else None
            lines.append(f"| {d} | {m} | {b['step_s'] * 1e3:.1f} -> {r['step_s'] * 1e3:.1f} | "
                         f"{r['step_s'] / b['step_s']:.2f} | {b['peak_mem_mb']:.0f} -> {r['peak_mem_mb']:.0f} | "
                         f"{_num(tm, '.2f')} |")
        c, bc = result.get("calibration", {}).get(d, {}), baseline.get("calibration", {}).get(d, {})
        if c.get("per_example_s") and bc.get("per_example_s"):
            lines.append(f"| {d} | calibration (per example) | {bc['per_example_s'] * 1e3:.1f} -> "
                         f"{c['per_example_s'] * 1e3:.1f} | {c['per_example_s'] / bc['per_example_s']:.2f} | "
                         f"{bc['peak_mem_mb']:.0f} -> {c['peak_mem_mb']:.0f} | |")
    return lines


def markdown(result: dict, baseline: dict | None = None, baseline_name: str = "baseline") -> str:
    """Tables of one result (one backbone per domain) and its target checks (and the trade vs a baseline)."""
    cfg = result["config"]
    lines = [f"## Efficiency: preset `{result['preset']}` on {result['device']}, {result['date']}",
             "",
             f"Backbones: {', '.join(f'{d} `{n}`' for d, n in result['backbones'].items())}. "
             f"Median of {cfg['steps']} iterations after {cfg['warmup']} warm-up, x{cfg['repeats']} passes"
             f"{', activation checkpointing' if cfg['grad_checkpointing'] else ''}, precision {cfg['precision']}; "
             f"wall time {result['wall_s']:.0f} s."]
    if cfg["grad_checkpointing"]:
        lines.append("Activation checkpointing: open_clip checkpoints every residual block (non-reentrant) in "
                     "calibration and training; transformers' T5 checkpoints only in training mode, so its "
                     "calibration (eval mode) runs without.")
    gpu = str(result["device"]).startswith("cuda")
    for d in ("vision", "nlp"):
        rows = result.get(d)
        if not rows:
            continue
        std = rows.get("standard", {})
        lines += ["", f"### {d} (`{result['backbones'][d]}`)", "",
                  "| mode | step (ms) | x standard | peak mem (MB) | " + ("" if gpu else "train mem (MB) | ")
                  + "trainable | frozen tensors | optimizer state (MB) |",
                  "|---|---:|---:|---:|" + ("" if gpu else "---:|") + "---:|---:|---:|"]
        for m, r in rows.items():
            if r.get("trained_by"):
                lines.append(f"| {m} | = {r['trained_by']} | | | " + ("" if gpu else "| ") + "| | |")
                continue
            if r.get("unsupported"):
                lines.append(f"| {m} | n/a ({r['unsupported'].split(':')[0]}) | | | " + ("" if gpu else "| ") + "| | |")
                continue
            if r.get("error"):
                lines.append(f"| {m} | error: {r['error'][:60]} | | | " + ("" if gpu else "| ") + "| | |")
                continue
            x = r["step_s"] / std["step_s"] if std.get("step_s") else None
            ft = f"{r['frozen_tensors']} / {r.get('eligible_tensors', '?')}"
            lines.append(f"| {m} | {r['step_s'] * 1e3:.1f} | {_num(x, '.2f')} | {r['peak_mem_mb']:.0f} | "
                         + ("" if gpu else f"{_num(r.get('train_mem_mb'), '.0f')} | ")
                         + f"{r['trainable']:,} | {ft} | {r['optimizer_state_mb']:.2f} |")
    if result.get("calibration"):
        lines += ["", "### Calibration cost per example", "",
                  "| domain | TaLoS calibration (ms / example / round) | plain fwd+bwd (ms / example) "
                  "| anchor (ms / example) "
                  "| calibration / plain | anchor / calibration | total (s) | rounds x examples | peak mem (MB) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for d, c in result["calibration"].items():
            if "error" in c:
                lines.append(f"| {d} | error: {c['error'][:80]} | | | | | | | |")
                continue
            lines.append(
                f"| {d} | {c['per_example_s'] * 1e3:.2f} | {c['plain_fwdbwd_per_example_s'] * 1e3:.2f} | "
                f"{c['anchor_per_example_s'] * 1e3:.2f} | "
                f"{c['per_example_s'] / c['plain_fwdbwd_per_example_s']:.2f}x | "
                f"{c['anchor_per_example_s'] / c['per_example_s']:.1f}x | {c['total_s']:.1f} | "
                f"{c['rounds']} x {c['examples']} | {c['peak_mem_mb']:.0f} |")
    if result.get("targets"):
        lines += ["", "### Targets", "", "| domain | target | value | result |", "|---|---|---:|---|"]
        for t in result["targets"]:
            verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
            lines.append(f"| {t['domain']} | {t['target']} | {_num(t['value'], '.3f')} | {verdict} |")
    if baseline is not None:
        lines += trade_lines(result, baseline, baseline_name)
    return "\n".join(lines) + "\n"


def calibration_only(cfg: Config, pairs: list, n: int, isolation: str, out: str) -> dict:
    """Time only the TaLoS calibration, ``n`` runs per backbone; per-run ratios and their median."""
    res: dict[str, Any] = {"device": _device_name(cfg), "preset": cfg.preset, "runs": n, "env": _env(),
                           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "calibration": {}}
    work = Path(tempfile.mkdtemp(prefix="talos_calibration_"))
    try:
        for vspec, nspec in pairs:
            for d, spec in (("vision", vspec), ("nlp", nspec)):
                if spec is None:
                    continue
                (work / d).mkdir(exist_ok=True)
                job = {"config": cfg.to_dict(), "domain": d, "spec": asdict(spec), "workdir": str(work / d),
                       "kind": "calibration"}
                rows = []
                for i in range(n):
                    r = _run_isolated(job, isolation, print)
                    if "error" in r:
                        raise RuntimeError(r["error"])
                    r["ratio"] = r["per_example_s"] / r["plain_fwdbwd_per_example_s"]
                    rows.append(r)
                    print(f"[{d}] {spec.name} run {i + 1}/{n}: {_fmt_cal(r)} -> {r['ratio']:.3f}x plain", flush=True)
                med = statistics.median(r["ratio"] for r in rows)
                res["calibration"][f"{d}:{spec.name}"] = {"median_ratio": med, "runs": rows}
                print(f"[{d}] {spec.name}: median calibration / plain = {med:.3f}x over {n} runs", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from talos.io import atomic_write_json

    atomic_write_json(out, res)
    print(f"wrote {out}")
    return res


def _pairs(cfg: Config, domains: list[str]) -> list[tuple[VisionSpec | None, NLPSpec | None]]:
    vs = cfg.vision if "vision" in domains else []
    ns = cfg.nlp if "nlp" in domains else []
    n = max(len(vs), len(ns))
    return [(vs[i] if i < len(vs) else None, ns[i] if i < len(ns) else None) for i in range(n)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/efficiency_<preset>[_gc].json); with several backbone "
                        "pairs (paper preset) one file per pair, suffixed with their names")
    p.add_argument("--domains", default="vision,nlp", help="comma-separated subset of vision,nlp")
    p.add_argument("--modes", default=None, help="comma-separated modes (default: every registered mode)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing in calibration and fine-tuning (open_clip blocks / T5 layers)")
    p.add_argument("--device", default=None, help="override the preset's device (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per subprocess (0 = torch default)")
    p.add_argument("--steps", type=int, default=None, help="timed iterations per mode and pass")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first")
    p.add_argument("--repeats", type=int, default=None, help="round-robin passes over the modes")
    p.add_argument("--anchor-examples", type=int, default=None,
                   help="per-example anchor backwards timed (0 = all of the batch)")
    p.add_argument("--isolation", default="fork" if hasattr(os, "fork") else "spawn", choices=ISOLATIONS,
                   help="how each job gets its own process: fork (from this process after importing the libraries "
                        "once), spawn (fresh interpreter per job), none (all in this process: peaks mix; tests)")
    p.add_argument("--baseline", default=None,
                   help="a result JSON of the same preset (e.g. without --grad-checkpointing): adds a table of "
                        "time and memory ratios against it")
    p.add_argument("--calibration-only", type=int, default=0, metavar="N",
                   help="only time the TaLoS calibration, N times per domain (each in its own process); prints the "
                        "per-run ratios to a plain forward+backward and their median, writes --out "
                        "(default benchmarks/results/calibration_<preset>.json)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job, print its result
    args = p.parse_args(argv)

    if args.job is not None:
        res = run_job(json.loads(args.job))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return [res]

    cfg = copy.deepcopy(PRESETS[args.preset])
    over = {k: v for k, v in (("device", args.device), ("threads", args.threads), ("steps", args.steps),
                              ("warmup", args.warmup), ("repeats", args.repeats),
                              ("anchor_examples", args.anchor_examples)) if v is not None}
    cfg = replace(cfg, **over, grad_checkpointing=args.grad_checkpointing)
    if cfg.device == "cpu":
        cfg.precision = "fp32"
    if args.modes:
        known = set(registered_modes())
        modes = [m for m in args.modes.split(",") if m]
        bad = [m for m in modes if m not in known]
        if bad:
            p.error(f"unknown modes {bad}; valid: {', '.join(sorted(known))}")
        cfg.modes = modes
    domains = [d for d in args.domains.split(",") if d]
    if not set(domains) <= {"vision", "nlp"} or not domains:
        p.error("--domains must be a subset of vision,nlp")
    stem = args.out or str(ROOT / "benchmarks" / "results" /
                           f"efficiency_{args.preset}{'_gc' if cfg.grad_checkpointing else ''}.json")
    pairs = _pairs(cfg, domains)
    if args.isolation == "fork":
        preload(domains)
    if args.calibration_only:
        return [calibration_only(cfg, pairs, args.calibration_only, args.isolation,
                                 args.out or str(ROOT / "benchmarks" / "results" / f"calibration_{args.preset}.json"))]
    results = []
    for vspec, nspec in pairs:
        res = run_pair(cfg, vspec, nspec, isolation=args.isolation)
        out = Path(stem)
        names = "_".join(s.name for s in (vspec, nspec) if s is not None)
        if len(pairs) > 1:
            out = out.with_name(f"{out.stem}_{names}{out.suffix}")
        base = None
        if args.baseline:
            bpath = Path(args.baseline)
            if len(pairs) > 1:
                bpath = bpath.with_name(f"{bpath.stem}_{names}{bpath.suffix}")
            if bpath.exists():
                base = json.loads(bpath.read_text())
                if base.get("backbones") != res["backbones"] or base.get("device") != res["device"]:
                    print(f"baseline {bpath} is for other backbones or another device: no comparison table")
                    base = None
            if base is not None:
                rb = bpath.resolve()
                res["baseline"] = str(rb.relative_to(ROOT) if rb.is_relative_to(ROOT) else rb)
            elif not bpath.exists():
                print(f"baseline {bpath} not found: no comparison table")
        md = markdown(res, base, bpath.name if base is not None else "")
        print("\n" + md)
        out.parent.mkdir(parents=True, exist_ok=True)
        from talos.io import atomic_write_json

        atomic_write_json(out, res)
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out} and {out.with_suffix('.md')}")
        results.append(res)
    return results


if __name__ == "__main__":
    main()
