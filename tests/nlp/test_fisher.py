"""Fisher scores of LMs: the vectorised path equals the one-example-at-a-time reference on tiny T5 and GPT-2,
with no parameter on the slow fallback; the T5LayerNorm / RMS-norm and Conv1D rules on their own."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import talos
from nlp.datasets import get_examples
from nlp.models import decoder_start_id, eligible_parameters
from talos.fisher import rms_norm_rule
from nlp.scoring import RankCollator, choice_log_likelihoods

from .conftest import tiny


def _close(fast, ref, names):
    for n in names:
        scale = ref[n].abs().max().clamp_min(1e-30)
        assert ((fast[n] - ref[n]).abs().max() / scale) < 1e-4, n


@pytest.mark.parametrize("name", ["talos-tiny-t5", "talos-tiny-gpt2"])
@pytest.mark.parametrize("target", ["log_prob", "logit"])
def test_fast_path_equals_reference_on_eligible_params(synth, tok, caplog, name, target):
    model, kind = tiny(name, tok)
    loc = str(synth[0])
    exs = get_examples("synth_qa", "val", data_location=loc)[:4] + get_examples("synth_para", "val", data_location=loc)[:3]
    col = RankCollator(tok, kind, 64, decoder_start_id(model, tok) if kind == "seq2seq" else None)
    batches = [col(exs[:4]), col(exs[4:])]
    eligible = eligible_parameters(model)
    with caplog.at_level(logging.WARNING, logger="talos"):
        fast = talos.fisher_scores(model, batches, choice_log_likelihoods, params=eligible, target=target, draws=2,
                                   generator=torch.Generator().manual_seed(0))
    assert "fallback" not in caplog.text  # every eligible tensor (q/k/v/o, FF, norms, Conv1D) on the fast path
    ref = talos.fisher_scores_reference(model, batches, choice_log_likelihoods, params=eligible, target=target,
                                        draws=2, generator=torch.Generator().manual_seed(0))
    _close(fast, ref, eligible)
    assert all(float(ref[n].sum()) > 0 for n in eligible)


def test_eligible_parameters_of_t5_and_gpt2(tok):
    t5, _ = tiny("talos-tiny-t5", tok)
    el = set(eligible_parameters(t5))
    names = dict(t5.named_parameters())
    frozen = set(names) - el
    assert frozen == {"shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    assert {"encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.1.layer.1.EncDecAttention.v.weight",
            "decoder.block.1.layer.2.DenseReluDense.wo.weight", "encoder.final_layer_norm.weight"} <= el
    gpt2, _ = tiny("talos-tiny-gpt2", tok)
    el = set(eligible_parameters(gpt2))
    assert set(dict(gpt2.named_parameters())) - el == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert "transformer.h.0.attn.c_attn.weight" in el and "transformer.ln_f.bias" in el


class _Wrap(nn.Module):
    """Scores [B, C] from a norm or Conv1D layer applied to [B, T, H, D] / [B, T, D] inputs."""

    def __init__(self, layer: nn.Module, d_out: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(d_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).reshape(x.shape[0], -1, self.head.in_features).mean(1))


def test_rms_norm_rule_matches_reference(caplog):
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    norm = T5LayerNorm(6, eps=1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    model = _Wrap(norm, 6)
    x = [torch.randn(5, 3, 2, 6) * 3, torch.randn(4, 3, 2, 6)]  # extra token dims, batch first
    kw = dict(params=["layer.weight"], target="log_prob", generator=None)
    with caplog.at_level(logging.WARNING, logger="talos"):
        fast = talos.fisher_scores(model, x, lambda m, b: m(b), **{**kw, "generator": torch.Generator().manual_seed(1)})
    assert "fallback" not in caplog.text
    ref = talos.fisher_scores_reference(model, x, lambda m, b: m(b), **{**kw, "generator": torch.Generator().manual_seed(1)})
    torch.testing.assert_close(fast["layer.weight"], ref["layer.weight"], rtol=1e-5, atol=1e-8)
    # the rule itself: Σ_i (Σ_t g ⊙ x̂)²
    g, xi = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    xhat = xi * torch.rsqrt(xi.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm_rule(norm, (xi,), g)["weight"], (g * xhat).sum(1).square().sum(0))


def test_conv1d_rule_matches_reference(caplog):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = _Wrap(Conv1D(7, 5), 7)  # y = x @ W + b, W [5, 7]
    x = [torch.randn(6, 4, 5), torch.randn(3, 4, 5)]
    names = ["layer.weight", "layer.bias"]
    with caplog.at_level(logging.WARNING, logger="talos"):
        fast = talos.fisher_scores(model, x, lambda m, b: m(b), params=names,
                                   generator=torch.Generator().manual_seed(2))
    assert "fallback" not in caplog.text
    ref = talos.fisher_scores_reference(model, x, lambda m, b: m(b), params=names,
                                        generator=torch.Generator().manual_seed(2))
    for n in names:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_family_rms_norms_and_rope_on_the_fast_path(synth, tok, caplog, arch):
    """Decoder-only models with RMS norms and rotary positions: packed scores equal per-choice sums (position
    ids continue the prompt's), and the Fisher fast path covers every eligible tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    eligible = eligible_parameters(model)
    assert "model.layers.0.input_layernorm.weight" in eligible and "model.layers.1.self_attn.v_proj.weight" in eligible
    assert "lm_head.weight" not in eligible and "model.embed_tokens.weight" not in eligible
    exs = get_examples("synth_qa", "val", data_location=str(synth[0]))[:5]
    col = RankCollator(tok, "causal", 64)
    model.eval()
    with torch.no_grad():
        got = choice_log_likelihoods(model, col(exs))
        ex = exs[0]
        x = tok(ex.prompt)["input_ids"]
        for c, ch in enumerate(ex.choices):
            y = tok(" " + ch, add_special_tokens=False)["input_ids"]
            logp = model(input_ids=torch.tensor([x + y])).logits[0].log_softmax(-1)
            assert abs(float(got[0, c]) - sum(float(logp[len(x) - 1 + j, t]) for j, t in enumerate(y))) < 1e-4
    batches = [col(exs[:3]), col(exs[3:])]
    with caplog.at_level(logging.WARNING, logger="talos"):
        fast = talos.fisher_scores(model, batches, choice_log_likelihoods, params=eligible, target="log_prob",
                                   generator=torch.Generator().manual_seed(0))
    assert "fallback" not in caplog.text
    ref = talos.fisher_scores_reference(model, batches, choice_log_likelihoods, params=eligible, target="log_prob",
                                        generator=torch.Generator().manual_seed(0))
    _close(fast, ref, eligible)


def _official_nlp_scores(model, batches, names, generator):
    """Transcription of the official nlp TaLoS scorer (nlp/pruners.py at b99d422): per batch, draw one choice
    per example from Categorical(logits=choice scores), then one backward per example of the drawn choice's
    summed log-likelihood itself (not its log-softmax), summing squared gradients."""
    params = dict(model.named_parameters())
    scores = {n: torch.zeros_like(params[n]) for n in names}
    for batch in batches:
        logits = choice_log_likelihoods(model, batch)  # [B, C]
        drawn = talos.fisher.draw_labels(logits, 1, generator)  # same sampler as the library: [B, 1]
        samples = logits.gather(1, drawn)
        for i in range(logits.shape[0]):
            grads = torch.autograd.grad(samples[i].sum(), [params[n] for n in names], retain_graph=True,
                                        allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    scores[n] += g.pow(2)
    return scores


def test_nlp_default_fisher_target_is_the_official_rule(synth, tok):
    from nlp.args import build_parser

    default = build_parser().parse_args([]).fisher_target
    assert default == "logit"
    model, kind = tiny("talos-tiny-t5", tok)
    loc = str(synth[0])
    exs = get_examples("synth_qa", "val", data_location=loc)[:5]
    col = RankCollator(tok, kind, 64, decoder_start_id(model, tok))
    batches = [col(exs)]
    names = eligible_parameters(model)
    ours = talos.fisher_scores(model, batches, choice_log_likelihoods, params=names, target=default,
                               generator=torch.Generator().manual_seed(3))
    official = _official_nlp_scores(model, batches, names, torch.Generator().manual_seed(3))
    _close(ours, official, names)
    other = talos.fisher_scores(model, batches, choice_log_likelihoods, params=names, target="log_prob",
                                generator=torch.Generator().manual_seed(3))
    assert any(float((other[n] - official[n]).abs().max()) > 1e-3 * float(official[n].abs().max()) for n in names)
