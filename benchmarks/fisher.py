"""Fisher scoring cost: the anchor algorithm vs `talos.fisher_scores` vs one plain forward+backward.

Run (CPU, ~10 minutes):  python benchmarks/fisher.py --batch-sizes 8 32 64
Timings are medians of CPU time of the (single) torch thread by default (``--clock thread --threads 1``), so
other work on a shared machine does not inflate them; ``--clock wall --threads 2`` on an idle machine.
Eligible rows: an open_clip VisionTransformer (width 256, 6 layers, patch 32, image 224) with a linear head;
scored parameters are TaLoS's vision-eligible set (patch conv, attention in/out projections, MLP linears,
layer norms). Default rows (``--models``, batch ``--default-batch``): every parameter of the model scored, as
``fisher_scores(model, ...)`` is called with the default ``params=None``: the same open_clip ViT (class and
positional embeddings and ``proj`` used directly in its forward), a transformers ``CLIPVisionModel`` (width 192,
4 layers, 112 px; class embedding, position embedding of shared ids) with a linear head, and next-token logits
of T5 (tied word embeddings, relative position biases), GPT-2 (``Conv1D``, tied embeddings) and a tiny Llama
(RMS norms), all width 192, 4 layers, 24 tokens, vocabulary 2048, random init. (24, not 32: batch
detection is by shape, so a batch-free layer input whose leading dim equals the batch size, T5's [T, T]
relative-position buckets with T == B, would be taken as batched; see talos.fisher's docstring.) All three algorithms run in
this one process on the same batch, interleaved, so the ratios are comparable; the anchor (one backward per
example through the whole batch graph) is the official code's algorithm, and exactness is checked against it
(the tests check it against a brute-force one-example-at-a-time loop).
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


def _hf_clip(B: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cfg = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=3, image_size=112, patch_size=16)
            self.clip = CLIPVisionModel(cfg)
            self.head = nn.Linear(192, 10)

        def forward(self, x):
            return self.head(self.clip(pixel_values=x).pooler_output)

    return Classifier(), torch.randn(B, 3, 112, 112)


def _text_batch(B: int, T: int = 24, V: int = 2048) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


def _t5(B: int):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=2048, d_model=192, d_ff=768, d_kv=48, num_layers=4, num_heads=4,
                   feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0)

    class NextToken(nn.Module):  # first decoder position's logits [B, V]
        def __init__(self) -> None:
            super().__init__()
            self.t5 = T5ForConditionalGeneration(cfg)

        def forward(self, ids):
            start = torch.zeros(ids.shape[0], 1, dtype=torch.long)
            return self.t5(input_ids=ids, decoder_input_ids=start).logits[:, -1]

    return NextToken(), _text_batch(B)


def _causal(arch: str, B: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", vocab_size=2048, n_embd=192, n_layer=4, n_head=4, n_positions=64)
    else:
        cfg = AutoConfig.for_model("llama", vocab_size=2048, hidden_size=192, intermediate_size=512,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)

    class NextToken(nn.Module):  # last position's logits [B, V]
        def __init__(self) -> None:
            super().__init__()
            self.lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")

        def forward(self, ids):
            return self.lm(input_ids=ids).logits[:, -1]

    return NextToken(), _text_batch(B)


#: default-parameter rows: name -> build(batch) -> (model, input batch)
MODELS = {
    "open_clip-ViT": lambda B: (build_model(), torch.randn(B, 3, 224, 224)),
    "hf-CLIPVisionModel": _hf_clip,
    "T5": _t5,
    "GPT-2": lambda B: _causal("gpt2", B),
    "Llama": lambda B: _causal("llama", B),
}


def eligible(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("visual.") and n.split(".", 1)[1] not in NOT_ELIGIBLE]


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


#: the clock timings use: "thread" (CPU time of this thread; with --threads 1 every op runs on it, so time
#: taken by other processes on shared cores is not counted) or "wall"
CLOCK = {"fn": time.thread_time}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        ts.append(_once(fn))
    return statistics.median(ts)


def measure(model: nn.Module, x: torch.Tensor, names: list[str] | None, repeats: int, anchor_repeats: int) -> dict:
    """Plain fwd+bwd, fisher_scores and the anchor on one batch, interleaved ``repeats`` times (medians)."""
    batches = [x]
    leaves = [p for n, p in model.named_parameters() if names is None or n in set(names)]
    model.eval()

    def plain():
        out = model(x)
        torch.autograd.grad(out.logsumexp(-1).sum(), leaves, allow_unused=True)

    def fast(report=None):
        return fisher_scores(model, batches, forward, params=names, generator=torch.Generator().manual_seed(0),
                             report=report)

    def anchor():
        return fisher_scores_reference(model, batches, forward, params=names,
                                       generator=torch.Generator().manual_seed(0))

    report: dict = {}
    f, a = fast(report), anchor()  # warm-up, and exactness: relative max error per tensor
    top = max(float(v.abs().max()) for v in a.values())
    # per tensor, relative to its own scale; floor 1e-6 of the largest score (k_proj biases have exactly zero
    # gradient: both algorithms return rounding noise ~1e-18 there)
    err = max(float((f[n] - a[n]).abs().max()) / max(float(a[n].abs().max()), 1e-6 * top, 1e-30) for n in a)
    plain()
    tp, tf, ta = [], [], []
    for r in range(repeats):
        tp.append(_once(plain))
        tf.append(_once(fast))
        if r < anchor_repeats:
            ta.append(_once(anchor))
    t_plain, t_fast, t_anchor = (statistics.median(t) for t in (tp, tf, ta))
    return {"batch": int(x.shape[0]), "plain_fwd_bwd_s": t_plain, "fisher_scores_s": t_fast, "anchor_s": t_anchor,
            "fast_over_plain": t_fast / t_plain, "anchor_over_fast": t_anchor / t_fast, "max_rel_err": err,
            "scored_tensors": len(a), "fallback": sorted(report.get("fallback", ())),
            "direct": sorted(report.get("direct", ()))}


def _once(fn) -> float:
    clock = CLOCK["fn"]
    t0 = clock()
    fn()
    return clock() - t0


def run_defaults(models: list[str], B: int, repeats: int, anchor_repeats: int) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        model, x = MODELS[name](B)
        row = {"model": name, "params": "default (all)", **measure(model, x, None, repeats, anchor_repeats)}
        rows.append(row)
        print(f"{name} (all params), batch {B}: plain {row['plain_fwd_bwd_s']:.3f}s  fisher_scores "
              f"{row['fisher_scores_s']:.3f}s  anchor {row['anchor_s']:.3f}s  ({row['fast_over_plain']:.2f}x plain, "
              f"{row['anchor_over_fast']:.1f}x faster than anchor, err {row['max_rel_err']:.1e}, "
              f"fallback {row['fallback'] or 'none'}, followed {row['direct']})", flush=True)
    return rows


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per model, the row of the run with the median fisher/plain ratio, with every run's ratios attached."""
    out = []
    for rows in zip(*runs):
        by_ratio = sorted(rows, key=lambda r: r["fast_over_plain"])
        out.append({**by_ratio[len(by_ratio) // 2], "runs": len(rows),
                    "runs_fast_over_plain": [r["fast_over_plain"] for r in rows],
                    "runs_anchor_over_fast": [r["anchor_over_fast"] for r in rows]})
    return out


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


def markdown_defaults(rows: list[dict]) -> str:
    lines = ["| model (all parameters) | batch | plain fwd+bwd (s) | fisher_scores (s) | anchor (s) | fisher / plain | "
             "anchor / fisher | max rel err | fallback |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['plain_fwd_bwd_s']:.3f} | {r['fisher_scores_s']:.3f} | "
                     f"{r['anchor_s']:.3f} | {r['fast_over_plain']:.2f}x | {r['anchor_over_fast']:.1f}x | "
                     f"{r['max_rel_err']:.1e} | {', '.join(r['fallback']) or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[8, 32, 64], help="eligible-set rows (none: skip)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of plain and fisher_scores (median)")
    p.add_argument("--anchor-repeats", type=int, default=1, help="timed repeats of the (slow) anchor algorithm")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave torch's default)")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread",
                   help="thread: CPU time of the calling thread (needs --threads 1; robust on shared machines)")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS),
                   help="default-parameter rows (params=None)")
    p.add_argument("--default-batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=1,
                   help="measure the default rows this many times; each reports the run with the median ratio")
    p.add_argument("--out", default="benchmarks/results/fisher_cpu.json")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        p.error("--clock thread needs --threads 1 (other threads' time would not be counted)")
    CLOCK["fn"] = time.thread_time if args.clock == "thread" else time.perf_counter
    rows = run(args.batch_sizes, args.repeats, args.anchor_repeats, args.image_size) if args.batch_sizes else []
    runs = [run_defaults(args.models, args.default_batch, args.repeats, args.anchor_repeats) for _ in range(args.runs)]
    drows = median_rows(runs) if args.runs > 1 else runs[0]
    result = {
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
        "machine": platform.machine(), "processor": platform.processor(), "rows": rows, "default_rows": drows,
    }
    print(markdown(rows))
    print(markdown_defaults(drows))
    if args.out:
        from talos.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
