"""Where the TaLoS calibration's time goes, round by round, beside a plain forward+backward; and its floor.

    python benchmarks/calibration_profile.py                       # cpu preset, vision and nlp, both variants, ~5 min
    python benchmarks/calibration_profile.py --domains nlp --variants exact

The calibration runs as ``benchmarks/efficiency.py --calibration-only`` times it (``get_mode("talos").masks`` on
the preset's model and batches, one thread, thread CPU time), with timers around its parts: the forward, the
backward (every layer rule runs inside it), the per-example products of linear maps
(``talos.fisher.sq_outer_sum``, inside the backward), the selection (``keep_lowest``) and the soft mask.
The ``floor`` variant replaces each per-example product by ONE batched matmul, (sum_i g_i^T a_i)^2: the cost of
the weight gradient the plain pass computes. Its masks are not TaLoS masks (a measurement only); it shows what the
calibration would cost if per-example products were as cheap as a weight gradient. Each (domain, variant) runs in
its own process; results go to ``benchmarks/results/calibration_profile_<preset>.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

if __package__ in (None, ""):  # `python benchmarks/calibration_profile.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

import talos.calibration as calibration  # noqa: E402
import talos.fisher as fisher  # noqa: E402
from benchmarks.efficiency import (  # noqa: E402
    PRESETS, Backbone, Settings, _now, build, mode_context, run_fresh_process)
from talos.io import atomic_write_json  # noqa: E402
from talos.modes import get_mode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("forward", "backward", "products", "keep_lowest", "soft_mask")


def _floor_products(g: torch.Tensor, a: torch.Tensor, ws: Any, need: torch.Tensor | None = None) -> torch.Tensor:
    """(sum_i g_i^T a_i)^2 for g [B, T, O], a [B, T, I]: one batched weight gradient, squared (not a Fisher)."""
    return (g.float().reshape(-1, g.shape[-1]).T @ a.float().reshape(-1, a.shape[-1])).square_()


@contextlib.contextmanager
def timed_parts(s: Settings, acc: Counter, floor: bool) -> Iterator[None]:
    """Within the block, the calibration's parts add their seconds to ``acc`` (module attributes patched back on
    exit; ``floor``: per-example products replaced by :func:`_floor_products`)."""

    def timer(fn: Callable, key: str) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            t = _now(s)
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] += _now(s) - t
        return run

    @contextlib.contextmanager
    def soft_mask(*args: Any, **kwargs: Any) -> Iterator[None]:
        t = _now(s)
        cm = original_soft(*args, **kwargs)
        cm.__enter__()
        acc["soft_mask"] += _now(s) - t
        try:
            yield
        finally:
            t = _now(s)
            cm.__exit__(None, None, None)
            acc["soft_mask"] += _now(s) - t

    original_soft = calibration.soft_masked
    patches = [(fisher, "sq_outer_sum", timer(_floor_products if floor else fisher.sq_outer_sum, "products")),
               (calibration, "keep_lowest", timer(calibration.keep_lowest, "keep_lowest")),
               (calibration, "soft_masked", soft_mask),
               (torch.autograd, "grad", timer(torch.autograd.grad, "backward"))]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    try:
        for m, name, new in patches:
            setattr(m, name, new)
        yield
    finally:
        for m, name, old in saved:
            setattr(m, name, old)


def profile(bb: Backbone, s: Settings, floor: bool) -> dict:
    """One calibration with its parts timed per round, and a plain forward+backward (median of 3) split the same."""
    b = build(bb, s)
    leaves = [p for n, p in b.model.named_parameters() if n in set(b.eligible)]
    acc: Counter = Counter()
    forward = b.forward_fn

    def timed_forward(model: Any, batch: Any) -> torch.Tensor:
        t = _now(s)
        out = forward(model, batch)
        acc["forward"] += _now(s) - t
        return out

    def plain() -> dict:  # as benchmarks/efficiency.py's plain pass: eval mode, gradients of the eligible tensors
        acc.clear()
        b.model.eval()
        t = _now(s)
        for batch in b.calib_batches:
            loss = timed_forward(b.model, batch).float().logsumexp(-1).sum()
            u = _now(s)
            torch.autograd.grad(loss, leaves, allow_unused=True)
            acc["backward"] += _now(s) - u
        return {"total": _now(s) - t, "forward": acc["forward"], "backward": acc["backward"]}

    plain()  # warm-up
    plains = [plain()]
    b.forward_fn = timed_forward
    rounds: list[dict] = []
    stamp = [0.0]

    def on_round(r: int, density: float, masks: Any) -> None:
        row = {"round": r, "density": density, "total": _now(s) - stamp[0], **{k: acc[k] for k in PARTS}}
        row["backward"] -= row["products"]  # the products run inside the backward (tensor hooks)
        row["rest"] = row["total"] - sum(row[k] for k in PARTS)
        rounds.append(row)
        acc.clear()
        stamp[0] = _now(s)

    acc.clear()
    with timed_parts(s, acc, floor):
        stamp[0] = _now(s)
        get_mode("talos").masks(mode_context(b, s, on_round=on_round))
    b.forward_fn = forward
    plains += [plain(), plain()]
    med = {k: statistics.median(p[k] for p in plains) for k in plains[0]}
    mean = statistics.mean
    return {"plain": med, "rounds": rounds, "ratio": mean(r["total"] for r in rounds) / med["total"],
            "ratio_without_products": mean(r["total"] - r["products"] for r in rounds) / med["total"]}


def markdown(res: dict) -> str:
    """One table per (domain, variant): plain pass, then each round's parts (seconds, thread CPU time)."""
    lines = []
    for key, r in res["profiles"].items():
        p = r["plain"]
        lines += [f"### {key}: {r['ratio']:.3f}x a plain forward+backward per example and round "
                  f"({r['ratio_without_products']:.3f}x without the per-example products)", "",
                  "| pass | total s | forward | backward | products | keep_lowest | soft mask | rest | / plain |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| plain | {p['total']:.2f} | {p['forward']:.2f} | {p['backward']:.2f} (with weight grads) "
                  "| – | – | – | – | 1.00 |"]
        for x in r["rounds"]:
            lines.append(f"| round {x['round']} (keeps {x['density']:.3f}) | {x['total']:.2f} | {x['forward']:.2f} "
                         f"| {x['backward']:.2f} | {x['products']:.2f} | {x['keep_lowest']:.2f} "
                         f"| {x['soft_mask']:.2f} | {x['rest']:.2f} | {x['total'] / p['total']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def run_job(job: dict) -> dict:
    """One ``{"backbone", "settings", "variant"}`` job in this process."""
    s = Settings(**job["settings"])
    if s.threads:
        torch.set_num_threads(s.threads)
    return profile(Backbone(**job["backbone"]), s, job["variant"] == "floor")


def run_isolated(job: dict) -> dict:
    """:func:`profile` in a fresh process (no allocator state or warm caches carried between jobs)."""
    return run_fresh_process("benchmarks.calibration_profile", job, job["settings"]["threads"],
                             f"profile {job['backbone']['name']} {job.get('variant')}")


def main(argv: list[str] | None = None) -> dict:
    """Profile every requested (domain, variant) of the preset; write the JSON and its markdown tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--domains", default="vision,nlp", help="comma-separated subset of vision,nlp")
    p.add_argument("--variants", default="exact,floor", help="comma-separated subset of exact,floor")
    p.add_argument("--out", help="JSON path (default benchmarks/results/calibration_profile_<preset>.json)")
    p.add_argument("--in-process", action="store_true", help="no process per job (tests)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        res = run_job(json.loads(args.one))
        atomic_write_json(args.out, res)
        return res
    domains, variants = args.domains.split(","), args.variants.split(",")
    if not set(domains) <= {"vision", "nlp"} or not set(variants) <= {"exact", "floor"}:
        p.error(f"--domains must be a subset of vision,nlp and --variants of exact,floor, got {domains} {variants}")
    backbones, s = PRESETS[args.preset]
    run = run_job if args.in_process else run_isolated
    res: dict[str, Any] = {"preset": args.preset, "settings": asdict(s), "profiles": {}}
    for bb in [bb for bb in backbones if bb.domain in domains]:
        for v in variants:
            r = run({"backbone": asdict(bb), "settings": asdict(s), "variant": v})
            res["profiles"][f"{bb.domain}:{bb.name}:{v}"] = r
            print(f"[{bb.domain}] {bb.name} {v}: {r['ratio']:.3f}x a plain forward+backward", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"calibration_profile_{args.preset}.json")
    atomic_write_json(out, res)
    out.with_suffix(".md").write_text(markdown(res))
    print(f"\n{markdown(res)}\nwrote {out} and {out.with_suffix('.md')}")
    return res


if __name__ == "__main__":
    main()
