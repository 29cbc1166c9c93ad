"""Exact per-example squared gradients of parameters that no layer rule covers, from the operations consuming them.

Class and register tokens, positional embeddings, projection matrices, scales and gates are used directly in a
parent module's ``forward`` (``x + self.positional_embedding``, ``self.class_embedding.expand(B, 1, -1)``,
``x @ self.proj``), an ``nn.Embedding`` may be called with position ids shared by the batch, and a weight may be
tied between layers. Their per-example gradients are rebuilt here without a per-example backward through the
network:

* during the one batched forward a ``TorchFunctionMode`` follows each such parameter through the operations
  that depend on it alone (views, casts, ``expand`` without batch, an ``nn.Embedding`` of shared ids: "tainted",
  batch-free tensors ``u``) up to the first operation whose output ``y`` carries the batch (dim 0 = B): that
  operation (``y = u + x``, ``y = u.expand(B, ...)``, ``y = x @ u``, ``scores += u``) is recorded with its
  arguments; when no parameter is used directly in a parent's forward, only a followed layer's output (an
  embedding of shared ids) is watched, as a :class:`_Followed` tensor subclass, and the rest of the forward
  runs unobserved;
* the single backward of the scoring also returns ``g = d(sum_i s_i)/dy``, whose row ``i`` is ``d s_i / d y_i``
  (examples do not interact);
* the recorded operation is replayed on one example at a time, vectorised with ``torch.func.vmap`` over
  ``torch.func.vjp`` (the batch-carrying arguments sliced to their row ``i``, a size argument equal to B set to
  1), giving ``d s_i / d u`` for every ``i`` at the cost of one batched backward of that operation;
* those per-example gradients go back through the batch-free chain to the parameter with one vmapped backward
  (``is_grads_batched``), and are squared and summed, a chunk of examples at a time.

A consistency check guards exactness: the per-example gradients must sum to the batch gradient of the same
backward, otherwise (a use the mode could not see) the parameter is reported and scored by the exact
per-example backward loop instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

#: in-place operations replayable out of place (their gradient w.r.t. the added tensor ignores the target)
_INPLACE_ADD = {"add_": "add", "sub_": "sub", "__iadd__": "__add__", "__isub__": "__sub__"}
#: in-place Python operators (other dunders, ``__mul__``, ``__getitem__``, are out of place)
_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and",
                                             "or", "xor", "lshift", "rshift")}
#: operations that may give a batch-free tensor its batch dim from a size argument
_EXPANDING = {"expand", "broadcast_to", "repeat", "tile"}
#: more batch-free tensors than this derived from one parameter means the batch was not found: give up on it
_MAX_TAINTED = 512


@dataclass
class _Use:
    """One operation where batch-free tensors derived from scored parameters meet the batch."""

    func: Callable
    flat: list  # flattened (args, kwargs); tensors detached
    spec: Any
    tainted: list[int]  # slots holding tainted tensors
    batched: list[int]  # slots holding batch-first tensors (sliced per example on replay)
    size_slot: int | None  # slot of an int size argument equal to B (expand/repeat), set to 1 on replay
    keys: list[int]  # id of the tainted tensor in each tainted slot
    output: Tensor  # y (graph-attached): its gradient is requested in the scoring backward
    version: int
    arg_versions: list[tuple[Tensor, int]]


#: the tracker following :class:`_Followed` tensors right now (one scoring forward at a time)
_LIGHT: list[DirectTracker | None] = [None]


class _Followed(Tensor):
    """A batch-free tensor derived from a followed layer's output (an ``nn.Embedding`` of shared position ids).

    Only operations taking such a tensor reach the tracker (through this class's ``__torch_function__``), so the
    rest of the forward runs at full speed, unlike under the mode, which sees every operation of the forward
    (T5: its relative position bias is followed through ~1,200 operations of the stacks otherwise).
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            tracker = _LIGHT[0]
            return out if tracker is None else tracker.observe_followed(func, args, kwargs, out)


class DirectTracker(TorchFunctionMode):
    """Follows scored parameters through batch-free operations during one forward and records where they meet
    the batch (see the module docstring). ``B`` is the batch size.

    Two ways in: :meth:`add_root` + :meth:`start` (a mode that sees every operation: parameters used directly in
    a parent's forward), or :meth:`follow_output` + :meth:`start_light` (a layer's batch-free output, as a
    :class:`_Followed` tensor: only the operations on it are seen).
    """

    def __init__(self, B: int) -> None:
        super().__init__()
        self.B = B
        self.tainted: dict[int, tuple[Tensor, frozenset[str]]] = {}  # id -> (tensor, parameter names)
        self.uses: list[_Use] = []
        self.broken: set[str] = set()  # names whose consumption could not be followed
        self.count: dict[str, int] = {}
        self.entered = False

    def add_root(self, t: Tensor, name: str) -> None:
        """Follow ``t`` (a parameter's leaf tensor) as parameter ``name``."""
        prev = self.tainted.get(id(t))
        names = frozenset({name}) | (prev[1] if prev is not None and prev[0] is t else frozenset())
        self.tainted[id(t)] = (t, names)

    def start(self) -> None:
        if not self.entered:
            self.__enter__()
            self.entered = True

    def start_light(self) -> None:
        """Follow :class:`_Followed` tensors (see :meth:`follow_output`) until :meth:`stop`."""
        _LIGHT[0] = self

    def stop(self) -> None:
        if self.entered:
            self.__exit__(None, None, None)
            self.entered = False
        if _LIGHT[0] is self:
            _LIGHT[0] = None

    def follow_output(self, out: Tensor, names: Iterable[str]) -> Tensor:
        """``out`` (a batch-free layer output computed from parameters ``names``) as a followed tensor."""
        return self._follow_as(out, frozenset(names))

    def _follow_as(self, t: Tensor, names: frozenset[str]) -> Tensor:
        w = t.as_subclass(_Followed)
        self.tainted[id(w)] = (w, names)
        return w

    def observe_followed(self, func, args, kwargs, out):
        """:meth:`_observe` an operation on :class:`_Followed` tensors; its batch-free outputs stay followed."""
        self._observe(func, args, kwargs, out)

        def wrap(o):
            if isinstance(o, Tensor) and self._is_tainted(o):
                return self._follow_as(o, self.tainted.pop(id(o))[1])
            return o

        if type(out) in (tuple, list):
            return type(out)(wrap(o) for o in out)
        return wrap(out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tainted and self._touches(args) or (kwargs and self._touches(kwargs.values())):
            self._observe(func, args, kwargs, out)
        return out

    def _touches(self, xs) -> bool:
        """Cheap pre-check (every op of the forward passes here): a tainted tensor among ``xs`` or one level down."""
        t = self.tainted
        for x in xs:
            if isinstance(x, Tensor):
                if id(x) in t:
                    return True
            elif isinstance(x, (list, tuple)):
                for y in x:
                    if isinstance(y, Tensor) and id(y) in t:
                        return True
        return False

    def _observe(self, func, args, kwargs, out) -> None:
        flat, spec = tree_flatten((args, kwargs))
        hits = [k for k, x in enumerate(flat) if isinstance(x, Tensor) and self._is_tainted(x)]
        if not hits:
            return
        names = frozenset().union(*(self.tainted[id(flat[k])][1] for k in hits))
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
        outs = [o for o in outs if o.requires_grad]
        if not outs:
            return  # shape queries, detach, comparisons: no gradient flows
        B = self.B
        name = getattr(func, "__name__", "")
        others = [x for k, x in enumerate(flat) if isinstance(x, Tensor) and k not in hits]
        batch_arg = any(x.dim() >= 1 and x.shape[0] == B for x in others)
        tainted_b = any(flat[k].dim() >= 1 and flat[k].shape[0] == B for k in hits)
        o = outs[0]
        # batched: a batch-first argument, or a size argument B of an expanding op (a permute of [H, T, T]
        # position biases with H == B is not batched)
        batched = o.dim() >= 1 and o.shape[0] == B and (batch_arg or (name in _EXPANDING and not tainted_b))
        if not batched:
            seq_first = any(x.dim() >= 2 and x.shape[1] == B and x.shape[0] not in (B, 1) for x in others)
            if seq_first or _inplace(name):
                self.broken |= names  # a batch off dim 0, or a tainted tensor modified in place
                return
            for t in outs:
                self.tainted[id(t)] = (t, names)
            for n in names:
                self.count[n] = self.count.get(n, 0) + len(outs)
                if self.count[n] > _MAX_TAINTED:
                    self.broken.add(n)
            return
        inplace = _inplace(name)
        if len(outs) != 1 or (inplace and (name not in _INPLACE_ADD or 0 in hits)):
            self.broken |= names
            return
        fn = getattr(torch.Tensor, _INPLACE_ADD[name]) if inplace else func
        bslots = [k for k, x in enumerate(flat)
                  if isinstance(x, Tensor) and k not in hits and x.dim() >= 1 and x.shape[0] == B]
        size_slot = None
        if not bslots:  # the batch comes from a size argument (expand(B, ...), repeat(B, ...))
            size_slot = next((k for k, x in enumerate(flat) if type(x) is int and x == B), None)
            if size_slot is None:
                self.broken |= names
                return
        vers = [(flat[k], flat[k]._version) for k in bslots if not (inplace and k == 0)]
        dflat = [x.detach() if isinstance(x, Tensor) else x for x in flat]
        self.uses.append(_Use(fn, dflat, spec, hits, bslots, size_slot, [id(flat[k]) for k in hits], o,
                              o._version, vers))

    def _is_tainted(self, x: Tensor) -> bool:
        e = self.tainted.get(id(x))
        return e is not None and e[0] is x

    def names_of(self, use: _Use) -> frozenset[str]:
        return frozenset().union(*(self.tainted[k][1] for k in use.keys))

    def valid_uses(self) -> list[_Use]:
        """Recorded uses whose tensors were not modified in place since (else their parameters break)."""
        good = []
        for u in self.uses:
            if u.output._version != u.version or any(t._version != v for t, v in u.arg_versions):
                self.broken |= self.names_of(u)
            else:
                good.append(u)
        return [u for u in good if not (self.names_of(u) & self.broken)]


def _inplace(name: str) -> bool:
    """Whether the operation named ``name`` writes into its first argument (``add_``, ``__iadd__``)."""
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


def _sdpa_mask_grads(use: _Use, g: Tensor, rows: slice) -> tuple[Tensor] | None:
    """:func:`_replay_grads` of ``scaled_dot_product_attention(q, k, v, attn_mask=u)`` with a batch-free additive
    mask ``u`` (T5's relative position bias), in closed form; None if ``use`` is not that case.

    With P = softmax(q k^T * scale + u) and dP = g v^T ([n, H, L, S]), d s_i / d (q k^T + u) is
    P * (dP - rowsum(dP * P)), summed over the dims ``u`` broadcasts. This is the vmapped vjp without its
    per-example re-dispatch: a few batched matmuls instead of one attention backward per use per example.
    """
    if use.func is not F.scaled_dot_product_attention or use.batched[:3] != [0, 1, 2] or len(use.batched) != 3:
        return None
    args, kw = tree_unflatten(list(use.flat), use.spec)
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    opts = dict(zip(names, args[3:]), **kw)
    q, k, v = (x[rows].float() for x in args[:3])
    u = opts.get("attn_mask")
    if (len(use.tainted) != 1 or not isinstance(u, Tensor) or use.flat[use.tainted[0]] is not u
            or opts.get("dropout_p", 0.0) or opts.get("is_causal", False) or opts.get("enable_gqa", False)
            or q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2] or u.dim() > 4
            or not u.is_floating_point()):
        return None
    if k.shape[-2] == 1:  # softmax over a single key is constant: the mask gets no gradient (T5 decoding 1 token)
        return (torch.zeros(g.shape[0], *u.shape, dtype=u.dtype, device=u.device),)
    scale = opts.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = torch.softmax(q @ k.transpose(-2, -1) * scale + u.float(), dim=-1)  # [n, H, L, S]
    dp = g.float() @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    per = ds.unsqueeze(1)  # [n, 1, H, L, S]: each example's batch of one
    lead = 4 - u.dim()  # dims u broadcasts from the left
    if lead:
        per = per.sum(tuple(range(1, 1 + lead)))
    return (per.sum_to_size(ds.shape[0], *u.shape).to(u.dtype),)


def _replay_grads(use: _Use, g: Tensor, rows: slice) -> tuple[Tensor, ...]:
    """d s_i / d u for every tainted slot of ``use``, for the examples ``rows`` (``g`` is the output gradient of
    those rows, [n, ...]): each [n, *u.shape]."""
    fast = _sdpa_mask_grads(use, g, rows)
    if fast is not None:
        return fast
    flat = list(use.flat)
    if use.size_slot is not None:
        flat[use.size_slot] = 1
    primals = tuple(flat[k] for k in use.tainted)
    batch_args = [flat[k][rows] for k in use.batched]

    def one(cs: list[Tensor], gi: Tensor) -> tuple[Tensor, ...]:
        def op(*us: Tensor) -> Tensor:
            vals = list(flat)
            for k, u in zip(use.tainted, us):
                vals[k] = u
            for k, c in zip(use.batched, cs):
                vals[k] = c.unsqueeze(0)
            a, kw = tree_unflatten(vals, use.spec)
            return use.func(*a, **kw)

        _, vjp = torch.func.vjp(op, *primals)
        return vjp(gi.unsqueeze(0).to(use.output.dtype))

    return torch.func.vmap(one)(batch_args, g)


def direct_scores(
    tracker: DirectTracker,
    uses: list[_Use],
    grads: dict[int, Tensor],
    leaves: dict[str, Tensor],
    batch_grads: dict[str, Tensor | None],
    chunk_elements: int,
) -> tuple[dict[str, Tensor], set[str]]:
    """Sum over examples of squared per-example gradients of ``leaves`` ({name: leaf tensor}).

    ``grads[i]`` is the scoring backward's gradient of ``uses[i].output``; ``batch_grads`` the same backward's
    gradient of each leaf (for the consistency check). Returns the scores and the names that failed the check.
    """
    B = tracker.B
    by_leaf = {id(t): n for n, t in leaves.items()}
    widest = max([t.numel() for t in leaves.values()] +
                 [tracker.tainted[k][0].numel() for u in uses for k in u.keys] + [1])
    step = max(1, min(B, chunk_elements // widest))
    scores = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in leaves.items()}
    sums = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in leaves.items()}
    for s in range(0, B, step):
        n = min(step, B - s)
        per_u: dict[int, Tensor] = {}  # tainted tensor id -> [n, *u.shape]
        for i, u in enumerate(uses):
            g = grads.get(i)
            if g is None:
                continue
            for k, gu in zip(u.keys, _replay_grads(u, g[s : s + n], slice(s, s + n))):
                if k in per_u:
                    per_u[k].add_(gu)
                else:
                    per_u[k] = gu.contiguous()
        direct = {by_leaf[k]: v for k, v in per_u.items() if k in by_leaf}
        chain = [(tracker.tainted[k][0], v) for k, v in per_u.items() if k not in by_leaf]
        if chain:
            names = list(leaves)
            gs = torch.autograd.grad([t for t, _ in chain], [leaves[m] for m in names], [v for _, v in chain],
                                     retain_graph=True, allow_unused=True, is_grads_batched=True)
            for m, gl in zip(names, gs):
                if gl is not None:
                    direct[m] = gl if m not in direct else direct[m] + gl
        for m, pe in direct.items():
            pe = pe.float().reshape(n, *scores[m].shape)
            for j in range(n):  # fused square-and-accumulate, no [n, ...] temporary
                scores[m].addcmul_(pe[j], pe[j])
            sums[m] += pe.sum(0)
    bad = set()
    for m, ref in batch_grads.items():
        ref = torch.zeros_like(sums[m]) if ref is None else ref.float()
        tol = 1e-4 * float(ref.abs().max()) + 1e-30
        if float((sums[m] - ref).abs().max()) > tol:
            bad.add(m)
    return scores, bad
