"""Weights tied between nn.Embedding and nn.Linear owners (LM heads; talos.fisher_tied) and the closed-form sdpa
mask gradient of talos.fisher_direct: exact against a brute-force one-example-at-a-time loop, on the fast path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from talos import fisher_direct as fd

from .test_fisher_direct import _causal
from .test_fisher_direct import _check as check_default_params


def _check(model, batches, fwd, target="logit", draws=1, seed=0):
    """Default params: scores equal brute force to 1e-5 (per tensor); returns fisher_scores' report."""
    return check_default_params(model, batches, fwd, target=target, draws=draws, seed=seed, rtol=1e-5)


class TinyLM(nn.Module):
    """Token embedding tied to the LM head; a second embedding module and a second head call share it too."""

    def __init__(self, V=11, D=6, padding_idx=None, positions="last"):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.emb2 = nn.Embedding(V, D)
        self.emb2.weight = self.emb.weight
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        self.positions = positions

    def forward(self, ids):  # ids [B, T] -> scores [B, V]
        h = torch.tanh(self.mix(self.emb(ids) + 0.5 * self.emb2(ids.flip(1)))).cumsum(1)  # examples independent
        logits = self.head(h)  # [B, T, V]
        if self.positions == "last":
            return logits[:, -1]
        return logits.mean(1) + 0.1 * self.head(h[:, 0])  # every position, and the head called twice


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_tied_embedding_and_head_exact_on_the_tied_path(positions, padding_idx):
    torch.manual_seed(0)
    model = TinyLM(padding_idx=padding_idx, positions=positions)
    ids = [torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (3, 5))]
    ids[0][0, :2] = 0  # padding tokens (and repeated ids within an example)
    rep = _check(model, ids, lambda m, b: m(b), target="log_prob", draws=2)
    assert rep["fallback"] == set()
    assert rep["tied"] == {"emb.weight"}


class UnseenUse(TinyLM):
    """The tied weight is also used directly in the parent's forward: a use the module hooks do not see."""

    def forward(self, ids):
        return super().forward(ids) + F.linear(self.emb(ids).mean(1), self.emb.weight)


def test_unseen_use_of_a_tied_weight_fails_the_check_and_falls_back_exactly():
    torch.manual_seed(0)
    rep = _check(UnseenUse(), [torch.randint(0, 11, (4, 5))], lambda m, b: m(b))
    assert rep["fallback"] == {"emb.weight"}


class ScaledEmbedding(nn.Embedding):
    """A subclass changing the forward: not a plain nn.Embedding, so not the tied path."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


def test_embedding_subclass_is_followed_generically_and_exact():
    torch.manual_seed(0)
    model = TinyLM()
    model.emb2 = ScaledEmbedding(11, 6)
    model.emb2.weight = model.emb.weight
    rep = _check(model, [torch.randint(0, 11, (3, 4))], lambda m, b: m(b))
    assert rep["fallback"] == set() and rep.get("tied", set()) == set()
    assert "emb.weight" in rep["direct"]


def test_gpt2_tied_lm_head():
    pytest.importorskip("transformers")
    model = _causal("gpt2", vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    rep = _check(model, [torch.randint(0, 40, (4, 6)), torch.randint(0, 40, (3, 6))], lambda m, b: m(b),
                 target="log_prob")
    assert rep["fallback"] == set()
    assert rep["tied"] == {"lm.transformer.wte.weight"}


def test_t5_shared_embeddings_and_relative_bias_through_sdpa():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_ff=24, d_kv=8, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    t5 = transformers.T5ForConditionalGeneration(cfg)

    def fwd(m, ids):  # two decoder positions: the decoder's relative bias has a gradient too
        start = torch.zeros(ids.shape[0], 2, dtype=torch.long)
        return m(input_ids=ids, decoder_input_ids=start).logits[:, -1]

    calls = []
    orig = fd._sdpa_mask_grads
    try:
        fd._sdpa_mask_grads = lambda *a: calls.append(1) or orig(*a)
        rep = _check(t5, [torch.randint(0, 40, (3, 5)), torch.randint(0, 40, (2, 5))], fwd)
    finally:
        fd._sdpa_mask_grads = orig
    assert rep["fallback"] == set()
    assert rep["tied"] == {"shared.weight"}
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in rep["direct"]
    assert calls  # the relative bias reached sdpa as its additive mask


@pytest.mark.parametrize("mask_shape", [(1, 2, 5, 5), (2, 5, 5), (5, 5), (1, 1, 5, 5), (2, 1, 5), (1, 2, 1, 1)])
def test_sdpa_mask_closed_form_matches_the_vmapped_vjp(mask_shape):
    torch.manual_seed(0)
    B, H, L, E = 3, 2, mask_shape[-1], 4  # L = 1: a single key (zero gradient, short cut)
    q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
    u = torch.randn(*mask_shape, requires_grad=True)
    tr = fd.DirectTracker(B)
    tr.add_root(u, "u")
    tr.start()
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=u, scale=0.7)
    tr.stop()
    (use,) = tr.uses
    g = torch.randn_like(y)[1:3]
    fast = fd._sdpa_mask_grads(use, g, slice(1, 3))
    assert fast is not None
    orig = fd._sdpa_mask_grads
    try:
        fd._sdpa_mask_grads = lambda *a: None  # force the generic vmapped vjp
        ref = fd._replay_grads(use, g, slice(1, 3))
    finally:
        fd._sdpa_mask_grads = orig
    assert fast[0].shape == ref[0].shape == (2, *mask_shape)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)


def test_sdpa_closed_form_declines_what_it_does_not_cover():
    torch.manual_seed(0)
    q, k = (torch.randn(3, 2, 5, 4) for _ in range(2))
    u = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(1, 2, 5, 4, requires_grad=True)
    tr = fd.DirectTracker(3)
    tr.add_root(u, "u")
    tr.add_root(w, "w")
    tr.start()
    F.scaled_dot_product_attention(q, k, k, attn_mask=u)  # covered
    F.scaled_dot_product_attention(q, k, w)  # a batch-free value tensor
    F.scaled_dot_product_attention(q, k, k, attn_mask=u, dropout_p=0.5)  # dropout
    tr.stop()
    g = torch.randn(3, 2, 5, 4)
    got = [fd._sdpa_mask_grads(use, g, slice(0, 3)) is not None for use in tr.uses]
    assert got == [True, False, False]
