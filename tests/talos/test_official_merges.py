"""``variant="official"`` merges against transcriptions of the official TaLoS scripts' loops (commit b99d422).

Each ``_script_*`` function below follows one official script step by step, on plain dicts of tensors, the
way those scripts mutate their ``task_vector.vector`` in place; the library's vectorised functions must agree.
"""
from __future__ import annotations

import copy

import pytest
import torch

from talos.merges import merge, negation_edits, normalizer_edits
from talos.task_vector import TaskVector

TASKS = ["Cars", "DTD", "EuroSAT"]
VISION_NEG_KEYS = "attn,mlp,conv"
LEFTOVER = {"token_embedding.weight": (50, 8), "positional_embedding": (7, 8), "ln_final.weight": (8,),
            "ln_final.bias": (8,), "text_projection": (8, 4), "logit_scale": ()}


def _shapes():
    return {"visual.class_embedding": (16,), "visual.positional_embedding": (5, 16), "visual.proj": (16, 4),
            "visual.conv1.weight": (16, 3, 4, 4), "visual.ln_pre.weight": (16,),
            "visual.transformer.resblocks.0.attn.in_proj_weight": (48, 16),
            "visual.transformer.resblocks.0.attn.in_proj_bias": (48,),
            "visual.transformer.resblocks.0.attn.out_proj.weight": (16, 16),
            "visual.transformer.resblocks.0.ln_1.weight": (16,),
            "visual.transformer.resblocks.0.mlp.c_fc.weight": (32, 16),
            "visual.transformer.resblocks.0.mlp.c_proj.bias": (16,)}


def _vectors(seed=0, leftover=True):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in TASKS:
        d = {k: torch.randn(s, generator=g) for k, s in _shapes().items()}
        # a few exact zeros and sign ties, as sparse task vectors have
        d["visual.transformer.resblocks.0.ln_1.weight"][:3] = 0.0
        if leftover:
            d.update({k: torch.zeros(s) for k, s in LEFTOVER.items()})
        out[t] = d
    return out


def _tv(vecs):
    return {t: TaskVector(copy.deepcopy(d)) for t, d in vecs.items()}


def _equal(tv: TaskVector, ref: dict, keys=None):
    for k in keys or ref:
        torch.testing.assert_close(tv[k], ref[k], rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------- transcriptions
def _script_ties_trim(vec, sparsity=0.9, keys_filter=None):
    global_scores = torch.cat([torch.flatten(v).abs() for v in vec.values()])
    threshold, _ = torch.kthvalue(global_scores, int(sparsity * global_scores.numel()))
    for key in vec:
        if keys_filter is None or any(x in key for x in keys_filter):
            vec[key].mul_(torch.where(vec[key].abs() <= threshold, 0.0, 1.0))
    return vec


def _script_ties_addition(vecs):
    tvs = [_script_ties_trim(copy.deepcopy(v)) for v in vecs.values()]
    agg = {}
    for v in tvs:
        for key in v:
            agg[key] = v[key].clone() if key not in agg else agg[key] + v[key]
    majority_sign = torch.sign(torch.cat([torch.flatten(v).abs() for v in agg.values()]).sum())
    counts, disjoint = {}, {}
    for v in tvs:
        for key in v:
            sgn_m = torch.sign(agg[key])
            sgn_m[sgn_m == 0] = majority_sign
            rows = torch.where(sgn_m > 0, v[key] > 0, v[key] < 0)
            sel = v[key] * rows
            if key not in counts:
                counts[key], disjoint[key] = (sel != 0).float(), sel
            else:
                counts[key] += (sel != 0).float()
                disjoint[key] += sel
    return {k: disjoint[k] / torch.clamp(counts[k], min=1) for k in counts}


def _script_breadcrumbs(vec, keys_filter=None):
    for key in vec:
        if keys_filter is None or any(x in key for x in keys_filter):
            tensor = vec[key]
            idx = torch.topk(torch.abs(tensor), int(tensor.shape[-1] * 0.1)).indices
            mask = torch.ones_like(tensor)
            mask.scatter_(len(tensor.shape) - 1, idx, 0.0)
            tensor.mul_(mask)
            idx = torch.topk(torch.abs(tensor), int(tensor.shape[-1] * 0.2)).indices
            mask = torch.zeros_like(tensor)
            mask.scatter_(len(tensor.shape) - 1, idx, 1)
            tensor.mul_(mask)
    return vec


def _script_tall_masks(vecs, lam):
    mtl = {k: sum(v[k] for v in vecs.values()) for k in next(iter(vecs.values()))}
    return {t: {k: torch.where(v[k].abs() > ((mtl[k] - v[k]) * lam), 1.0, 0.0) for k in v} for t, v in vecs.items()}


# --------------------------------------------------------------------------------------- TIES
def test_ties_addition_equals_the_official_script():
    vecs = _vectors()
    _equal(merge("ties", _tv(vecs), variant="official"), _script_ties_addition(vecs))


def test_ties_leftover_zeros_can_be_counted_instead_of_passed():
    vecs, small = _vectors(), _vectors(leftover=False)
    zeros = sum(torch.Size(s).numel() for s in LEFTOVER.values())
    ref = _script_ties_addition(vecs)
    got = merge("ties", _tv(small), variant="official", extra_zeros=zeros)
    _equal(got, ref, keys=list(_shapes()))
    # the zeros matter: without them fewer entries survive the global top-k
    assert merge("ties", _tv(small), variant="official").density() < got.density()


def test_ties_negation_and_normaliser_equal_the_official_scripts():
    vecs = _vectors()
    edits = negation_edits("ties", _tv(vecs), variant="official", negation_keys=VISION_NEG_KEYS)
    norm = normalizer_edits("ties", _tv(vecs), variant="official", negation_keys=VISION_NEG_KEYS)
    for t in TASKS:
        ref = _script_ties_trim(copy.deepcopy(vecs[t]), keys_filter=["attn", "mlp", "conv"])
        _equal(edits[t], ref)
        _equal(norm[t], ref)
        assert torch.equal(edits[t]["visual.class_embedding"], vecs[t]["visual.class_embedding"])  # untrimmed


def test_ties_official_zero_sign_goes_positive():
    a = {"w": torch.tensor([2.0, 1.0])}
    b = {"w": torch.tensor([-2.0, 1.0])}
    got = merge("ties", {"a": TaskVector(a), "b": TaskVector(b)}, variant="official", k=1.0)
    assert got["w"].tolist() == [2.0, 1.0]  # Σ = 0 elects +: the positive entry survives alone
    paper = merge("ties", {"a": TaskVector(a), "b": TaskVector(b)}, k=1.0)
    assert paper["w"].tolist() == [0.0, 1.0]


# --------------------------------------------------------------------------------------- DARE
def test_dare_keeps_exact_counts_and_leaves_keys_untouched():
    vecs, p = _vectors(), 0.9
    skip = "positional_embedding,text_projection,logit_scale"
    each = {t: merge("dare", {t: TaskVector(copy.deepcopy(v))}, variant="official", skip_keys=skip)
            for t, v in vecs.items()}
    for t, got in each.items():
        for k, x in vecs[t].items():
            if any(s in k for s in skip.split(",")):
                assert torch.equal(got[k], x), k  # untouched, not rescaled
            elif int(p * x.numel()) >= 1 and bool((x != 0).all()):
                kept = got[k] != 0
                assert int(kept.sum()) == x.numel() - int(p * x.numel()), k  # an exact count, per tensor
                torch.testing.assert_close(got[k][kept], x[kept] / (1 - p))
    total = merge("dare", _tv(vecs), variant="official", skip_keys=skip)
    _equal(total, {k: sum(e[k] for e in each.values()) for k in vecs["Cars"]})
    neg = negation_edits("dare", _tv(vecs), variant="official", negation_keys=VISION_NEG_KEYS)
    assert torch.equal(neg["Cars"]["visual.class_embedding"], vecs["Cars"]["visual.class_embedding"])
    w = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert int((neg["Cars"][w] != 0).sum()) == 512 - int(0.9 * 512)


# --------------------------------------------------------------------------------------- Breadcrumbs
@pytest.mark.parametrize("keys", [VISION_NEG_KEYS, "*"])
def test_breadcrumbs_equals_the_official_script(keys):
    vecs = {t: {k: v for k, v in d.items() if k != "logit_scale"} for t, d in _vectors().items()}  # 0-D: no rows
    filt = None if keys == "*" else keys.split(",")
    per_task = {t: _script_breadcrumbs(copy.deepcopy(v), filt) for t, v in vecs.items()}
    got = merge("breadcrumbs", _tv(vecs), variant="official", trim_keys=keys)
    _equal(got, {k: sum(v[k] for v in per_task.values()) for k in vecs["Cars"]})
    neg = negation_edits("breadcrumbs", _tv(vecs), variant="official", trim_keys=keys)
    for t in TASKS:
        _equal(neg[t], per_task[t])
    conv = per_task["Cars"]["visual.conv1.weight"]  # rows along the LAST dim of the 4-D conv: ⌊0.2·4⌋ = 0 kept
    assert not conv.any() and not got["visual.conv1.weight"].any()  # both key sets trim the conv ("conv", "*")


# --------------------------------------------------------------------------------------- TALL-masks / Consensus
def test_tall_masks_official_mask_and_edit():
    vecs, lam = _vectors(), 0.2
    masks = _script_tall_masks(vecs, lam)
    got = merge("tall_masks", _tv(vecs), variant="official", lam=lam)
    neg = negation_edits("tall_masks", _tv(vecs), variant="official", lam=lam)
    for t in TASKS:
        ref = {k: vecs[t][k] * masks[t][k] for k in vecs[t]}  # m_t ⊙ τ_t, not m_t ⊙ τ_MTL
        _equal(got[t], ref)
        _equal(neg[t], ref)


def test_consensus_official_keeps_the_last_tasks_mask():
    vecs, lam, k = _vectors(), 0.2, 2
    masks = _script_tall_masks(vecs, lam)
    consensus = {key: torch.where(sum(m[key] for m in masks.values()) >= k, 1.0, 0.0) for key in vecs["Cars"]}
    last = masks[TASKS[-1]]  # the loop variable the official script multiplies by
    ref = {key: sum(v[key] * consensus[key] * last[key] for v in vecs.values()) for key in vecs["Cars"]}
    _equal(merge("consensus", _tv(vecs), variant="official", k=k, lam=lam), ref)
    neg = negation_edits("consensus", _tv(vecs), variant="official", k=k, lam=lam)
    _equal(neg["DTD"], {key: vecs["DTD"][key] * masks["DTD"][key] for key in vecs["DTD"]})


# --------------------------------------------------------------------------------------- plumbing
def test_variants_validate_and_flags_carry_the_variant():
    from dataclasses import replace

    from talos.app.flags import parse
    from tests.talos.app.test_flags import TOY

    vecs = _tv(_vectors())
    with pytest.raises(ValueError, match="valid choices: paper, official"):
        merge("ties", vecs, variant="nope")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        merge("ties", vecs, variant="paper", extra_zeros=3)  # an official-only knob
    domain = replace(TOY, defaults={"ties_negation_keys": "attn,mlp,conv"})  # a domain's own default
    cfg = parse(domain, ["--device", "cpu"])
    assert cfg.merge_variant == "official"
    assert cfg.merge_hparams("ties") == {"variant": "official", "k": 0.1, "extra_zeros": 0,
                                         "negation_keys": "attn,mlp,conv"}
    assert parse(domain, ["--device", "cpu", "--merge-variant", "paper"]).merge_hparams("ties") == {
        "variant": "paper", "k": 0.1}
    assert cfg.merge_hparams("sum") == {}
    assert normalizer_edits("ties", vecs, variant="paper") is None
    assert normalizer_edits("sum", vecs, variant="official") is None


def test_official_leftover_entries_match_a_built_clip():
    import open_clip

    from vision.models import load_clip, official_leftover_entries

    model, *_ = load_clip("talos-tiny-vit", "none")
    sd = model.state_dict()
    leftover = sum(v.numel() for k, v in sd.items() if not k.startswith(("visual.", "transformer.")))
    assert official_leftover_entries("talos-tiny-vit") == leftover
    assert official_leftover_entries("ViT-B-32") == 49408 * 512 + 77 * 512 + 2 * 512 + 512 * 512 + 1
    assert open_clip  # imported for load_clip's registry
