"""Exact per-example squared gradients of a word-embedding matrix tied between token embeddings and a linear layer.

A language model's word embeddings E [V, D] are often one tensor owned by ``nn.Embedding`` modules (input
embeddings; T5's encoder and decoder) and an ``nn.Linear`` (the LM head, logits = h E^T). Example i's gradient
is the sum of its uses: a dense head term L_i = sum_t g_it^T h_it ([V, D], g = the head's output gradient) and
sparse embedding rows S_i (non-zero only on the token ids example i uses: the embedding output gradients of
its tokens, summed per id). The score needs squares of the sums, not sums of the squares:

    sum_i (L_i + S_i)^2 = sum_i L_i^2  +  sum_i sum_{r in ids(i)} S_i[r] * (2 L_i[r] + S_i[r])

The first term is what a linear layer's rule computes (:func:`talos.fisher.sq_outer_sum`, the uses of every
linear owner concatenated along tokens, which is exact: sum_u g_u^T h_u = [g_1 ... g_U]^T [h_1 ... h_U]); the
second needs L_i only on the K (example, token id) pairs of the embedding uses, [K, D] gathered one example at
a time. So a tied weight costs about what an untied LM head costs, instead of the generic path of
:mod:`talos.fisher_direct`, which forms dense [n, V, D] per-example gradients for every use.

The modules are observed with forward hooks during the one batched forward; their output gradients come from
the same single backward. A consistency check guards exactness: the per-example gradients, summed over the
batch, must equal the batch gradient of the weight from that backward (compared through a few random
projections of its rows, which costs O(V) instead of O(V D) per use); a use the hooks did not see (the weight
used directly in some parent's forward) fails it, and the weight is then scored by the exact per-example
backward loop instead and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: columns of the random projection of the consistency check
_CHECK_COLUMNS = 4
#: relative tolerance of the consistency check (as talos.fisher_direct's)
_CHECK_RTOL = 1e-4


@dataclass
class TiedWeight:
    """A weight shared by ``nn.Embedding`` owners and (optionally) ``nn.Linear`` owners, all as ``weight``."""

    name: str
    leaf: Callable[[], Tensor]  # the tensor autograd differentiates (ParamSite.leaf)
    embeddings: list[nn.Module]
    linears: list[nn.Module]


def _plain(m: nn.Module, cls: type) -> bool:
    """``m`` is a ``cls`` whose forward is ``cls.forward`` (a subclass may scale or reshape its output)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def tied_weight(name: str, leaf: Callable[[], Tensor], owners: list[nn.Module]) -> TiedWeight | None:
    """The tied-weight plan of parameter ``name`` owned by ``owners``, or None if this path does not cover it.

    Covered: every owner holds the tensor as ``weight`` and is a plain ``nn.Embedding`` (no ``max_norm``: it
    renormalises the weight in place) or a plain ``nn.Linear``, with at least one embedding.
    """
    p = leaf()
    emb, lin = [], []
    for m in owners:
        if m._parameters.get("weight") is not p:
            return None
        if _plain(m, nn.Embedding) and m.max_norm is None:
            emb.append(m)
        elif _plain(m, nn.Linear):
            lin.append(m)
        else:
            return None
    return TiedWeight(name, leaf, emb, lin) if emb else None


@dataclass
class _TiedUse:
    linear: bool  # nn.Linear (input: activations [B, ..., D]) or nn.Embedding (input: ids [B, ...])
    padding_idx: int | None
    input: Tensor  # detached
    output: Tensor  # graph-attached: its gradient is requested in the scoring backward
    version: int


@dataclass
class TiedRecorder:
    """Records each call of the tied weights' owner modules during one forward (see the module docstring)."""

    weights: list[TiedWeight]
    active: Callable[[], bool]  # False once the forward is done (checkpointed re-runs are not recorded)
    uses: dict[str, list[_TiedUse]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    valid: list[TiedWeight] = field(default_factory=list)  # set by triage

    def install(self) -> list:
        """Forward hooks on every owner module; returns their handles (the caller removes them)."""
        handles = []
        for w in self.weights:
            for m in w.embeddings + w.linears:
                handles.append(m.register_forward_hook(lambda m, i, o, w=w: self._hook(w, m, i, o)))
        return handles

    def _hook(self, w: TiedWeight, m: nn.Module, inputs: tuple, output) -> None:
        if not self.active():
            return
        x = inputs[0] if inputs else None
        if not isinstance(output, Tensor) or not isinstance(x, Tensor):
            self.broken.add(w.name)
            return
        linear = isinstance(m, nn.Linear)
        pad = None if linear else m.padding_idx
        self.uses.setdefault(w.name, []).append(_TiedUse(linear, pad, x.detach(), output, output._version))

    def triage(self, B: int) -> list[str]:
        """Names for the exact fallback loop; the weights this path scores for this batch go to :attr:`valid`.

        A weight falls back when a use could not be trusted: output modified in place or not requiring grad,
        batch not on dim 0 of both its input and output, or an owner under a parametrization (the hooks see
        the parametrized weight, the scores are for the original tensor).
        """
        self.valid, bad = [], []
        for w in self.weights:
            ok = w.name not in self.broken and not any(
                parametrize.is_parametrized(m, "weight") for m in w.embeddings + w.linears)
            for u in self.uses.get(w.name, []):
                ok = ok and (u.output._version == u.version and u.output.requires_grad and u.input.dim() >= 1
                             and u.input.shape[0] == B and u.output.dim() >= 2 and u.output.shape[0] == B)
            (self.valid.append(w) if ok else bad.append(w.name))
        return bad

    def wanted(self) -> list[Tensor]:
        """Tensors whose gradients :meth:`add_scores` needs, in order: each use's output, then each leaf."""
        return [u.output for w in self.valid for u in self.uses.get(w.name, [])] + [w.leaf() for w in self.valid]

    def add_scores(self, grads: list[Tensor | None], scores: dict[str, Tensor], ws) -> set[str]:
        """Add the sum over examples of squared per-example gradients of the :attr:`valid` weights to
        ``scores``, from ``grads`` (the gradients of :meth:`wanted`, same order); returns the names that failed
        the consistency check (not added: the caller scores them with the exact per-example loop)."""
        n_uses = sum(len(self.uses.get(w.name, [])) for w in self.valid)
        it = iter(grads[:n_uses])
        failed = set()
        for w, leaf_grad in zip(self.valid, grads[n_uses:]):
            pairs = [(u, next(it)) for u in self.uses.get(w.name, [])]
            score, ok = _tied_score(w.leaf(), [(u, g) for u, g in pairs if g is not None], leaf_grad, ws)
            if ok:
                scores[w.name] += score
            else:
                failed.add(w.name)
        return failed


def _as_btd(t: Tensor, B: int) -> Tensor:
    return t.reshape(B, -1, t.shape[-1])


def _cat(ts: list[Tensor]) -> Tensor:
    """Concatenation along tokens (dim 1), without a copy for a single tensor."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)


def _tied_score(leaf: Tensor, pairs: list[tuple[_TiedUse, Tensor]], leaf_grad: Tensor | None,
                ws) -> tuple[Tensor, bool]:
    """(sum_i (L_i + S_i)^2 [V, D] float32, whether the per-example gradients sum to ``leaf_grad``)."""
    from .fisher import sq_outer_sum  # talos.fisher imports this module

    V, D = leaf.shape
    dev = leaf.device
    lin = [(u, g) for u, g in pairs if u.linear]
    emb = [(u, g) for u, g in pairs if not u.linear]
    B = pairs[0][0].input.shape[0] if pairs else 0
    out = torch.zeros(V, D, dtype=torch.float32, device=dev)
    if not pairs:
        return out, leaf_grad is None or not bool(leaf_grad.any())
    if lin:  # dense head terms, uses concatenated along tokens: h [B, Th, D], g [B, Th, V]
        h = _cat([_as_btd(u.input, B).float() for u, _ in lin])
        gh = _cat([_as_btd(g, B).float() for _, g in lin])
        # [Th]: positions no example's objective reaches add nothing (two reductions, no [B, Th, V] temporary)
        live = (gh.amax((0, 2)) != 0) | (gh.amin((0, 2)) != 0)
        if not bool(live.all()):  # next-token scores read one position: per-example terms of rank 1
            gh, h = gh[:, live], h[:, live]
        if gh.shape[1]:
            out += sq_outer_sum(gh, h, ws)
    ex, ids, rows = _embedding_rows(emb, B, V, D, dev)  # K (example, id) pairs, ids sorted within examples
    if ids.numel():
        cross = rows  # S (no linear use: the score is S^2)
        if lin:
            cross = rows + 2 * _head_rows(gh, h, ex, ids, B)  # S + 2 L at the same rows
        out.index_add_(0, ids, rows * cross)
    return out, _consistent((gh, h) if lin else None, ids, rows, leaf_grad, V, D, dev)


def _embedding_rows(emb: list[tuple[_TiedUse, Tensor]], B: int, V: int, D: int,
                    dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example embedding gradient rows: example [K], token id [K] and summed output gradients [K, D]."""
    if not emb:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e, torch.zeros(0, D, dtype=torch.float32, device=dev)
    idx = _cat([u.input.reshape(B, -1) for u, _ in emb])  # [B, Te]
    g = _cat([_as_btd(gu, B).float() for _, gu in emb])  # [B, Te, D]
    keep = _cat([(u.input.reshape(B, -1) != u.padding_idx) if u.padding_idx is not None
                 else torch.ones_like(u.input.reshape(B, -1), dtype=torch.bool) for u, _ in emb])
    exs = torch.arange(B, device=dev).unsqueeze(1).expand_as(idx)
    key, inv = torch.unique((exs * V + idx)[keep], return_inverse=True)  # sorted: by example, then id
    rows = torch.zeros(key.numel(), D, dtype=torch.float32, device=dev).index_add_(0, inv, g[keep])
    return key // V, key % V, rows


def _head_rows(gh: Tensor, h: Tensor, ex: Tensor, ids: Tensor, B: int) -> Tensor:
    """L_i[r] = sum_t gh[i, t, r] h[i, t] for each (example i, row r) pair: [K, D], one example at a time
    (a batched gather of h would hold K x Th x D floats)."""
    out = torch.empty(ids.numel(), h.shape[-1], dtype=torch.float32, device=h.device)
    bounds = torch.searchsorted(ex, torch.arange(B + 1, device=ex.device)).tolist()
    for i in range(B):
        s, e = bounds[i], bounds[i + 1]
        if e > s:
            torch.mm(gh[i].index_select(1, ids[s:e]).T, h[i], out=out[s:e])  # [k_i, Th] @ [Th, D]
    return out


def _consistent(head: tuple[Tensor, Tensor] | None, ids: Tensor, rows: Tensor, leaf_grad: Tensor | None, V: int, D: int,
                dev: torch.device) -> bool:
    """The per-example gradients summed over the batch equal the backward's ``leaf_grad``, through random
    projections of the rows: (sum_i L_i + S_i) R vs leaf_grad R, R [D, c] fixed Gaussian."""
    r = torch.randn(D, _CHECK_COLUMNS, generator=torch.Generator().manual_seed(0)).to(dev)
    est = torch.zeros(V, _CHECK_COLUMNS, dtype=torch.float32, device=dev)
    if head is not None:
        gh, h = head
        est += gh.reshape(-1, V).T @ (h.reshape(-1, D) @ r)  # sum_i L_i R = sum_it g_it^T (h_it R)
    if ids.numel():
        est.index_add_(0, ids, rows @ r)
    if leaf_grad is None:
        return not bool(est.any())
    lg = leaf_grad.float()
    ref = lg @ r
    # |row . r| <= |row| |r|: rounding of either side is far below this scale (no [V, D] temporary for it)
    tol = _CHECK_RTOL * float(torch.linalg.vector_norm(lg, dim=1).max() * torch.linalg.vector_norm(r, dim=0).max())
    tol += 1e-30
    return float((est - ref).abs().max()) <= tol
