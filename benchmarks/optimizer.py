"""Benchmark: full training-step time and optimizer-state bytes of dense AdamW vs MaskedAdamW (CPU)."""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from talos.optim import MaskedAdamW, masked_state_bytes

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "optimizer_cpu.json"


def build_model() -> nn.Module:
    """Small open_clip ViT-B/32-like image tower (width 256, 6 layers) + a 10-way linear head."""
    from open_clip.transformer import VisionTransformer

    vit = VisionTransformer(
        image_size=224, patch_size=32, width=256, layers=6, heads=4, mlp_ratio=4.0, output_dim=128
    )
    return nn.Sequential(vit, nn.Linear(128, 10))


def random_masks(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Independent Bernoulli(density) mask for every parameter tensor."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}


def make_variants(template: nn.Module, masks: dict, lr: float, wd: float) -> dict[str, tuple]:
    """name -> (model, optimizer); every model starts from the same weights."""
    variants = {}
    m = copy.deepcopy(template)
    # foreach=None picks torch's default for CPU tensors (the single-tensor loop).
    variants["dense AdamW"] = (m, torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd))
    for label, layout in (("MaskedAdamW compact", "compact"), ("MaskedAdamW dense-masked", "dense")):
        m = copy.deepcopy(template)
        opt = MaskedAdamW(m.named_parameters(), masks, lr=lr, weight_decay=wd, state_layout=layout)
        variants[label] = (m, opt)
    return variants


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """One forward/backward/step; returns (full step seconds, optimizer.step seconds)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def time_variants(variants: dict[str, tuple], x: torch.Tensor, y: torch.Tensor, warmup: int,
                  steps: int) -> dict[str, list[tuple[float, float]]]:
    """Per variant, (full step s, optimizer.step s) of each timed step after ``warmup`` untimed ones."""
    # Round-robin over variants so background load perturbs all of them alike.
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for i in range(warmup + steps):
        for name, (model, opt) in variants.items():
            t = train_step(model, opt, x, y)
            if i >= warmup:
                times[name].append(t)
    return times


def summarize(variants: dict[str, tuple], times: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """One result row per variant: medians, minima, ratios to dense AdamW, optimizer-state bytes."""
    base = statistics.median(t[0] for t in times["dense AdamW"])
    base_min = min(t[0] for t in times["dense AdamW"])
    rows = []
    for name, (model, opt) in variants.items():
        step = statistics.median(t[0] for t in times[name])
        # min is reported too: with other processes on the same cores it is the least noisy.
        step_min = min(t[0] for t in times[name])
        rows.append(dict(
            variant=name,
            step_median_s=step,
            opt_step_median_s=statistics.median(t[1] for t in times[name]),
            step_ratio_vs_dense=step / base,
            step_min_s=step_min,
            opt_step_min_s=min(t[1] for t in times[name]),
            step_min_ratio_vs_dense=step_min / base_min,
            state_bytes=masked_state_bytes(opt),
            step_times_s=[t[0] for t in times[name]],
            opt_step_times_s=[t[1] for t in times[name]],
        ))
    return rows


def print_table(rows: list[dict]) -> None:
    """The rows as a markdown table (times in ms, state in MiB, ratios to the first row's state)."""
    dense_bytes = rows[0]["state_bytes"]
    print(
        "| variant | step median (ms) | step / dense | step min (ms) | min / dense "
        "| opt.step median (ms) | opt.step min (ms) | state (MiB) | state / dense |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['step_median_s'] * 1e3:.1f} | {r['step_ratio_vs_dense']:.3f} "
            f"| {r['step_min_s'] * 1e3:.1f} | {r['step_min_ratio_vs_dense']:.3f} "
            f"| {r['opt_step_median_s'] * 1e3:.2f} | {r['opt_step_min_s'] * 1e3:.2f} "
            f"| {r['state_bytes'] / 2**20:.2f} | {r['state_bytes'] / dense_bytes:.3f} |"
        )


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a markdown table and write the JSON results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    template = build_model()
    n_params = sum(p.numel() for p in template.parameters())
    masks = random_masks(template, args.density, args.seed + 1)
    n_train = sum(int(m.sum()) for m in masks.values())
    variants = make_variants(template, masks, lr=1e-3, wd=0.1)

    g = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    rows = summarize(variants, time_variants(variants, x, y, args.warmup, args.steps))

    print(
        f"\nViT w256 L6 p32 + Linear(128,10): {n_params:,} params, {n_train:,} trainable "
        f"({n_train / n_params:.1%}), batch {args.batch}, {args.threads} threads, "
        f"median of {args.steps} steps after {args.warmup} warm-up\n"
    )
    print_table(rows)
    result = dict(
        config=dict(vars(args), out=str(args.out)),
        model="open_clip VisionTransformer(224, patch 32, width 256, layers 6, heads 4, mlp 4.0, out 128) + Linear(128, 10)",
        n_params=n_params,
        n_trainable=n_train,
        torch=torch.__version__,
        machine=platform.machine(),
        target="MaskedAdamW step <= 1.10x dense AdamW step",
        results=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
