"""Contrastive pre-training of the demo's toy CLIP (``talos-toy-clip``) on captioned images of both worlds.

    python -m vision.demo.pretrain --out vision/demo/toy_clip.safetensors      # the committed checkpoint

Images are drawn once into an in-memory pool (``--pool`` images from ``--seed``): a fraction ``--scenes`` are
overlapping-world scenes, the rest are spread evenly over the seven disjoint-world domains and their
classes, so one checkpoint serves both worlds. The mixture is mostly domain images (``--scenes 0.1``): with
40% scenes the tiny tower's features of the six disjoint tasks were entangled (fine-tuning ToyDice did not
beat zero-shot, and one task's vector cut the others' accuracy to about half), so non-linear task addition
could not beat zero-shot; with 10% it does (+3.5 points), at a price for the overlapping world (its
zero-shot and fine-tuned accuracies fall; position stays at chance, as it was). Every step takes a batch
from a seeded permutation of the pool and re-draws each caption. A scene's caption names each factor with probability ``--keep`` (attribute
dropout), so the text tower learns short phrases like the downstream templates, and no factor alone
suffices to tell a batch's captions apart (with full captions the easy factors, colour and texture, do,
and shape and position are never learned); a domain image's caption is one of its task's templates filled
with the class name (probability ``--domain-keep``) or a phrase naming the domain only. Two values per
target factor and two classes per target domain are never named (:data:`UNNAMED`,
:attr:`vision.demo.domains.Domain.unnamed`), so zero-shot accuracy stays clearly below fine-tuned accuracy.
Loss: CLIP's symmetric cross-entropy with a learned temperature. AdamW, linear warm-up, cosine decay.

The checkpoint is an open_clip state dict in safetensors, stored as float16 (``load_state_dict`` casts
back to the model's float32), loadable with ``--model talos-toy-clip --pretrained <path>``. A JSON sidecar
(same name, ``.json``) records the exact command, seed, settings, wall time, library versions, sha256 and
the zero-shot accuracy of every demo task on freshly drawn scenes. Same seed and thread count, same
checkpoint (CPU float arithmetic may differ across machines and thread counts).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .domains import DOMAINS
from .world import FACTORS, IMAGE_SIZE, TASKS, caption, draw_example, render, sample_scene, scene_rng

#: Two values of each target task's factor that pre-training captions never name (the images still occur,
#: captioned without that factor): the text tower never learns those words, so a zero-shot head can at
#: best guess between them and fine-tuning has something to add, as for real tasks whose classes web
#: captions rarely name. (With one unnamed value per factor, zero-shot heads still find it by elimination:
#: measured 91-98% on colour and glyph.) The control task's factor (size) keeps all its words.
UNNAMED = {f: FACTORS[f][-2:] for f in ("shape", "colour", "count", "position", "texture", "glyph")}

MODEL = "talos-toy-clip"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "toy_clip.safetensors"
_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # open_clip's OPENAI mean / std
_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), identical to the eval preprocessing at 48 px."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


def draw_pool(n: int, seed: int, scenes: float = 1.0, purpose: str = "pretrain") -> tuple[np.ndarray, list]:
    """``n`` images (uint8, (n, 48, 48, 3)) and what they show, deterministic in (seed, purpose).

    A fraction ``scenes`` of them (rounded) are overlapping-world scenes (item: a :class:`Scene`), the
    others cycle through the disjoint domains and their classes (item: ``(domain name, label)``).
    """
    rng = scene_rng(seed, purpose)
    n_scenes = int(round(n * scenes))
    pairs = [(d.name, k) for d in DOMAINS.values() for k in range(d.n_classes)]
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    items: list = []
    for i in range(n):
        if i < n_scenes:
            s = sample_scene(rng)
            images[i] = render(s, rng)
            items.append(s)
        else:
            name, label = pairs[(i - n_scenes) % len(pairs)]
            images[i] = DOMAINS[name].draw(label, rng)
            items.append((name, label))
    return images, items


def pretrain_caption(item, rng: np.random.Generator, keep: dict[str, float], domain_keep: float) -> str:
    """A freshly drawn caption of a pool item (a scene, or a (domain, label) pair)."""
    if isinstance(item, tuple):
        return DOMAINS[item[0]].caption(item[1], rng, keep=domain_keep)
    return caption(item, rng, keep=keep, unnamed=UNNAMED)


def create_model(seed: int = 0):
    """A randomly initialised ``talos-toy-clip`` (open_clip CLIP) and its tokenizer."""
    import open_clip

    from vision.models import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    return model, open_clip.get_tokenizer(MODEL)


@torch.no_grad()
def zeroshot_accuracy(model, tokenizer, n: int = 400, seed: int = 12345) -> dict[str, float]:
    """Zero-shot accuracy of every demo task (both worlds) on ``n`` fresh images per task (templates averaged)."""
    from vision.models import zeroshot_head

    model.eval()
    out = {}
    for name, task in TASKS.items():
        rng = scene_rng(seed, "zeroshot", name)
        labels = np.arange(n) % task.n_classes
        images = np.stack([draw_example(task, int(y), rng)[0] for y in labels])
        head = zeroshot_head(model, tokenizer, task.classnames, task.templates)  # (C, D)
        feats = F.normalize(model.encode_image(to_tensor(images)), dim=-1)
        pred = (feats @ head.T).argmax(-1).numpy()
        out[name] = float((pred == labels).mean())
    return out


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "logit_scale" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    t_start, c_start = time.time(), time.process_time()
    images, items = draw_pool(args.pool, args.seed, args.scenes)
    t_pool = time.time() - t_start
    model, tokenizer = create_model(args.seed)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = scene_rng(args.seed, "pretrain-order")
    order = np.empty(0, np.int64)
    losses = []
    bar = tqdm(range(args.steps), desc="pretrain", disable=args.no_progress, mininterval=2.0)
    for step in bar:
        lr = args.lr * (step + 1) / args.warmup if step < args.warmup else \
            0.5 * args.lr * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))
        for g in opt.param_groups:
            g["lr"] = lr
        if len(order) < args.batch_size:
            order = np.concatenate([order, rng.permutation(args.pool)])
        idx, order = order[: args.batch_size], order[args.batch_size :]
        texts = tokenizer([pretrain_caption(items[i], rng, args.keep, args.domain_keep) for i in idx])
        img_f = F.normalize(model.encode_image(to_tensor(images[idx])), dim=-1)
        txt_f = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        target = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", lr=f"{lr:.1e}")
    t_train, c_train = time.time() - t_start, time.process_time() - c_start
    zs = zeroshot_accuracy(model, tokenizer)
    return {"model": model, "losses": losses, "zeroshot": zs, "pool_seconds": t_pool, "train_seconds": t_train,
            "train_cpu_seconds": c_train}


def save_checkpoint(model, path: Path, meta: dict) -> str:
    """Save ``model``'s state dict as float16 safetensors (+ JSON sidecar); returns the sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.detach().contiguous()
             for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"model": MODEL, "command": meta["command"], "seed": str(meta["seed"])})
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    meta = {**meta, "sha256": sha, "bytes": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return sha


#: Probability that a pre-training caption names each factor. Alt-text style: short captions, and the
#: factors that are slow to learn contrastively (shape, position, glyph) named more often than the ones a
#: batch can be told apart by at a glance (colour, texture), which would otherwise be all the model learns.
DEFAULT_KEEP = "shape=0.8,position=0.8,glyph=0.8,count=0.5,size=0.4,colour=0.3,texture=0.3"


def _keep(text: str) -> dict[str, float]:
    from .world import FACTORS

    if "=" not in text:
        return {f: float(text) for f in FACTORS}
    out = {f: 0.0 for f in FACTORS}
    for kv in text.split(","):
        k, _, v = kv.partition("=")
        if k not in FACTORS:
            raise argparse.ArgumentTypeError(f"unknown factor {k!r}; valid: {', '.join(FACTORS)}")
        out[k] = float(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT), help="checkpoint path (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=40000, help="images drawn once for pre-training")
    p.add_argument("--scenes", type=float, default=0.1,
                   help="fraction of the pool from the overlapping world (the rest: the disjoint domains)")
    p.add_argument("--domain-keep", type=float, default=0.8,
                   help="probability that a domain image's caption names its class (never for held-out classes)")
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--keep", type=_keep, default=_keep(DEFAULT_KEEP),
                   help="probability that a scene's caption names a factor: one number, or factor=p pairs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model on a shared CPU)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    from talos.runinfo import git_commit, versions

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    res = pretrain(args)
    command = "python -m vision.demo.pretrain " + " ".join(shlex.quote(a) for a in argv)
    settings = dict(vars(args))
    root = Path(__file__).resolve().parents[2]  # the repository: record where it was written relative to it
    if Path(settings["out"]).resolve().is_relative_to(root):
        settings["out"] = str(Path(settings["out"]).resolve().relative_to(root))
    meta = {"command": command.strip(), "seed": args.seed, "settings": settings, "model": MODEL,
            "pool_seconds": round(res["pool_seconds"], 1), "train_seconds": round(res["train_seconds"], 1),
            "train_cpu_seconds": round(res["train_cpu_seconds"], 1),
            "final_loss": float(np.mean(res["losses"][-50:])), "zeroshot_fresh_scenes": res["zeroshot"],
            "versions": versions(), "git_commit": git_commit(), "torch_threads": args.threads,
            # CPU time is inflated, and wall time meaningless, on a shared machine: record how busy it was
            "load_average": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}
    out = Path(args.out)
    sha = save_checkpoint(res["model"], out, meta)
    print(json.dumps({k: meta[k] for k in ("command", "train_seconds", "final_loss", "zeroshot_fresh_scenes")}, indent=1))
    print(f"saved {out} ({out.stat().st_size / 2**20:.2f} MiB, sha256 {sha[:12]})")
    return meta


if __name__ == "__main__":
    main()
