"""The real-size dry-run driver, on tiny models: it runs the real scripts, counts what it claims, writes its table."""
from __future__ import annotations

import json

import torch

from benchmarks import paper_dryrun as dr


def test_dryrun_on_tiny_models(tmp_path):
    out = tmp_path / "out"
    records = dr.main(["--models", "talos-tiny-vit,talos-tiny-t5", "--modes", "talos,llora", "--in-process",
                       "--out", str(out), "--work", str(tmp_path / "work")])
    assert [(r["model"], r["mode"]) for r in records] == [("talos-tiny-vit", "talos"), ("talos-tiny-vit", "llora"),
                                                           ("talos-tiny-t5", "talos"), ("talos-tiny-t5", "llora")]
    by = {(r["model"], r["mode"]): r for r in records}

    # vision: eligible / dense entries counted independently from the model the scripts build
    from vision.models import ImageClassifier, load_clip, split_parameters

    clip = load_clip("talos-tiny-vit", "none")[0]
    classifier = ImageClassifier(clip.visual, torch.zeros(1, 1))
    eligible, dense = split_parameters(classifier, freeze_embeddings=False)
    named = dict(classifier.named_parameters())
    n_elig = sum(named[n].numel() for n in eligible)
    talos = by[("talos-tiny-vit", "talos")]
    assert talos["eligible_entries"] == n_elig and talos["dense_entries"] == sum(named[n].numel() for n in dense)
    z = 2 * 32  # the official global count also holds the text tower's ln_final (width 32), always kept
    assert talos["kept_entries"] == int(0.1 * (n_elig + z)) - z  # exactly the global count at sparsity 0.9
    assert talos["trainable_entries"] == talos["kept_entries"] + talos["dense_entries"]
    layers = sum(1 for n in named if n.endswith("attn.in_proj_weight"))
    assert by[("talos-tiny-vit", "llora")]["trainable_tensors"] == layers * 2 * 2  # q and v slices: A and B
    for r in records:
        assert r["steps"] == dr.STEPS and r["finetune_s"] > 0 and r["eval_s"] > 0 and r["peak_rss_gib"] > 0

    # the real on-disk layouts were used
    assert (tmp_path / "work" / "vision_data" / "EuroSAT_splits" / "train" / "Forest").is_dir()
    assert (tmp_path / "work" / "nlp_data" / "qasc" / "validation.jsonl").is_file()
    md = (out / "dryrun.md").read_text()
    assert f"| talos-tiny-vit | {n_elig:,} |" in md and "| talos-tiny-t5 | llora |" in md
    assert len(json.loads((out / "dryrun.json").read_text())) == 4
    # --resume keeps the records and runs nothing again
    again = dr.main(["--models", "talos-tiny-vit", "--modes", "talos,llora", "--in-process", "--resume",
                     "--out", str(out), "--work", str(tmp_path / "work")])
    assert again == records


def test_t5_sizes_are_the_released_ones():
    from transformers import T5Config

    cfg = T5Config()  # transformers' defaults are t5-small's
    assert dr.T5_SIZES["t5-small"] == {k: getattr(cfg, k) for k in dr.T5_SIZES["t5-small"]}
    assert dr.T5_VOCAB == cfg.vocab_size
    assert dr.domain("t5-base") == "nlp" and dr.domain("talos-tiny-t5") == "nlp" and dr.domain("ViT-L-14") == "vision"
