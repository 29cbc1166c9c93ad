"""Rank classification: packed choice log-likelihoods equal per-choice forward passes; the training loss."""
from __future__ import annotations

import pytest
import torch

from nlp.datasets import get_examples
from nlp.models import decoder_start_id
from nlp.scoring import Example, RankCollator, answer_loss, choice_log_likelihoods, predict, token_log_likelihoods

from .conftest import tiny


def _examples(synth):
    loc = str(synth[0])
    # 4-choice and 2-choice tasks in one batch: padded choice slots must score -inf
    return get_examples("synth_qa", "val", data_location=loc)[:3] + get_examples("synth_para", "val", data_location=loc)[:2]


def _hand_scores(model, kind, tok, examples):
    """Sum of log p(answer token | prefix) from one plain forward per (example, choice)."""
    C = max(len(e.choices) for e in examples)
    out = torch.full((len(examples), C), float("-inf"))
    with torch.no_grad():
        for i, ex in enumerate(examples):
            for c, ch in enumerate(ex.choices):
                if kind == "seq2seq":
                    x = torch.tensor([tok(ex.prompt)["input_ids"]])
                    y = tok(text_target=ch)["input_ids"]  # ends with </s>: scored too
                    logp = model(input_ids=x, labels=torch.tensor([y])).logits[0].log_softmax(-1)
                    out[i, c] = sum(float(logp[t, tok_id]) for t, tok_id in enumerate(y))
                else:
                    x = tok(ex.prompt)["input_ids"]
                    y = tok(" " + ch, add_special_tokens=False)["input_ids"]
                    logp = model(input_ids=torch.tensor([x + y])).logits[0].log_softmax(-1)
                    out[i, c] = sum(float(logp[len(x) - 1 + j, tok_id]) for j, tok_id in enumerate(y))
    return out


@pytest.mark.parametrize("name", ["talos-tiny-t5", "talos-tiny-gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_scores_equal_per_choice_sums(synth, tok, name, attn):
    model, kind = tiny(name, tok, attn)
    model.eval()
    exs = _examples(synth)
    col = RankCollator(tok, kind, 64, decoder_start_id(model, tok) if kind == "seq2seq" else None)
    with torch.no_grad():
        got = choice_log_likelihoods(model, col(exs))
    want = _hand_scores(model, kind, tok, exs)
    assert got.shape == (5, 4)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # 2-choice rows: slots 2, 3 are -inf
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    # each example scores the same alone as inside a padded batch
    with torch.no_grad():
        for i, e in enumerate(exs):
            alone = choice_log_likelihoods(model, col([e]))[0]
            torch.testing.assert_close(alone, got[i, : len(e.choices)], rtol=1e-5, atol=1e-5)


def test_scores_are_sums_not_means(tok):
    """A longer answer gets the sum of its token log-likelihoods (no length normalisation)."""
    model, kind = tiny("talos-tiny-t5", tok)
    model.eval()
    col = RankCollator(tok, kind, 64, decoder_start_id(model, tok))
    b = col([Example("What color is the sky?", ("blue", "the blue river"), 0)])
    with torch.no_grad():
        per_token = token_log_likelihoods(model, b)  # [1, 2, L]
        scores = choice_log_likelihoods(model, b)
    assert b["target_mask"].sum(-1).tolist() == [[2, 4]]  # "blue </s>" and "the blue river </s>"
    torch.testing.assert_close(scores, per_token.sum(-1))


def test_answer_loss_is_token_mean_cross_entropy(synth, tok):
    model, kind = tiny("talos-tiny-t5", tok)
    model.eval()
    exs = _examples(synth)
    b = RankCollator(tok, kind, 64, decoder_start_id(model, tok), only_label=True)(exs)
    labels = b["targets"][:, 0].masked_fill(~b["target_mask"][:, 0], -100)
    enc = RankCollator(tok, kind, 64, decoder_start_id(model, tok))(exs)
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        torch.testing.assert_close(answer_loss(model, b), ref, rtol=1e-5, atol=1e-6)


def test_prediction_and_truncation(tok):
    model, kind = tiny("talos-tiny-gpt2", tok)
    col = RankCollator(tok, kind, 8)
    b = col([Example("the river stone tree house road city bird window morning", ("yes", "no"), 1)])
    assert b["input_ids"].shape[1] == 8 + 2 * 1  # prompt cut to 8 tokens (its end kept), 2 one-token blocks
    assert predict(model, b).shape == (1,)
    s2s = RankCollator(tok, "seq2seq", 8, 0)(
        [Example("the river stone tree house road city bird window morning", ("yes",), 0)])
    assert s2s["input_ids"].shape[1] == 8 and int(s2s["input_ids"][0, -1]) == tok.eos_token_id  # </s> kept


def test_causal_answers_follow_the_joint_tokenization(synth, tok):
    """Without a special token after the prompt (GPT-2 style), an answer's tokens are what "prompt answer"
    tokenizes to after the prompt's tokens, and the score is log p(answer | prompt) of that one sequence."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    raw.post_processor = None  # no </s> appended
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    model, kind = tiny("talos-tiny-gpt2", plain)
    model.eval()
    ex = get_examples("synth_coref", "val", data_location=str(synth[0]))[0]
    b = RankCollator(plain, kind, 64)([ex])
    with torch.no_grad():
        got = choice_log_likelihoods(model, b)[0]
        for c, ch in enumerate(ex.choices):
            x, whole = plain(ex.prompt)["input_ids"], plain(ex.prompt + " " + ch)["input_ids"]
            y = whole[len(x):]
            assert b["targets"][0, c, : len(y)].tolist() == y and int(b["target_mask"][0, c].sum()) == len(y)
            logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            want = sum(float(logp[len(x) - 1 + j, t]) for j, t in enumerate(y))
            assert abs(float(got[c]) - want) < 1e-4
