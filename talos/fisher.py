"""Diagonal-Fisher sensitivity scores: exact per-example squared gradients, computed in one backward pass.

TaLoS ranks every eligible weight by ``sum_i (d s_i / d theta_j)^2`` where ``s_i`` is one scalar per example
(the logit, or log-probability, of a label drawn from the model's own softmax). The official code does one
batched forward and then one ``backward(retain_graph=True)`` per example, which walks the whole batch graph B
times. Here we use the structure of the layers instead:

* one batched forward with hooks that keep each eligible layer's input ``a`` and output tensor;
* one ``torch.autograd.grad(sum_i s_i, layer_outputs)``. Because examples do not interact (no batch norm),
  row ``i`` of each output gradient is exactly ``d s_i / d output_i``. Weight gradients are never formed:
  autograd only walks the paths to the requested outputs (for large models only the lowest layers' outputs
  are requested, every other layer lies on a path to them);
* inside that backward, a hook on each layer output rebuilds the per-example weight gradients from
  ``(a_i, g_i)`` as ``g`` forms (``g_i^T a_i`` for a linear layer), in chunks of examples, squared and summed;
  so the output gradients of all layers are never held at once. Same FLOPs as the weight-gradient part of one
  backward.

Parameters without a layer rule (used directly in a parent's ``forward``: class tokens, positional
embeddings, projections, scales, gates; an embedding called with ids shared by the batch; a tied weight) are
followed through the operations that consume them up to where they meet the batch, and their per-example
gradients are rebuilt from those operations' output gradients of the same single backward
(:mod:`talos.fisher_direct`). Only what neither covers (a module called twice, an in-place-modified output, a
use that could not be followed) falls back to an exact per-example backward loop for just those parameters,
with a warning naming them; never to an approximation. Rules for more module types are added with
:func:`register_per_example_rule`; transformers' ``Conv1D`` and common RMS norms are built in, matched by
class name (:data:`RMS_NORM_CLASSES`), so neither transformers nor an adapter is imported for them.

Entry points: :func:`fisher_scores` (one pass over some batches); :class:`FisherScorer`, the same scorer built
once and run many times (calibration scores every round with one, under a soft mask placed at its
:attr:`~FisherScorer.sites`); :func:`fisher_scores_reference`, the official per-example-backward algorithm that
tests and benchmarks compare against; :func:`scoring_mode`, the eval-mode/grad-flags context both use.

Known limit: where the batch lives is read from shapes (dim 0 == B, else dim 1: sequence-first). A batch-free
layer input whose leading dim happens to equal B (T5's [T, T] relative-position buckets when T == B) is taken
as batched and scored wrongly by its layer rule; [1, T] shared position ids are recognised whatever T is.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fisher_direct import DirectTracker, direct_scores
from .fisher_tied import TiedRecorder, TiedWeight, tied_weight

logger = logging.getLogger("talos")

ForwardFn = Callable[[nn.Module, Any], Tensor]
#: rule(module, inputs, grad_output) -> {local parameter name: sum over examples of squared per-example grads}.
#: ``inputs`` and ``grad_output`` have the batch on dim 0. Rules see detached tensors.
PerExampleRule = Callable[[nn.Module, Sequence[Any], Tensor], dict[str, Tensor]]

TARGETS = ("logit", "log_prob")

#: Upper bound on the float32 elements of one block of per-example gradients ([chunk, out, in]), by device
#: type. CPU prefers cache-sized blocks (8 MiB); GPUs prefer large ones (128 MiB). A layer whose single
#: per-example gradient is larger than the bound still takes one example at a time.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**25}


# ----------------------------------------------------------------------------------------------------------
# Per-example rules. Each returns the SUM over the batch of squared per-example gradients.
# ----------------------------------------------------------------------------------------------------------
class _Workspace:
    """One reusable float32 buffer per device for per-example gradient blocks, and what the caller needs.

    Fresh multi-megabyte temporaries per layer cost more than the matmuls that fill them on CPU (page faults),
    so blocks of per-example gradients are written into this buffer instead. While a rule runs, :attr:`need`
    maps its parameters (local attribute names) to the entries whose scores the caller needs (calibration's
    entries still kept); a rule may leave the other entries at 0 (see :meth:`needed`).
    """

    def __init__(self, chunk_elements: int) -> None:
        self.chunk_elements = chunk_elements
        self._bufs: dict[torch.device, Tensor] = {}
        self.need: Mapping[str, Tensor] | None = None
        self._blocks: dict[tuple, list[tuple[Tensor, Tensor]] | None] = {}

    def get(self, numel: int, device: torch.device) -> Tensor:
        buf = self._bufs.get(device)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            self._bufs[device] = buf
        return buf

    def needed(self, attr: str) -> Tensor | None:
        """Bool mask (shaped like parameter ``attr``) of the entries whose scores are needed; None: all."""
        return None if self.need is None else self.need.get(attr)

    def need_blocks(self, need: Tensor) -> list[tuple[Tensor, Tensor]] | None:
        """:func:`_need_blocks` of ``need``, or None where computing every entry is cheaper; cached per pass
        (a pass's masks do not change, and every batch asks again)."""
        key = (need.data_ptr(), tuple(need.shape), tuple(need.stride()))
        if key not in self._blocks:
            blocks = None if bool(need.all()) else _need_blocks(need)
            if blocks is not None and sum(r.numel() * c.numel() for r, c in blocks) > _NEED_COVER * need.numel():
                blocks = None
            self._blocks[key] = blocks
        return self._blocks[key]

    def new_pass(self) -> None:
        """Forget the cached blocks (the next pass may need other entries)."""
        self._blocks.clear()


#: On CPU, per-example gradient blocks of at least this many elements are formed one example at a time (below it,
#: one bmm of all examples is cheaper; at 192 x 192 and 24 tokens the loop is 30% faster than the bmm).
_CPU_PER_EXAMPLE_MIN = 2**15
#: ... in blocks of output rows of about this many float32 elements (512 KiB: the block and its accumulator fit a
#: 2 MiB per-core L2 cache; 5-10% faster than 1 MiB blocks on ViT and T5 layer shapes, 20-30% faster than 256 KiB)
_CPU_ROW_BLOCK = 2**17
#: Entries per block of output rows when only some entries are needed (rows sorted by how many they need).
_NEED_BLOCK = 2**17
#: ... used only when the blocks cover at most this fraction of the matrix (gathering rows and columns costs)
_NEED_COVER = 0.7


def sq_outer_sum(g: Tensor, a: Tensor, ws: _Workspace, need: Tensor | None = None) -> Tensor:
    """sum_i (g_i^T a_i)^2 for g [B, T, O], a [B, T, I] -> [O, I] (float32).

    The squared per-example weight gradients of any linear map y = a W^T summed over the batch, without
    materialising more than ``ws``'s chunk of them at once. ``ws`` is the workspace a rule ``factory`` receives
    (see :func:`register_per_example_rule`); rules for new linear-like layers build on this. ``need`` (bool
    [O, I], e.g. ``ws.needed("weight")``): only those entries are computed, the others are 0.
    """
    g, a = g.float(), a.float()
    if g.shape[1] > 1 and not (bool(g[:, 0].any()) and bool(g[:, -1].any())):
        # positions whose output gradient is 0 in every example add nothing (a causal LM's next-token score reads
        # one position, a ViT's last block matters at its class token only): drop them before the matmuls. Looked
        # for only when the first or the last position is such a one (a cheap test; either way exact)
        live = (g.amax(dim=(0, 2)) != 0) | (g.amin(dim=(0, 2)) != 0)  # [T]; no |g| temporary
        if not bool(live.all()):
            idx = live.nonzero().squeeze(1)
            g, a = g.index_select(1, idx), a.index_select(1, idx)
    # one position: the whole matrix is a single matmul (see _sq_outer_sum_dense), cheaper than any blocks
    blocks = None if need is None or g.shape[1] == 1 else ws.need_blocks(need)
    if blocks is not None:
        return _sq_outer_sum_needed(g, a, ws, need.shape, blocks)
    return _sq_outer_sum_dense(g, a, ws)


def _sq_outer_sum_dense(g: Tensor, a: Tensor, ws: _Workspace) -> Tensor:
    """:func:`sq_outer_sum` of every entry (float32 inputs)."""
    B, T, O = g.shape
    I = a.shape[-1]
    if T == 1:
        # a single position per example: (g_i a_i^T)^2 = g_i^2 (a_i^2)^T, so the sum is one matmul.
        return g[:, 0].square().T @ a[:, 0].square()
    out = torch.zeros(O, I, dtype=torch.float32, device=g.device)
    gt = g.transpose(1, 2)  # (B, O, T), a view: BLAS reads the transposed operand in place
    if g.device.type == "cpu" and O * I >= _CPU_PER_EXAMPLE_MIN:
        # CPU, large blocks: one example at a time, squared and accumulated in one fused pass (addcmul_), over
        # blocks of output rows of about 1 MiB so that the accumulator block stays in cache across the examples
        # (about 1.5x faster than whole-matrix per-example blocks, which stream [O, I] through memory B times).
        rb = max(8, min(O, _CPU_ROW_BLOCK // I))
        pe = ws.get(rb * I, g.device)[: rb * I].view(rb, I)
        gts, As = gt.unbind(0), a.unbind(0)
        for r0 in range(0, O, rb):
            ob = out[r0 : r0 + rb]
            p = pe[: ob.shape[0]]
            for gi, ai in zip(gts, As):
                torch.mm(gi[r0 : r0 + rb], ai, out=p)  # rows r0.. of example i's gradient, [rb, T] @ [T, I]
                ob.addcmul_(p, p)
        return out
    step = max(1, min(B, ws.chunk_elements // max(1, O * I)))
    buf = ws.get(step * O * I, g.device)
    for s in range(0, B, step):  # loop over chunks of examples (the memory knob), not over examples
        n = min(step, B - s)
        pe = torch.bmm(gt[s : s + n], a[s : s + n], out=buf[: n * O * I].view(n, O, I))  # per-example grads
        out += pe.square_().sum(0)
    return out


def _need_blocks(need: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Blocks ``(rows, cols)`` covering the True entries of ``need`` [O, I]: rows sorted by how many entries they
    need, in blocks of about :data:`_NEED_BLOCK` entries, each with the union of its rows' needed columns.

    Calibration's later rounds need only the entries still kept, which concentrate in some rows and columns (a
    Fisher score is roughly a row scale times a column scale), so rows with alike counts share most columns.
    """
    counts = need.sum(1)
    alive = int(torch.count_nonzero(counts))
    rows = torch.argsort(counts, descending=True, stable=True)[:alive]
    rb = max(8, _NEED_BLOCK // need.shape[1])
    blocks = []
    for r0 in range(0, alive, rb):
        r = rows[r0 : r0 + rb]
        blocks.append((r, need.index_select(0, r).any(0).nonzero().squeeze(1)))
    return blocks


def _sq_outer_sum_needed(g: Tensor, a: Tensor, ws: _Workspace, shape: torch.Size,
                         blocks: list[tuple[Tensor, Tensor]]) -> Tensor:
    """:func:`sq_outer_sum` of the ``blocks`` of :func:`_need_blocks` only (every other entry 0)."""
    I = shape[1]
    out = torch.zeros(shape, dtype=torch.float32, device=g.device)
    # rows and columns gathered from [B, O, T] / [B, I, T] copies: gathering along a last dim is slow
    gt, at = g.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous()
    for r, cols in blocks:
        gb = gt.index_select(1, r)  # [B, rb, T]
        ab = at.index_select(1, cols).transpose(1, 2) if cols.numel() < I else a  # [B, T, I']
        acc = torch.zeros(r.numel(), cols.numel(), dtype=torch.float32, device=g.device)
        p = ws.get(acc.numel(), g.device)[: acc.numel()].view_as(acc)
        for gi, ai in zip(gb.unbind(0), ab.unbind(0)):
            torch.mm(gi, ai, out=p)  # the block of example i's gradient
            acc.addcmul_(p, p)
        out.index_put_((r.unsqueeze(1), cols.unsqueeze(0)), acc)
    return out


def _as_btd(t: Tensor) -> Tensor:
    """[B, ..., D] -> [B, T, D] (T = product of the middle dims, 1 if none)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _linear_rule(ws: _Workspace) -> PerExampleRule:
    def rule(m: nn.Module, inputs: Sequence[Any], g: Tensor) -> dict[str, Tensor]:
        a, g3 = _as_btd(inputs[0]), _as_btd(g)
        # the bias entry is cheap, so always computed: MHA in-projection slices have no `bias` attribute
        return {"weight": sq_outer_sum(g3, a, ws, ws.needed("weight")), "bias": g3.float().sum(1).square().sum(0)}

    return rule


def _conv2d_rule(ws: _Workspace) -> PerExampleRule:
    def rule(m: nn.Module, inputs: Sequence[Any], g: Tensor) -> dict[str, Tensor]:
        x = inputs[0]
        # unfold: (B, Cin*kh*kw, L) patches, L = Ho*Wo, so the conv is a linear map per patch position.
        a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        a = a.transpose(1, 2)  # (B, L, Cin*kh*kw)
        g3 = g.flatten(2).transpose(1, 2)  # (B, L, Cout)
        need = ws.needed("weight")
        need = None if need is None else need.reshape(need.shape[0], -1)  # [Cout, Cin*kh*kw], as unfolded
        out = {"weight": sq_outer_sum(g3, a, ws, need).view_as(m.weight)}
        if m.bias is not None:
            out["bias"] = g3.float().sum(1).square().sum(0)
        return out

    return rule


def _norm_rule(normalize: Callable[[nn.Module, Tensor], Tensor]) -> PerExampleRule:
    """Rule for y = normalize(x) * weight (+ bias) with elementwise affine over the trailing dims."""

    def rule(m: nn.Module, inputs: Sequence[Any], g: Tensor) -> dict[str, Tensor]:
        w = m.weight
        xhat = normalize(m, inputs[0].float())
        g = g.float()
        nd = w.dim()
        red = tuple(range(1, g.dim() - nd))  # token dims between batch and normalised dims
        out = {"weight": (g * xhat).sum(red).square().sum(0) if red else (g * xhat).square().sum(0)}
        if getattr(m, "bias", None) is not None:
            out["bias"] = (g.sum(red) if red else g).square().sum(0)
        return out

    return rule


def _layer_norm_hat(m: nn.Module, x: Tensor) -> Tensor:
    return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


def _rms_norm_hat(m: nn.Module, x: Tensor) -> Tensor:
    return F.rms_norm(x, m.normalized_shape, None, m.eps)


def _embedding_rule(m: nn.Module, inputs: Sequence[Any], g: Tensor) -> dict[str, Tensor]:
    idx = inputs[0].reshape(inputs[0].shape[0], -1)  # (B, T) token ids
    B, T = idx.shape
    D = m.weight.shape[1]
    V = m.weight.shape[0]
    g = g.reshape(B, T, D).float()
    keep = torch.ones_like(idx, dtype=torch.bool)
    if m.padding_idx is not None:
        keep = idx != m.padding_idx  # the padding row never receives gradient
    ex = torch.arange(B, device=idx.device).unsqueeze(1).expand(B, T)
    key = (ex * V + idx)[keep]  # one key per (example, token id): per-example gradient rows
    uniq, inv = torch.unique(key, return_inverse=True)
    rows = torch.zeros(uniq.numel(), D, dtype=torch.float32, device=g.device)
    rows.index_add_(0, inv, g[keep])
    out = torch.zeros(V, D, dtype=torch.float32, device=g.device)
    out.index_add_(0, uniq % V, rows.square_())
    return {"weight": out}


@dataclass
class _RuleSpec:
    factory: Callable[["_Workspace"], PerExampleRule]
    accepts: Callable[[nn.Module], bool] = lambda m: True


_RULES: dict[type, _RuleSpec] = {}


def register_per_example_rule(
    module_type: type,
    rule: PerExampleRule | None = None,
    *,
    factory: Callable[[_Workspace], PerExampleRule] | None = None,
    accepts: Callable[[nn.Module], bool] | None = None,
) -> None:
    """Teach :func:`fisher_scores` the per-example gradients of ``module_type``'s own parameters.

    ``rule(module, inputs, grad_output)`` receives the module's forward inputs and the gradient of its (single
    tensor) output, batch first, and returns ``{param attr: sum_i (d s_i / d param)^2}``. ``factory(workspace)``
    may be given instead to build a rule that shares the per-call workspace (see :func:`sq_outer_sum`).
    ``accepts(module)`` can refuse instances the rule does not cover (they then use the exact fallback).
    """
    if (rule is None) == (factory is None):
        raise ValueError("give exactly one of rule= or factory=")
    fac = factory if factory is not None else (lambda _ws, r=rule: r)
    _RULES[module_type] = _RuleSpec(fac, accepts or (lambda m: True))


register_per_example_rule(nn.Linear, factory=_linear_rule)
register_per_example_rule(
    nn.Conv2d,
    factory=_conv2d_rule,
    accepts=lambda m: m.groups == 1 and not isinstance(m.padding, str) and m.padding_mode == "zeros",
)
register_per_example_rule(
    nn.LayerNorm, _norm_rule(_layer_norm_hat), accepts=lambda m: m.elementwise_affine
)
if hasattr(nn, "RMSNorm"):
    register_per_example_rule(
        nn.RMSNorm,
        _norm_rule(_rms_norm_hat),
        accepts=lambda m: m.elementwise_affine and m.eps is not None,
    )
register_per_example_rule(nn.Embedding, _embedding_rule, accepts=lambda m: m.max_norm is None)


# ----------------------------------------------------------------------------------------------------------
# Rules for layers of other libraries, matched by qualified class name at scoring time (so neither that library
# nor a domain adapter has to be imported first, and `import talos` never imports them).
# ----------------------------------------------------------------------------------------------------------
def _rms_eps(m: nn.Module) -> float:
    eps = getattr(m, "variance_epsilon", None)
    return float(getattr(m, "eps") if eps is None else eps)


def rms_norm_rule(m: nn.Module, inputs: Sequence[Any], g: Tensor) -> dict[str, Tensor]:
    """Per-example rule of y = w * x / sqrt(mean(x^2) + eps) (no mean subtraction, float32 variance).

    ``inputs[0]`` and ``g`` are [B, ..., D]; the per-example gradient of w is sum_tokens g * xhat ([B, D]),
    whose squares summed over the batch are returned. T5LayerNorm and the Llama/Qwen/Mistral RMS norms.
    """
    x = inputs[0].float()
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _rms_eps(m))  # [B, ..., D]
    B, D = x.shape[0], x.shape[-1]
    per_example = (g.float() * xhat).reshape(B, -1, D).sum(1)  # [B, D]
    return {"weight": per_example.square().sum(0)}


def _accepts_rms(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and getattr(m, "bias", None) is None


def _conv1d_rule(ws: _Workspace) -> PerExampleRule:
    """transformers' ``Conv1D`` (GPT-2): y = x @ W + b with W [in, out], a linear layer with a transposed weight."""

    def rule(m: nn.Module, inputs: Sequence[Any], g: Tensor) -> dict[str, Tensor]:
        a, g3 = _as_btd(inputs[0]), _as_btd(g)  # [B, T, in], [B, T, out]
        # sum_i (g_i^T a_i)^2 is [out, in]; the weight is stored [in, out]
        need = ws.needed("weight")
        return {"weight": sq_outer_sum(g3, a, ws, None if need is None else need.T).T.contiguous(),
                "bias": g3.float().sum(1).square().sum(0)}

    return rule


#: transformers classes computing exactly ``weight * rms_normalise(x)`` (Gemma's ``1 + weight`` is not one).
RMS_NORM_CLASSES = tuple(
    f"transformers.models.{m}.modeling_{m}.{c}"
    for m, c in (("t5", "T5LayerNorm"), ("mt5", "MT5LayerNorm"), ("llama", "LlamaRMSNorm"),
                 ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm"), ("qwen3", "Qwen3RMSNorm"),
                 ("mixtral", "MixtralRMSNorm"), ("phi3", "Phi3RMSNorm"))
)
_NAMED_RULES: dict[str, _RuleSpec] = {
    "transformers.pytorch_utils.Conv1D": _RuleSpec(_conv1d_rule),
    **{n: _RuleSpec(lambda _ws: rms_norm_rule, _accepts_rms) for n in RMS_NORM_CLASSES},
}


def register_per_example_rule_by_name(qualified_name: str, rule: PerExampleRule | None = None, *,
                                      factory: Callable[[_Workspace], PerExampleRule] | None = None,
                                      accepts: Callable[[nn.Module], bool] | None = None) -> None:
    """Like :func:`register_per_example_rule`, for a class named ``module.QualName`` (not imported here)."""
    if (rule is None) == (factory is None):
        raise ValueError("give exactly one of rule= or factory=")
    fac = factory if factory is not None else (lambda _ws, r=rule: r)
    _NAMED_RULES[qualified_name] = _RuleSpec(fac, accepts or (lambda m: True))


def _find_rule(m: nn.Module, ws: _Workspace) -> PerExampleRule | None:
    for cls in type(m).__mro__:
        spec = _RULES.get(cls) or _NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if spec is not None:
            return spec.factory(ws) if spec.accepts(m) else None
    return None


# ----------------------------------------------------------------------------------------------------------
# Plan: which parameters are scored, by which module, and how.
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ParamSite:
    """Where a parameter lives: ``module._parameters[attr]`` is the tensor named ``name`` (the first module
    owning it, in ``model.modules()`` order, for a tied weight)."""

    name: str  # canonical parameter name (as in model.named_parameters())
    module: nn.Module
    attr: str

    def leaf(self) -> Tensor:
        """The tensor autograd differentiates: the original parameter even under a parametrization."""
        par = getattr(self.module, "parametrizations", None)
        if par is not None and self.attr in par:
            return par[self.attr].original
        return self.module._parameters[self.attr]


@dataclass
class _Plan:
    targets: dict[str, ParamSite]
    # modules scored by a rule: id(module) -> (module, rule, {attr: name})
    ruled: dict[int, tuple[nn.Module, PerExampleRule, dict[str, str]]] = field(default_factory=dict)
    mha: dict[int, tuple[nn.Module, dict[str, str]]] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)  # static fallback names
    direct: list[str] = field(default_factory=list)  # followed through the ops consuming them (fisher_direct)
    tied: list[TiedWeight] = field(default_factory=list)  # embedding/LM-head tied weights (fisher_tied)


def _mha_supported(m: nn.MultiheadAttention) -> bool:
    return m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None and not m.add_zero_attn


def resolve_params(model: nn.Module, params: Iterable[str] | None = None) -> list[str]:
    """Names of the parameters to score: ``params`` validated, or every parameter that requires grad."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        names = list(dict.fromkeys(params))
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter names: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    bad = [n for n in names if not named[n].is_floating_point()]
    if bad:
        raise ValueError(f"non floating-point parameters cannot be scored: {bad}")
    if not names:
        raise ValueError("no parameters to score")
    return names


def _locate(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[ParamSite, list[nn.Module]]]:
    """Each name's site and every module owning the tensor (more than one: a tied weight)."""
    owners: dict[int, list[nn.Module]] = {}
    attr_of = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(mod)
                attr_of.setdefault((id(mod), id(p)), attr)
    named = dict(model.named_parameters())
    out = {}
    for n in names:
        p = named[n]
        mods = list({id(m): m for m in owners[id(p)]}.values())
        out[n] = (ParamSite(n, mods[0], attr_of[(id(mods[0]), id(p))]), mods)
    return out


def locate_params(model: nn.Module, names: Sequence[str]) -> dict[str, ParamSite]:
    """``{name: ParamSite}`` for parameter ``names`` of ``model`` (KeyError for an unknown name)."""
    return {n: site for n, (site, _) in _locate(model, names).items()}


def _build_plan(model: nn.Module, names: Sequence[str], ws: _Workspace) -> _Plan:
    # nn.MultiheadAttention uses its out_proj weights functionally (the Linear's forward never runs), so
    # out_proj parameters are scored by the MHA's own observable forward.
    mha_of_out = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    plan = _Plan(targets={})
    for n, (site, mods) in _locate(model, names).items():
        mod, attr = site.module, site.attr
        plan.targets[n] = site
        if len(mods) > 1:  # tied weight: per-example grads of both uses must be summed before squaring
            tied = tied_weight(n, site.leaf, mods)  # embeddings + LM head; anything else: followed
            if tied is not None:
                plan.tied.append(tied)
            else:
                plan.direct.append(n)
        elif isinstance(mod, nn.MultiheadAttention):
            if _mha_supported(mod) and attr in ("in_proj_weight", "in_proj_bias"):
                plan.mha.setdefault(id(mod), (mod, {}))[1][attr] = n
            else:
                plan.fallback.append(n)
        elif id(mod) in mha_of_out:
            parent = mha_of_out[id(mod)]
            if _mha_supported(parent):
                plan.mha.setdefault(id(parent), (parent, {}))[1]["out_proj." + attr] = n
            else:
                plan.fallback.append(n)
        else:
            rule = _find_rule(mod, ws)
            if rule is None:  # used directly in a parent's forward (tokens, embeddings, scales, gates)
                plan.direct.append(n)
            else:
                plan.ruled.setdefault(id(mod), (mod, rule, {}))[2][attr] = n
    return plan


# ----------------------------------------------------------------------------------------------------------
# Capturing activations during the forward.
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Capture:
    key: int  # id of the owning module
    module: nn.Module
    names: dict[str, str]  # local attr -> canonical name
    rule: PerExampleRule
    inputs: tuple
    output: Tensor
    version: int
    rows: slice | None = None  # for MHA in-projection slices


class _Recorder:
    def __init__(self) -> None:
        self.active = True  # False once the forward is done (recomputations are not recorded)
        self.captures: list[_Capture] = []
        self.calls: dict[int, int] = {}
        self.invalid: set[int] = set()
        self.B: int | None = None  # batch size: dim 0 of the first tensor the model is called with
        self.tracker: DirectTracker | None = None
        self.followed: dict[int, list[str]] = {}  # ruled modules called without batch: names followed instead
        self.tied: TiedRecorder | None = None

    def add(self, cap: _Capture) -> None:
        self.captures.append(cap)

    def stop(self) -> None:
        """End of the forward: record nothing more (checkpointed blocks re-run their forward in the backward)."""
        self.active = False
        if self.tracker is not None:
            self.tracker.stop()


def _mha_forward(
    mha: nn.MultiheadAttention,
    names: dict[str, str],
    rec: _Recorder,
    ws: _Workspace,
    original: Callable,
) -> Callable:
    """An exact re-implementation of ``nn.MultiheadAttention.forward`` whose projections are observable."""
    lin_rule = _linear_rule(ws)
    in_names = {k: v for k, v in (("weight", names.get("in_proj_weight")), ("bias", names.get("in_proj_bias"))) if v}
    out_names = {
        k: v for k, v in (("weight", names.get("out_proj.weight")), ("bias", names.get("out_proj.bias"))) if v
    }

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if query.dim() != 3 or (mha.training and mha.dropout > 0):
            if rec.active:
                rec.invalid.add(id(mha))
            return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if rec.active:
            rec.calls[id(mha)] = rec.calls.get(id(mha), 0) + 1
        same = query is key and key is value
        if not mha.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        E, H = mha.embed_dim, mha.num_heads
        hd = E // H
        W, b = mha.in_proj_weight, mha.in_proj_bias

        def proj(x: Tensor, rows: slice) -> Tensor:
            y = F.linear(x, W[rows], None if b is None else b[rows])
            if in_names and rec.active:
                rec.add(_Capture(id(mha), mha, in_names, lin_rule, (x.detach(),), y, y._version, rows))
            return y

        if same:
            q, k, v = proj(query, slice(0, 3 * E)).chunk(3, dim=-1)
        else:
            q, k, v = proj(query, slice(0, E)), proj(key, slice(E, 2 * E)), proj(value, slice(2 * E, 3 * E))
        B, L, S = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
        k = k.reshape(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
        v = v.reshape(B, S, H, hd).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        if need_weights:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, H, L, S)
            if mask is not None:
                logits = logits + mask
            attn = logits.softmax(-1)
            o = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            weights = None
        o = o.transpose(1, 2).reshape(B, L, E)  # (B, L, E)
        out = F.linear(o, mha.out_proj.weight, mha.out_proj.bias)
        if out_names and rec.active:
            rec.add(_Capture(id(mha.out_proj), mha.out_proj, out_names, lin_rule, (o.detach(),), out, out._version))
        if not mha.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    return forward


def _merge_masks(attn_mask, key_padding_mask, B, H, L, S, dtype) -> Tensor | None:
    """Turn nn.MultiheadAttention's masks (bool True = blocked, or additive floats) into one additive mask."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        return m.to(dtype)

    out = None
    if attn_mask is not None:
        m = additive(attn_mask)
        out = m.view(B, H, L, S) if m.dim() == 3 else m.view(1, 1, L, S)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(B, 1, 1, S)
        out = kp if out is None else out + kp
    return out


def _first_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
    return next((x for x in list(args) + list(kwargs.values()) if isinstance(x, Tensor)), None)


def _follow(rec: _Recorder, plan: _Plan, names: Iterable[str]) -> None:
    """Follow ``names`` through the operations of the rest of this forward (talos.fisher_direct).

    With no parameter used directly in a parent's forward (``plan.direct`` empty), only followed layers' outputs
    are followed (:meth:`DirectTracker.follow_output`), and no mode watches the whole forward.
    """
    if rec.B is None:
        return
    if rec.tracker is None:
        rec.tracker = DirectTracker(rec.B)
    if not plan.direct:
        rec.tracker.start_light()
        return
    for n in names:
        rec.tracker.add_root(plan.targets[n].leaf(), n)
    rec.tracker.start()


def _unbatched_call(rec: _Recorder, x: Any) -> bool:
    """A ruled layer called without the batch (an embedding of position ids shared by the batch, a linear map of
    learned queries): its parameters are followed through the ops instead of scored by its rule."""
    if not (rec.active and rec.B is not None and isinstance(x, Tensor) and x.dim() >= 1):
        return False
    # [1, T] position ids are shared even when T == B; [T, B, ...] is sequence-first
    seq_first = x.dim() >= 2 and x.shape[1] == rec.B and x.shape[0] != 1
    return x.shape[0] != rec.B and not seq_first


def _hook_ruled(rec: _Recorder, plan: _Plan) -> list:
    """Forward hooks of the ruled layers: capture (inputs, output) per call, or follow an unbatched call.

    Under the mode (``plan.direct``), following must start before the layer runs (a pre-hook, so the mode sees
    the layer's own operation); otherwise the layer's output is followed (light way, see :func:`_follow`) and
    one post-hook per layer does everything.
    """
    handles = []
    for key, (mod, rule, names) in plan.ruled.items():

        def pre(m, args, kwargs, key=key, names=names):
            if _unbatched_call(rec, _first_tensor(args, kwargs)):
                rec.followed[key] = list(names.values())
                _follow(rec, plan, names.values())

        def hook(m, args, kwargs, output, key=key, rule=rule, names=names):
            if not rec.active:
                return None
            if not plan.direct and key not in rec.followed and _unbatched_call(rec, _first_tensor(args, kwargs)):
                rec.followed[key] = list(names.values())
                _follow(rec, plan, names.values())
            if key in rec.followed:
                tr = rec.tracker
                if tr is not None and not tr.entered and isinstance(output, Tensor):
                    return tr.follow_output(output, names.values())  # the light way (see _follow)
                return None
            rec.calls[key] = rec.calls.get(key, 0) + 1
            if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
                rec.invalid.add(key)
                return None
            ins = tuple(x.detach() if isinstance(x, Tensor) else x for x in args)
            rec.add(_Capture(key, m, names, rule, ins, output, output._version))
            return None

        if plan.direct:
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    return handles


@contextmanager
def _recording(model: nn.Module, plan: _Plan, ws: _Workspace) -> Iterator[_Recorder]:
    rec = _Recorder()
    handles = []
    patched = []
    try:

        def root_pre(m, args, kwargs):
            if rec.active and rec.B is None:
                x = _first_tensor(args, kwargs)
                if x is not None and x.dim() >= 1:
                    rec.B = int(x.shape[0])
                    if plan.direct:
                        _follow(rec, plan, plan.direct)

        handles.append(model.register_forward_pre_hook(root_pre, with_kwargs=True))
        handles += _hook_ruled(rec, plan)
        for key, (mha, names) in plan.mha.items():
            # An instance attribute shadows the class's forward for this call only; removed in `finally`.
            previous = mha.__dict__.get("forward")
            mha.forward = _mha_forward(mha, names, rec, ws, mha.forward)
            patched.append((mha, previous))
        if plan.tied:
            rec.tied = TiedRecorder(plan.tied, lambda: rec.active)
            handles += rec.tied.install()
        yield rec
    finally:
        if rec.tracker is not None:
            rec.tracker.stop()
        for h in handles:
            h.remove()
        for mha, previous in patched:
            if previous is None:
                del mha.__dict__["forward"]
            else:
                mha.forward = previous


# ----------------------------------------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------------------------------------
def check_scoring_args(target: str, draws: int) -> None:
    """ValueError unless ``target`` is one of :data:`TARGETS` and ``draws`` a positive integer."""
    if target not in TARGETS:
        raise ValueError(f"unknown Fisher target {target!r}; valid choices: {', '.join(TARGETS)}")
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")


def draw_labels(scores: Tensor, draws: int, generator: torch.Generator | None) -> Tensor:
    """Labels drawn from softmax(scores): LongTensor [B, draws] on scores' device.

    Sampling runs on the CPU so a CPU generator gives the same draws whatever the model's device.
    """
    probs = torch.softmax(scores.detach().float(), dim=-1).cpu()
    return torch.multinomial(probs, draws, replacement=True, generator=generator).to(scores.device)


def per_example_objective(scores: Tensor, labels: Tensor, target: str) -> Tensor:
    """The scalar differentiated for each example and draw: [B, draws]."""
    if target == "log_prob":
        scores = torch.log_softmax(scores.float(), dim=-1)
    return scores.gather(1, labels)


@contextmanager
def scoring_mode(model: nn.Module, leaves: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode (deterministic scores) and grad enabled only on ``leaves``; everything restored afterwards.

    Identified by tensor identity, not name, so it also works while parametrizations rename parameters.
    """
    training = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    want = {id(p) for p in leaves}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(id(p) in want)
        with torch.enable_grad():
            yield
    finally:
        for m, t in training.items():
            m.training = t
        for p, f in flags.items():
            p.requires_grad_(f)


def _chunk_default(model: nn.Module, chunk_elements: int | None) -> int:
    if chunk_elements is not None:
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        return chunk_elements
    p = next(model.parameters(), None)
    kind = p.device.type if p is not None else "cpu"
    return DEFAULT_CHUNK_ELEMENTS.get(kind, DEFAULT_CHUNK_ELEMENTS["cuda"])


class FisherScorer:
    """The fast diagonal-Fisher scorer of :func:`fisher_scores`, built once and run over many passes.

    Building it checks the arguments, resolves the parameters to score and decides how each one is scored
    (a layer rule, the operations consuming it, or the exact fallback). :meth:`score` then adds one pass over
    some batches; call it inside :meth:`scoring` (eval mode, grads only on the scored tensors). Calibration
    scores every round with one scorer, under a soft mask applied to :attr:`sites`::

        scorer = FisherScorer(model, params=names, target="logit")
        with scorer.scoring():
            scores, n_batches = scorer.score(batches, forward_fn, generator=g)

    Args:
        model: any ``nn.Module``; scoring runs it in eval mode and leaves it exactly as it was.
        params, target, draws, chunk_elements: as in :func:`fisher_scores`.
    """

    def __init__(self, model: nn.Module, *, params: Iterable[str] | None = None, target: str = "logit",
                 draws: int = 1, chunk_elements: int | None = None) -> None:
        check_scoring_args(target, draws)
        self.model = model
        self.target, self.draws = target, draws
        #: the scored parameter names, in scoring order
        self.names: list[str] = resolve_params(model, params)
        self._ws = _Workspace(_chunk_default(model, chunk_elements))
        # resolved now, before any parametrization (calibration's soft mask) renames parameters
        self._plan = _build_plan(model, self.names, self._ws)
        self._leaves = [t.leaf() for t in self._plan.targets.values()]

    @property
    def sites(self) -> dict[str, ParamSite]:
        """``{name: ParamSite}`` of the scored parameters (where to apply a parametrization)."""
        return self._plan.targets

    def scoring(self) -> contextlib.AbstractContextManager[None]:
        """:func:`scoring_mode` for the scored parameters."""
        return scoring_mode(self.model, self._leaves)

    def zeros(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """``{name: zeros shaped like the parameter}`` (an accumulator for :meth:`score`'s ``totals``)."""
        return {n: torch.zeros_like(t.leaf(), dtype=dtype) for n, t in self._plan.targets.items()}

    def score(
        self,
        batches: Iterable[Any],
        forward_fn: ForwardFn,
        *,
        generator: torch.Generator | None = None,
        batch_generator: Callable[[int], torch.Generator] | None = None,
        owns: Callable[[int], bool] | None = None,
        totals: dict[str, Tensor] | None = None,
        progress: Any = None,
        report: dict[str, set[str]] | None = None,
        needed: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], int]:
        """Score ``batches``; returns per-parameter sums (float32) and the number of batches scored.

        ``batch_generator(b)`` gives the label-draw generator of batch ``b`` (instead of one shared
        ``generator``), ``owns(b)`` skips batches another rank scores, and ``totals`` (e.g. float64
        :meth:`zeros`) receives each batch's float32 scores once the batch is done, so the sum does not depend
        on how batches are split; it is then what is returned. ``progress.update(1)`` is called per batch.
        ``report`` as in :func:`fisher_scores`. ``needed`` ({name: bool mask}, e.g. calibration's entries still
        kept): only those entries' scores are wanted; layer rules may skip the others (left 0).
        """
        # masks that leave something out (an all-True mask changes nothing)
        needed = {n: m for n, m in (needed or {}).items() if not bool(m.all())}
        dead = {n for n, m in needed.items() if not bool(m.any())}
        self._ws.new_pass()
        scores = self.zeros()
        warned: set[str] = set()
        n_batches = 0
        for b, batch in enumerate(batches):
            if owns is not None and not owns(b):
                continue
            n_batches += 1
            if batch_generator is not None:
                generator = batch_generator(b)
            if totals is not None:
                for v in scores.values():
                    v.zero_()
            self._score_batch(batch, forward_fn, generator, scores, warned, report, (needed, dead))
            if totals is not None:
                for n, v in scores.items():
                    totals[n] += v
            if progress is not None:
                progress.update(1)
        return (totals if totals is not None else scores), n_batches

    def _score_batch(self, batch: Any, forward_fn: ForwardFn, generator: torch.Generator | None,
                     scores: dict[str, Tensor], warned: set[str], report: dict[str, set[str]] | None,
                     needed: tuple[Mapping[str, Tensor], set[str]]) -> None:
        """One forward of ``batch`` and, per label draw, one backward; squared per-example grads into ``scores``.

        Every reference to the batch's graph and activations dies with this call (the captures hold layer
        outputs, whose grad_fn keeps the whole graph alive), so the peak is one batch.
        """
        plan, ws = self._plan, self._ws
        with _recording(self.model, plan, ws) as rec:
            out = forward_fn(self.model, batch)
            # The recording hooks and the observable MHA forwards stay installed until this batch's gradients
            # are taken, but record nothing more: under (non-reentrant) activation checkpointing the backward
            # re-runs the forward of checkpointed blocks, which must execute the same code as the first time.
            rec.stop()
            if out.dim() != 2:
                raise ValueError(
                    f"forward_fn must return per-example class scores [B, C], got shape {tuple(out.shape)}"
                )
            obj = per_example_objective(out, draw_labels(out, self.draws, generator), self.target)  # (B, draws)
            good, uses, direct, fallback = _triage(plan, rec, out.shape[0])
            _warn_fallback(fallback, warned, "")
            for d in range(self.draws):
                more = _score_draw(plan, rec, obj[:, d], good, uses, direct, fallback, scores, ws, needed,
                                   last=d == self.draws - 1)
                _warn_fallback(more, warned, "; a use of them was not seen")
                if report is not None:
                    report.setdefault("fallback", set()).update(more)
            if report is not None:
                report.setdefault("fallback", set()).update(fallback)
                report.setdefault("direct", set()).update(direct)
                if rec.tied is not None:  # tied weights count as followed; "tied" names those on fisher_tied
                    report.setdefault("direct", set()).update(w.name for w in rec.tied.valid)
                    report.setdefault("tied", set()).update(w.name for w in rec.tied.valid)


def _warn_fallback(names: Iterable[str], warned: set[str], why: str) -> None:
    """Warn once per parameter that the exact per-example loop scores it."""
    new = [n for n in names if n not in warned]
    if new:
        warned.update(new)
        logger.warning("Fisher: %d parameter(s) use the exact per-example fallback (slower%s): %s",
                       len(new), why, ", ".join(sorted(new)[:8]) + (" ..." if len(new) > 8 else ""))


def _triage(plan: _Plan, rec: _Recorder, B: int) -> tuple[list[_Capture], list, list[str], list[str]]:
    """Split this batch's parameters: trusted layer captures, followed (direct) names and their uses, fallback.

    Captures that cannot be trusted (module called twice, output modified in place, batch dim not found) and
    direct parameters whose consumption could not be followed send their names to the exact fallback.
    """
    bad = set(rec.invalid) | {k for k, c in rec.calls.items() if c > 1}
    for c in rec.captures:
        if c.output._version != c.version or not c.output.requires_grad or _batch_dim(c.output, B) is None:
            bad.add(c.key)
    for mha, _ in plan.mha.values():  # an MHA and its out_proj stand or fall together
        if id(mha) in bad or id(mha.out_proj) in bad:
            bad.update((id(mha), id(mha.out_proj)))
    bad -= set(rec.followed)
    good = [c for c in rec.captures if c.key not in bad and c.key not in rec.followed]
    fallback = list(plan.fallback)
    for c in rec.captures:
        if c.key in bad:
            fallback += list(c.names.values())
    for key in bad:
        if key in plan.ruled:
            fallback += list(plan.ruled[key][2].values())
        elif key in plan.mha:
            fallback += list(plan.mha[key][1].values())
    direct = list(dict.fromkeys(list(plan.direct) + [n for ns in rec.followed.values() for n in ns]))
    tr = rec.tracker
    uses: list = []
    if direct and (tr is None or tr.B != B):
        fallback += direct  # the batch size was not found at the model's entry
        direct = []
    elif direct:
        uses = tr.valid_uses()
        fallback += [n for n in direct if n in tr.broken]
    if rec.tied is not None:
        fallback += rec.tied.triage(B)
    fallback = list(dict.fromkeys(fallback))
    direct = [n for n in direct if n not in fallback]
    if tr is not None:
        keep = set(direct)
        uses = [u for u in uses if tr.names_of(u) <= keep]
    return good, uses, direct, fallback


def _score_draw(plan: _Plan, rec: _Recorder, s: Tensor, good: list[_Capture], uses: list, direct: list[str],
                fallback: list[str], scores: dict[str, Tensor], ws: _Workspace,
                needed: tuple[Mapping[str, Tensor], set[str]] = ({}, set()), last: bool = False) -> set[str]:
    """Add one draw's squared per-example gradients (s: [B] objectives) to ``scores``; returns the direct
    names that failed their consistency check (scored by the per-example loop instead). ``needed``: the
    entries wanted per name, and the names of which no entry is; layer rules see the former as ``ws.need``."""
    B = s.shape[0]
    leaves = {n: plan.targets[n].leaf() for n in direct}
    tied = rec.tied.wanted() if rec.tied is not None else []  # embedding/LM-head tied weights (fisher_tied)
    # the layer rules run inside the backward, as each layer's output gradient is formed (tensor hooks), so no
    # more than a few output gradients are alive at once; the backward is asked only for the outputs of the
    # lowest live layers, from which every other live layer's output is reached (_lowest)
    live = [c for c in good if not all(n in needed[1] for n in c.names.values())]  # else nothing is needed
    asked = _lowest(live) if sum(c.output.numel() for c in live) > _HOLD_GRADS_BELOW else live
    wanted = [c.output for c in asked] + [u.output for u in uses] + list(leaves.values()) + tied
    # the graph is freed during this backward unless something walks it again: a later draw, the per-example
    # loop, the followed or tied chains
    keep_graph = not last or bool(fallback) or bool(leaves) or bool(tied)
    handles = [c.output.register_hook(functools.partial(_apply_rule, c, B, scores, ws, needed[0])) for c in live]
    try:
        grads = torch.autograd.grad(s.sum(), wanted, retain_graph=keep_graph, allow_unused=True) if wanted else ()
    finally:
        for h in handles:
            h.remove()
    grads = grads[len(asked) :]  # those of the uses, leaves and tied weights; the layers' were used by the hooks
    failed: set[str] = set()
    if leaves:
        ug = {i: g for i, g in enumerate(grads[: len(uses)]) if g is not None}
        bg = dict(zip(leaves, grads[len(uses) : len(uses) + len(leaves)]))
        try:
            got, failed = direct_scores(rec.tracker, uses, ug, leaves, bg, ws.chunk_elements)
        except RuntimeError as e:  # an operation torch.func cannot replay per example
            logger.debug("Fisher: per-example replay failed (%s)", e)
            got, failed = {}, set(leaves)
        for n, v in got.items():
            if n not in failed:
                scores[n] += v
    if tied:
        failed |= rec.tied.add_scores(list(grads[len(uses) + len(leaves) :]), scores, ws)
    slow = list(fallback) + sorted(failed)
    if slow:
        slow_leaves = [plan.targets[n].leaf() for n in slow]
        for i in range(B):  # exact but slow: one backward per example, only for these parameters
            _add_squared_grads(s[i], slow, slow_leaves, scores)
    return failed


#: captured layer outputs of at most this many elements in all: the backward returns every output gradient at
#: once (finding the lowest layers costs a walk over the autograd graph, which small models do not repay)
_HOLD_GRADS_BELOW = 2**22


def _apply_rule(c: _Capture, B: int, scores: dict[str, Tensor], ws: _Workspace,
                needed: Mapping[str, Tensor] | None, g: Tensor | None) -> None:
    """A tensor hook on ``c.output``: its layer rule's squared per-example gradients (from the output gradient
    ``g``) added to ``scores``; ``g`` itself passes on unchanged."""
    if g is None:  # no gradient reached this output
        return
    ins = c.inputs
    if _batch_dim(c.output, B) == 1:  # sequence-first activations (T, B, D)
        g = g.movedim(1, 0)
        ins = tuple(x.movedim(1, 0) if isinstance(x, Tensor) and x.dim() > 1 else x for x in ins)
    ws.need = _capture_need(c, needed)
    try:
        contrib = c.rule(c.module, ins, g)
    finally:
        ws.need = None
    for attr, name in c.names.items():
        if attr in contrib:
            if c.rows is not None:
                scores[name][c.rows] += contrib[attr]
            else:
                scores[name] += contrib[attr].view_as(scores[name])


def _lowest(caps: list[_Capture]) -> list[_Capture]:
    """The captures below which (in the backward) no other capture lies: asking the backward for their outputs'
    gradients runs the node of every capture (each has a path down to one of them)."""
    nodes = {c.output.grad_fn for c in caps}
    below: dict[Any, bool] = {}  # autograd node -> some capture node strictly below it
    for start in nodes:
        stack = [(start, False)]
        while stack:  # iterative post-order walk (graphs are deep)
            n, done = stack.pop()
            kids = [f for f, _ in n.next_functions if f is not None]
            if done:
                below[n] = any(k in nodes or below[k] for k in kids)
            elif n not in below:
                stack.append((n, True))
                stack += [(k, False) for k in kids if k not in below]
    return [c for c in caps if not below[c.output.grad_fn]]


def _capture_need(c: _Capture, needed: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """``{local attr: needed entries}`` of a capture's parameters (its rows, for an MHA in-projection slice)."""
    if not needed:
        return None
    need = {attr: needed[n] if c.rows is None else needed[n][c.rows] for attr, n in c.names.items() if n in needed}
    return need or None


def _add_squared_grads(s: Tensor, names: Sequence[str], leaves: Sequence[Tensor], scores: dict[str, Tensor]) -> None:
    """One backward of the scalar ``s`` (one example, one draw): its squared gradients added to ``scores``."""
    gs = torch.autograd.grad(s, leaves, retain_graph=True, allow_unused=True)
    for n, g in zip(names, gs):
        if g is not None:
            scores[n] += g.float().square()


def _batch_dim(t: Tensor, B: int) -> int | None:
    """Where the batch lives in an activation: dim 0 (batch-first), else dim 1 (sequence-first layers)."""
    if t.dim() >= 1 and t.shape[0] == B:
        return 0
    if t.dim() >= 2 and t.shape[1] == B:
        return 1
    return None


def fisher_scores(model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn, *,
                  params: Iterable[str] | None = None, target: str = "logit", draws: int = 1,
                  generator: torch.Generator | None = None, chunk_elements: int | None = None,
                  report: dict[str, set[str]] | None = None) -> dict[str, Tensor]:
    """Diagonal-Fisher sensitivity of each parameter entry: sum over examples and draws of squared gradients.

    Args:
        model: any ``nn.Module``; it is run in eval mode and left exactly as it was (weights, grads, flags).
        batches: iterable of batches, each passed to ``forward_fn``.
        forward_fn: ``forward_fn(model, batch) -> Tensor[B, C]`` per-example class scores (vision logits,
            nlp answer-choice log-likelihoods). Examples must not interact (no batch norm).
        params: names of the parameters to score; default every parameter that requires grad.
        target: ``"logit"`` differentiates ``scores[i, y]``; ``"log_prob"`` differentiates
            ``log_softmax(scores)[i, y]``; ``y`` is drawn from ``softmax(scores[i])``.
        draws: labels drawn per example (each draw adds one squared gradient).
        generator: CPU ``torch.Generator`` for the label draws (seed it for reproducible scores).
        chunk_elements: memory knob, the largest block of per-example gradients materialised at once
            (float32 elements; default ``DEFAULT_CHUNK_ELEMENTS`` for the model's device). Extra memory is
            about this many floats plus the layer activations kept by the forward.
        report: if given, ``report["fallback"]`` receives the names scored by the slow per-example backward
            loop (empty when every parameter has a vectorised path) and ``report["direct"]`` those followed
            through the operations that consume them (:mod:`talos.fisher_direct`), and ``report["tied"]`` the
            word embeddings tied to an LM head among them, scored by :mod:`talos.fisher_tied`.

    Returns:
        ``{name: float32 tensor shaped like the parameter}`` on the parameter's device.
    """
    scorer = FisherScorer(model, params=params, target=target, draws=draws, chunk_elements=chunk_elements)
    with scorer.scoring():
        scores, n = scorer.score(batches, forward_fn, generator=generator, report=report)
    if n == 0:
        raise ValueError("fisher_scores received no batches")
    return scores


def fisher_scores_reference(model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn, *,
                            params: Iterable[str] | None = None, target: str = "logit", draws: int = 1,
                            generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The anchor algorithm of the official code: one batched forward, then one backward per example.

    Exact and slow (each backward walks the whole batch graph); kept as the reference that tests and
    ``benchmarks/fisher.py`` compare :func:`fisher_scores` against. Same label draws as the fast path.
    """
    check_scoring_args(target, draws)
    names = resolve_params(model, params)
    named = dict(model.named_parameters())
    plist = [named[n] for n in names]
    scores = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in names}
    with scoring_mode(model, plist):
        for batch in batches:
            out = forward_fn(model, batch)
            obj = per_example_objective(out, draw_labels(out, draws, generator), target)
            for i in range(obj.shape[0]):
                for d in range(draws):
                    _add_squared_grads(obj[i, d], names, plist, scores)
    return scores


__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "TARGETS",
    "FisherScorer",
    "ParamSite",
    "check_scoring_args",
    "draw_labels",
    "fisher_scores",
    "sq_outer_sum",
    "fisher_scores_reference",
    "locate_params",
    "per_example_objective",
    "register_per_example_rule",
    "register_per_example_rule_by_name",
    "resolve_params",
    "rms_norm_rule",
    "scoring_mode",
]

