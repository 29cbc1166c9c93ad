"""Rank classification for seq2seq and causal LMs: packed answer-choice batches and their log-likelihoods.

The score of answer choice c of example i is the SUM of its token log-likelihoods given the prompt (no length
normalisation); the prediction is the arg-max over choices. Training is teacher-forced cross-entropy on the
correct choice's tokens (the same computation with one choice per example).

All choices of an example are packed into ONE sequence with a block-diagonal causal attention mask, so every
layer sees a batch of B examples (not B x C choice sequences). This is what lets ``talos.fisher_scores``
take its vectorised path (it needs the batch on dim 0 of every layer's activations), and it is cheaper: the
encoder (seq2seq) or the prompt (causal LM) is run once per example instead of once per choice.

* seq2seq (T5): encoder on the prompt [B, T]; decoder on C blocks of length L, block c = [start, y_c[:-1]]
  padded, [B, C*L]; a query of block c attends to earlier positions of block c only. T5's relative position
  bias only depends on position differences, so each block is scored exactly as if it were alone.
* causal LM: [left-padded prompt | block 1 | ... | block C], [B, P + C*L]; block c attends to the prompt and
  to earlier positions of block c, with position ids continuing the prompt's, exactly as in ``prompt + y_c``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Example", "RankCollator", "choice_log_likelihoods", "answer_loss", "predict"]


@dataclass(frozen=True)
class Example:
    """One prompted example: the filled template, its answer choices and the index of the correct one."""

    prompt: str
    choices: tuple[str, ...]
    label: int


class RankCollator:
    """Turns a list of :class:`Example` into a packed batch (a dict of CPU tensors).

    ``only_label=True`` keeps only each example's correct choice (training batches). Prompts and answers are
    truncated to ``max_seq_len`` tokens (seq2seq: the end of the prompt is cut, as the T5 tokenizer does;
    causal: the beginning is cut, so the prompt still ends right before the answer).
    """

    def __init__(self, tokenizer: Any, kind: str, max_seq_len: int, decoder_start_id: int | None = None,
                 only_label: bool = False) -> None:
        if kind not in ("seq2seq", "causal"):
            raise ValueError(f"kind must be 'seq2seq' or 'causal', got {kind!r}")
        if kind == "seq2seq" and decoder_start_id is None:
            raise ValueError("seq2seq batches need decoder_start_id")
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_seq_len = int(max_seq_len)
        self.start = decoder_start_id
        self.only_label = only_label
        self.pad = int(tokenizer.pad_token_id)

    # -- tokenisation -------------------------------------------------------------------------------------
    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Untruncated prompt tokens (with the tokenizer's special tokens: T5's </s>, Llama's <s>)."""
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"]

    def _truncate_prompt(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_seq_len:
            return ids
        if self.kind == "seq2seq":  # cut the end but keep the trailing special token, as truncation=True does
            return ids[: self.max_seq_len - 1] + ids[-1:]
        return ids[-self.max_seq_len :]  # causal: keep the end, right before the answer

    def _answer_ids(self, prompts: list[str], prompt_ids: list[list[int]], answers: list[str]) -> list[list[int]]:
        """Answer tokens; ``prompts``/``prompt_ids`` hold each answer's prompt (used by causal LMs only)."""
        if self.kind == "seq2seq":
            ids = self.tokenizer(text_target=answers, add_special_tokens=True)["input_ids"]  # with </s>
            ids = [x if len(x) <= self.max_seq_len else x[: self.max_seq_len - 1] + x[-1:] for x in ids]
        else:
            # The answer continues the prompt after one space. Tokenize "prompt answer" and keep what follows
            # the prompt's own tokens, so tokenizers that merge or mark word starts (sentencepiece's "▁")
            # split the pair as they would split the running text; tokenize the answer alone if the prompt
            # tokens are not a prefix (e.g. the tokenizer appends a special token to every text).
            whole = self.tokenizer([p + " " + a for p, a in zip(prompts, answers)], add_special_tokens=True)["input_ids"]
            alone = self.tokenizer([" " + a for a in answers], add_special_tokens=False)["input_ids"]
            ids = [w[len(p):] if w[: len(p)] == p and len(w) > len(p) else a
                   for w, p, a in zip(whole, prompt_ids, alone)]
            ids = [x[: self.max_seq_len] for x in ids]
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad
        return [x if x else [eos] for x in ids]  # an empty answer still gets one scored token

    # -- packing ------------------------------------------------------------------------------------------
    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError("empty batch")
        B = len(examples)
        if self.only_label:
            choices = [[ex.choices[ex.label]] for ex in examples]
            labels = torch.zeros(B, dtype=torch.long)
        else:
            choices = [list(ex.choices) for ex in examples]
            labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        C = max(len(c) for c in choices)
        prompt_ids = self._prompt_ids([ex.prompt for ex in examples])
        owner = [i for i, cs in enumerate(choices) for _ in cs]  # example of each flattened answer
        ans = iter(self._answer_ids([examples[i].prompt for i in owner], [prompt_ids[i] for i in owner],
                                    [a for cs in choices for a in cs]))
        answers = [[next(ans) for _ in cs] for cs in choices]  # [B][C_i] token lists
        L = max(len(a) for cs in answers for a in cs)
        targets = torch.full((B, C, L), self.pad, dtype=torch.long)
        target_mask = torch.zeros(B, C, L, dtype=torch.bool)
        choice_mask = torch.zeros(B, C, dtype=torch.bool)
        for i, cs in enumerate(answers):
            for c, a in enumerate(cs):
                targets[i, c, : len(a)] = torch.tensor(a)
                target_mask[i, c, : len(a)] = True
                choice_mask[i, c] = True
        batch = {"kind": self.kind, "targets": targets, "target_mask": target_mask, "choice_mask": choice_mask,
                 "labels": labels}
        prompts = [self._truncate_prompt(p) for p in prompt_ids]
        if self.kind == "seq2seq":
            batch.update(self._pack_seq2seq(prompts, targets, C, L))
        else:
            batch.update(self._pack_causal(prompts, targets, C, L))
        return batch

    def _pack_seq2seq(self, prompts: list[list[int]], targets: Tensor, C: int, L: int) -> dict[str, Tensor]:
        B = len(prompts)
        T = max(len(p) for p in prompts)
        input_ids = torch.full((B, T), self.pad, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, : len(p)] = torch.tensor(p)
            attention_mask[i, : len(p)] = 1
        # block c of the decoder input is [start, y_c,0 .. y_c,L-2] (teacher forcing), [B, C, L] -> [B, C*L]
        dec = torch.cat([torch.full((B, C, 1), self.start, dtype=torch.long), targets[:, :, :-1]], dim=2)
        pos = torch.arange(C * L)
        same_block = (pos[:, None] // L) == (pos[None, :] // L)
        causal = pos[None, :] <= pos[:, None]
        allowed = (same_block & causal)[None, None].expand(B, 1, C * L, C * L)  # [B, 1, C*L, C*L]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": dec.reshape(B, C * L),
                "decoder_allowed": allowed}

    def _pack_causal(self, prompts: list[list[int]], targets: Tensor, C: int, L: int) -> dict[str, Tensor]:
        B = len(prompts)
        P = max(len(p) for p in prompts)
        S = P + C * L
        input_ids = torch.full((B, S), self.pad, dtype=torch.long)
        position_ids = torch.zeros(B, S, dtype=torch.long)
        # the block inputs are the answer tokens themselves: block c position j predicts y_c,j+1, and the
        # last prompt token predicts y_c,0
        input_ids[:, P:] = targets.reshape(B, C * L)
        blk = torch.arange(C * L)
        key_block = torch.cat([torch.full((P,), -1), blk // L])  # -1 = prompt
        key_pos = torch.cat([torch.arange(P), blk % L])
        allowed = torch.zeros(B, S, S, dtype=torch.bool)
        for i, p in enumerate(prompts):
            n = len(p)
            start = P - n  # left padding
            input_ids[i, start:P] = torch.tensor(p)
            position_ids[i, start:P] = torch.arange(n)
            position_ids[i, P:] = n + blk % L
            valid_prompt = torch.zeros(S, dtype=torch.bool)
            valid_prompt[start:P] = True
            q_block, q_pos = key_block[:, None], key_pos[:, None]
            k_block, k_pos = key_block[None, :], key_pos[None, :]
            prompt_to_prompt = (q_block == -1) & (k_block == -1) & (k_pos <= q_pos) & valid_prompt[None, :] \
                & valid_prompt[:, None]
            block_to_prompt = (q_block >= 0) & valid_prompt[None, :]
            block_to_block = (q_block >= 0) & (k_block == q_block) & (k_pos <= q_pos)
            allowed[i] = prompt_to_prompt | block_to_prompt | block_to_block
            allowed[i, :start, :start] |= torch.eye(start, dtype=torch.bool)  # padding attends to itself
        # kept logits are positions P-1 .. S-1; token j of block c is predicted at P-1 (j = 0) or P + c*L + j-1
        c_idx, j_idx = blk // L, blk % L
        logit_index = torch.where(j_idx == 0, 0, 1 + c_idx * L + j_idx - 1)  # [C*L] into the kept logits
        return {"input_ids": input_ids, "position_ids": position_ids, "decoder_allowed": allowed[:, None],
                "logit_index": logit_index}


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean "may attend" mask -> additive float mask (0 / most negative finite value) accepted by both the
    eager and the sdpa attention of transformers (a bool mask would be added as 0/1 by eager attention)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM can skip the LM head on positions we do not score (transformers >= 4.50).

    Wrappers (DDP, the linearized model) forward keyword arguments unchanged, so the wrapped LM decides.
    """
    import inspect

    from talos.linearize import LinearizedModel

    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, LinearizedModel):
            model = model.model
        else:
            break
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def token_log_likelihoods(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Log-likelihood of every answer token, [B, C, L] float32 (0 at padded positions)."""
    p = next(model.parameters())
    b = _to(batch, p.device)
    targets, tmask = b["targets"], b["target_mask"]
    B, C, L = targets.shape
    mask = _additive(b["decoder_allowed"], p.dtype)
    if b["kind"] == "seq2seq":
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    decoder_input_ids=b["decoder_input_ids"], decoder_attention_mask=mask, use_cache=False)
        logits = out.logits  # [B, C*L, V]
    else:
        keep = C * L + 1  # positions P-1 .. S-1 (left padding puts the last prompt token at P-1)
        extra = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
        out = model(input_ids=b["input_ids"], attention_mask=mask, position_ids=b["position_ids"],
                    use_cache=False, **extra)
        logits = out.logits[:, -keep:][:, b["logit_index"]]  # [B, C*L, V]
    logits = logits.float()
    y = targets.reshape(B, C * L, 1)
    tok = logits.gather(-1, y).squeeze(-1) - logits.logsumexp(-1)  # [B, C*L] log p(y_t | prefix)
    return tok.reshape(B, C, L) * tmask


def choice_log_likelihoods(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Rank-classification scores [B, C]: the summed token log-likelihood of each choice (-inf where an
    example has fewer choices than the batch). This is the ``forward_fn`` of Fisher scoring (choices drawn
    with probability ∝ exp(score); the official ``logit`` target differentiates the drawn choice's score)."""
    scores = token_log_likelihoods(model, batch).sum(-1)
    return scores.masked_fill(~batch["choice_mask"].to(scores.device), float("-inf"))


def answer_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Teacher-forced cross-entropy of the correct answers: mean over all answer tokens of the batch."""
    tok = token_log_likelihoods(model, batch)  # [B, 1, L] for only_label batches
    n = batch["target_mask"].sum().clamp_min(1).to(tok.device)
    return -tok.sum() / n


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Predicted choice index per example, [B] (ties go to the first choice)."""
    return choice_log_likelihoods(model, batch).argmax(-1).cpu()
