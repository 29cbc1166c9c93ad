"""Fisher scoring cost: the anchor algorithm vs `talos.fisher_scores` vs one plain forward+backward.

Run (CPU, ~2 minutes):  python benchmarks/fisher.py --batch-sizes 8 32 64
Model: an open_clip VisionTransformer (width 256, 6 layers, patch 32, image 224) with a linear head; scored
parameters are TaLoS's vision-eligible set (patch conv, attention in/out projections, MLP linears, layer
norms). All three algorithms run in this one process on the same batch, so the ratios are comparable.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talos.fisher import fisher_scores, fisher_scores_reference  # noqa: E402

# Dense-but-not-scored parameters of an open_clip ViT (paper-notes §1.3): trained densely, never ranked.
NOT_ELIGIBLE = ("class_embedding", "positional_embedding", "proj")


def build_model(width: int = 256, layers: int = 6, patch: int = 32, image: int = 224, classes: int = 10):
    """open_clip ViT image tower + linear head, random init."""
    from open_clip.transformer import VisionTransformer

    vit = VisionTransformer(
        image_size=image, patch_size=patch, width=width, layers=layers, heads=width // 64,
        mlp_ratio=4.0, output_dim=width // 2,
    )
    model = nn.Sequential()
    model.add_module("visual", vit)
    model.add_module("head", nn.Linear(width // 2, classes))
    return model


def eligible(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("visual.") and n.split(".", 1)[1] not in NOT_ELIGIBLE]


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(batch_sizes: list[int], repeats: int, anchor_repeats: int, image: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(image=image)
    names = eligible(model)
    rows = []
    for B in batch_sizes:
        x = torch.randn(B, 3, image, image)
        batches = [x]

        def plain():
            model.zero_grad(set_to_none=True)
            out = model(x)
            out.logsumexp(-1).sum().backward()
            model.zero_grad(set_to_none=True)

        def fast():
            fisher_scores(model, batches, forward, params=names, generator=torch.Generator().manual_seed(0))

        def anchor():
            fisher_scores_reference(model, batches, forward, params=names, generator=torch.Generator().manual_seed(0))

        t_plain = _time(plain, repeats)
        t_fast = _time(fast, repeats)
        t_anchor = _time(anchor, anchor_repeats)
        # exactness on this model too: relative max error per tensor
        a = fisher_scores_reference(model, batches, forward, params=names, generator=torch.Generator().manual_seed(0))
        f = fisher_scores(model, batches, forward, params=names, generator=torch.Generator().manual_seed(0))
        err = max(((f[n] - a[n]).abs().max() / a[n].abs().max().clamp_min(1e-30)).item() for n in names)
        rows.append({
            "batch": B, "plain_fwd_bwd_s": t_plain, "fisher_scores_s": t_fast, "anchor_s": t_anchor,
            "fast_over_plain": t_fast / t_plain, "anchor_over_fast": t_anchor / t_fast, "max_rel_err": err,
        })
        print(f"batch {B}: plain {t_plain:.3f}s  fisher_scores {t_fast:.3f}s  anchor {t_anchor:.3f}s  "
              f"({t_fast / t_plain:.2f}x plain, {t_anchor / t_fast:.1f}x faster than anchor, err {err:.1e})",
              flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| batch | plain fwd+bwd (s) | fisher_scores (s) | anchor (s) | fisher / plain | anchor / fisher | max rel err |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['plain_fwd_bwd_s']:.3f} | {r['fisher_scores_s']:.3f} | {r['anchor_s']:.3f} | "
                     f"{r['fast_over_plain']:.2f}x | {r['anchor_over_fast']:.1f}x | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of plain and fisher_scores (median)")
    p.add_argument("--anchor-repeats", type=int, default=1, help="timed repeats of the (slow) anchor algorithm")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    p.add_argument("--out", default="benchmarks/results/fisher_cpu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.batch_sizes, args.repeats, args.anchor_repeats, args.image_size)
    result = {
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(), "rows": rows,
    }
    print(markdown(rows))
    if args.out:
        from talos.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
