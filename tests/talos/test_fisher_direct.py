"""Parameters used directly in a parent's forward, embeddings of shared ids, tied weights and transformers layers:
exact against a brute-force one-example-at-a-time loop, and never on the per-example backward fallback."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from talos import fisher_scores

from .conftest import open_clip_vit
from .test_fisher import brute_force


def _check(model, batches, fwd, target="logit", draws=1, seed=0, rtol=1e-4):
    """Default params (every parameter): scores equal brute force to ``rtol`` (per tensor); returns fisher_scores'
    report. Shared with test_fisher_tied."""
    names = [n for n, _ in model.named_parameters()]
    report: dict = {}
    fast = fisher_scores(model, batches, fwd, target=target, draws=draws, report=report,
                         generator=torch.Generator().manual_seed(seed))
    ref = brute_force(model, batches, fwd, names, target, draws, seed=seed)
    scale = max(float(r.abs().max()) for r in ref.values())
    for n in names:  # per tensor, relative to its own scale (floor: a millionth of the largest score)
        err = float((fast[n] - ref[n]).abs().max()) / max(float(ref[n].abs().max()), 1e-6 * scale)
        assert err <= rtol, f"{n}: relative error {err:.2e}"
    return report


def test_open_clip_vit_default_params_are_followed_not_fallback():
    model = open_clip_vit()
    batches = [torch.randn(3, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    rep = _check(model, batches, lambda m, b: m(b), target="log_prob", draws=2)
    assert rep["fallback"] == set()
    assert rep["direct"] == {"visual.class_embedding", "visual.positional_embedding", "visual.proj"}


def test_hf_clip_vision_embeddings_class_token_and_shared_position_ids():
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8)

    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = transformers.CLIPVisionModel(cfg)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.clip(pixel_values=x).pooler_output)

    model = Clf()
    # 5 tokens (4 patches + class token): the batch of 5 has position ids [1, 5] with T == B
    rep = _check(model, [torch.randn(4, 3, 16, 16), torch.randn(5, 3, 16, 16)], lambda m, b: m(b))
    assert rep["fallback"] == set()
    # the class token, and the position embedding (an nn.Embedding called with position ids shared by the batch)
    assert rep["direct"] == {"clip.embeddings.class_embedding", "clip.embeddings.position_embedding.weight"}


def _causal(arch: str, **kw):
    """A random-init transformers causal LM of ``arch`` whose output is the last position's logits [B, V]."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **kw)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids).logits[:, -1]

    return Last()


def test_llama_rms_norms_default_params():
    pytest.importorskip("transformers")
    model = _causal("llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                    tie_word_embeddings=False)
    ids = [torch.randint(0, 40, (3, 6)), torch.randint(0, 40, (2, 6))]
    rep = _check(model, ids, lambda m, b: m(b), target="log_prob")
    assert rep["fallback"] == set() and rep["direct"] == set()  # LlamaRMSNorm has a built-in rule


@pytest.mark.parametrize("hold", [True, False])
def test_t5_tied_embeddings_and_relative_position_bias(hold, monkeypatch):
    # hold=False: layer rules run inside the backward, which is asked for the lowest layers only (the decoder's
    # layers are not below the encoder's), as for large captures
    transformers = pytest.importorskip("transformers")
    if not hold:
        monkeypatch.setattr("talos.fisher._HOLD_GRADS_BELOW", 0)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_ff=24, d_kv=8, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
    t5 = transformers.T5ForConditionalGeneration(cfg)

    def fwd(m, ids):
        return m(input_ids=ids, decoder_input_ids=torch.zeros(ids.shape[0], 1, dtype=torch.long)).logits[:, -1]

    rep = _check(t5, [torch.randint(0, 40, (3, 5)), torch.randint(0, 40, (2, 5))], fwd)
    assert rep["fallback"] == set()
    assert "shared.weight" in rep["direct"]  # tied: encoder and decoder embeddings and the LM head
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in rep["direct"]


class SeqFirstScale(nn.Module):
    """A parameter added to sequence-first activations: not followed (batch off dim 0), so the exact fallback."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.p = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 2)

    def forward(self, x):  # (B, T, 3)
        h = torch.tanh(self.inp(x).transpose(0, 1) + self.p)  # (T, B, 4)
        return self.out(h.mean(0))


def test_unfollowable_use_falls_back_exactly_and_is_reported():
    torch.manual_seed(0)
    rep = _check(SeqFirstScale(), [torch.randn(4, 5, 3)], lambda m, b: m(b))
    assert rep["fallback"] == {"p"}


def test_gpt2_conv1d_without_nlp_and_talos_does_not_import_transformers():
    pytest.importorskip("transformers")
    code = textwrap.dedent("""
        import sys, torch
        import talos
        assert "transformers" not in sys.modules, "import talos must not import transformers"
        from transformers import AutoConfig, AutoModelForCausalLM
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("gpt2", vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16)
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        fwd = lambda m, b: m(input_ids=b).logits[:, -1]
        ids = [torch.randint(0, 40, (4, 6))]
        rep = {}
        fast = talos.fisher_scores(lm, ids, fwd, report=rep, generator=torch.Generator().manual_seed(0))
        ref = talos.fisher_scores_reference(lm, ids, fwd, generator=torch.Generator().manual_seed(0))
        assert "nlp" not in sys.modules and "nlp.models" not in sys.modules
        assert rep["fallback"] == set(), rep
        assert rep["direct"] == {"transformer.wte.weight", "transformer.wpe.weight"}, rep  # tied LM head; wpe
        top = max(float(r.abs().max()) for r in ref.values())
        for n in ref:
            err = float((fast[n] - ref[n]).abs().max()) / max(float(ref[n].abs().max()), 1e-6 * top)
            assert err < 1e-4, (n, err)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


class SharedPositions(nn.Module):
    """Token embeddings plus position embeddings of ids shared by the batch ([T] ids), reshaped batch-free
    before meeting the batch; ``inplace`` modifies the followed tensor in place (not followable)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(7, 6)
        self.out = nn.Linear(6, 3)
        self.inplace = inplace

    def forward(self, ids):  # (B, T)
        p = self.pos(torch.arange(ids.shape[1]))  # (T, 6), batch-free
        p = (p.unsqueeze(0) * 0.5)[:, :, :6]  # (1, T, 6): still batch-free
        if self.inplace:
            p.mul_(2.0)
        return self.out(torch.tanh(self.tok(ids) + p)).mean(1)


@pytest.mark.parametrize("inplace", [False, True])
def test_embedding_of_shared_ids_is_followed_without_the_mode(inplace, monkeypatch):
    # no parameter is used directly in a parent's forward: only the followed layer's output is watched (a tensor
    # subclass), never the whole forward (DirectTracker.start enters the mode); an in-place change of the followed
    # tensor is seen and sends the parameter to the exact fallback
    from talos import fisher_direct

    entered = []
    monkeypatch.setattr(fisher_direct.DirectTracker, "start", lambda self: entered.append(self))
    torch.manual_seed(0)
    rep = _check(SharedPositions(inplace), [torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (3, 5))],
                 lambda m, b: m(b))
    assert entered == [] and fisher_direct._LIGHT[0] is None
    assert rep["fallback"] == ({"pos.weight"} if inplace else set())
    assert ("pos.weight" in rep["direct"]) != inplace
