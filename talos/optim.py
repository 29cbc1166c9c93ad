"""Masked AdamW for sparse fine-tuning: only mask-selected parameter entries are ever updated."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["MaskedAdamW", "freeze_masked_out", "masked_state_bytes", "STATE_LAYOUTS"]

#: Accepted values of ``MaskedAdamW(state_layout=...)``.
STATE_LAYOUTS = ("auto", "compact", "dense")

# Per-parameter update strategies (``MaskedAdamW.layouts()`` reports these names).
_DENSE = "dense"  # mask all True or name listed in ``dense``: plain AdamW, dense moments
_COMPACT = "compact"  # moments of length nnz + flat int64 indices of the trainable entries
_MASKED = "masked"  # dense moments + bool mask, update selected with torch.where
_SKIP = "skip"  # mask all False: no state, never touched


@dataclass
class _Plan:
    """How one parameter is updated; built once from its mask at construction."""

    name: str
    kind: str
    index: Tensor | None = None  # (nnz,) int64 flat indices, only for _COMPACT
    mask: Tensor | None = None  # bool, param's shape, only for _MASKED
    nnz: int = 0

    def state_numel(self, param: Tensor) -> int:
        """Number of elements each moment buffer of this parameter must have."""
        return self.nnz if self.kind == _COMPACT else param.numel()


def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _check_mask(name: str, param: Tensor, mask: Any) -> None:
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask for {name!r} must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != param.shape:
        raise ValueError(
            f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter has "
            f"shape {tuple(param.shape)}"
        )


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW that updates only the entries selected by a per-parameter boolean mask.

    The arithmetic on trainable entries is exactly ``torch.optim.AdamW``'s (``foreach=False``,
    ``amsgrad=False``): decoupled weight decay ``p *= 1 - lr*wd``, bias-corrected moments,
    ``denom = sqrt(v)/sqrt(1-beta2^t) + eps`` and ``p -= lr/(1-beta1^t) * m/denom``. Both the
    Adam update and the weight decay are restricted to mask-True entries: masked-out entries
    stay bitwise equal to their initial value however many steps are taken.

    Gradients at masked-out positions are ignored (they neither move parameters nor enter the
    moments). Gradient clipping is not done here: clip the full gradients before ``step()``.

    Args:
        named_params: iterable of ``(name, parameter)`` pairs, or of param-group dicts whose
            ``"params"`` are such pairs (per-group ``lr``/``weight_decay``/... overrides).
        masks: ``name -> bool tensor`` of the parameter's shape (True = trainable). Masks may
            live on any device; they are moved to the parameter's device. Every parameter
            needs a mask unless its name is in ``dense``; a mask naming no parameter is an error.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        dense: names of parameters trained fully (plain AdamW, no mask needed).
        state_layout: how partially-masked tensors keep state. ``"compact"``: moments of
            length nnz plus int64 flat indices; ``"dense"``: full-size moments plus the bool
            mask, update selected with ``torch.where``; ``"auto"`` (default): per tensor,
            whichever holds fewer bytes (compact below ~55% density for fp32).

    A tensor whose mask is all False gets no state and is skipped even if it has a ``.grad``
    (see :func:`freeze_masked_out` to stop autograd computing that gradient at all).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        masks: Mapping[str, Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dense: Iterable[str] = (),
        state_layout: str = "auto",
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if state_layout not in STATE_LAYOUTS:
            raise ValueError(f"state_layout must be one of {STATE_LAYOUTS}, got {state_layout!r}")
        # These must exist before super().__init__, which calls add_param_group.
        self._masks = dict(masks)
        self._dense_names = frozenset(dense)
        self._state_layout = state_layout
        self._plans: dict[Tensor, _Plan] = {}
        self._seen_names: set[str] = set()
        overlap = self._dense_names & set(self._masks)
        if overlap:
            raise ValueError(f"parameters both listed in dense and given a mask: {sorted(overlap)}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(named_params, defaults)
        unknown = sorted((set(self._masks) | self._dense_names) - self._seen_names)
        if unknown:
            raise ValueError(f"masks/dense names that match no parameter: {unknown}")

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; keep the masks' plans too
        # so copy.deepcopy / pickle give a working optimizer.
        state = super().__getstate__()
        for key in ("_masks", "_dense_names", "_state_layout", "_plans", "_seen_names"):
            state[key] = getattr(self, key)
        return state

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of ``(name, parameter)`` pairs; each needs a mask or a ``dense`` entry."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "param_names" not in group:
            raise ValueError("MaskedAdamW needs named parameters: pass (name, parameter) pairs")
        for name, p in zip(group["param_names"], group["params"], strict=True):
            if name in self._seen_names:
                raise ValueError(f"parameter name {name!r} appears more than once")
            if p in self._plans:
                raise ValueError(f"parameter {name!r} is the same tensor as {self._plans[p].name!r}")
            self._seen_names.add(name)
            self._plans[p] = self._make_plan(name, p)

    def _make_plan(self, name: str, p: Tensor) -> _Plan:
        if name in self._dense_names:
            return _Plan(name, _DENSE, nnz=p.numel())
        if name not in self._masks:
            raise ValueError(f"no mask for parameter {name!r} (list it in dense= to train it fully)")
        mask = self._masks[name]
        _check_mask(name, p, mask)
        mask = mask.to(p.device)
        nnz = int(mask.sum())
        if nnz == 0:
            return _Plan(name, _SKIP)
        if nnz == p.numel():
            return _Plan(name, _DENSE, nnz=nnz)
        moment_bytes = 2 * p.element_size()
        # Bytes held per parameter element: compact keeps 2 moments + one int64 index per
        # trainable entry; dense-masked keeps 2 full moments + a 1-byte bool mask.
        compact_bytes = nnz * (moment_bytes + 8)
        masked_bytes = p.numel() * (moment_bytes + 1)
        use_compact = self._state_layout == "compact" or (
            self._state_layout == "auto" and compact_bytes < masked_bytes
        )
        if use_compact and p.is_contiguous():
            index = mask.reshape(-1).nonzero().squeeze(1)  # (nnz,) int64, ascending
            return _Plan(name, _COMPACT, index=index, nnz=nnz)
        # Copy so later in-place edits of the caller's mask cannot change what is trained.
        return _Plan(name, _MASKED, mask=mask.clone() if mask is self._masks[name] else mask, nnz=nnz)

    # ------------------------------------------------------------------ inspection
    def layouts(self) -> dict[str, str]:
        """``name -> "dense" | "compact" | "masked" | "skip"``: how each parameter is updated."""
        return {plan.name: plan.kind for plan in self._plans.values()}

    def aux_bytes(self) -> int:
        """Bytes of the per-parameter index/mask buffers (not part of ``state_dict``)."""
        total = 0
        for plan in self._plans.values():
            for t in (plan.index, plan.mask):
                if t is not None:
                    total += _tensor_bytes(t)
        return total

    # ------------------------------------------------------------------ checkpointing
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by a ``MaskedAdamW`` built with the same params and masks."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            if "param_names" in saved and list(saved["param_names"]) != list(group["param_names"]):
                raise ValueError("saved optimizer state is for differently named parameters")
        super().load_state_dict(state_dict)
        # Compact moments only make sense with the exact same masks: check sizes.
        for p, plan in self._plans.items():
            st = self.state.get(p)
            if not st:
                continue
            if plan.kind == _SKIP:
                raise ValueError(f"saved state has entries for fully masked-out {plan.name!r}")
            want = plan.state_numel(p)
            for key in ("exp_avg", "exp_avg_sq"):
                if st[key].numel() != want:
                    raise ValueError(
                        f"saved {key} of {plan.name!r} has {st[key].numel()} entries, expected "
                        f"{want}: were the masks or state_layout different?"
                    )

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step on the trainable entries of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """Update every parameter of ``group`` that has a gradient: gather, one fused AdamW, write back."""
        buckets, writebacks = self._gather(group)
        beta1, beta2 = group["betas"]
        for b in buckets.values():
            _adamw_foreach(b, float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"])
        for plan, p, target in writebacks:
            if plan.kind == _COMPACT:
                # Only the nnz trainable positions are written; all others stay bitwise.
                p.view(-1).index_copy_(0, plan.index, target)
            else:
                torch.where(plan.mask, target, p, out=p)

    def _gather(self, group: dict[str, Any]) -> tuple[dict[tuple, dict[str, list]], list[tuple[_Plan, Tensor, Tensor]]]:
        """Per (device, dtype), the lists one fused update takes; plus the (plan, param, target) to write back.

        ``targets`` are the tensors updated in place: the parameter itself (dense), a gathered (nnz,) copy of
        its trainable entries (compact), or a full clone (masked), whose result is written back afterwards.
        """
        # Buckets keyed by (device, dtype) so each _foreach_ call sees homogeneous lists.
        buckets: dict[tuple[torch.device, torch.dtype], dict[str, list]] = {}
        writebacks: list[tuple[_Plan, Tensor, Tensor]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            plan = self._plans[p]
            if plan.kind == _SKIP:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("MaskedAdamW does not support sparse gradients")
            state = self._state_of(p, plan)
            if plan.kind == _DENSE:
                target = p
            elif plan.kind == _COMPACT:
                # (nnz,) gathers; the parameter is contiguous so view(-1) is free.
                grad = grad.reshape(-1).index_select(0, plan.index)
                target = p.view(-1).index_select(0, plan.index)
                writebacks.append((plan, p, target))
            else:  # _MASKED
                # Zero (not multiply: inf*0 = nan) masked-out grads so moments stay 0 there.
                grad = torch.where(plan.mask, grad, 0)
                target = p.clone()
                writebacks.append((plan, p, target))
            b = buckets.setdefault((p.device, p.dtype), {"t": [], "g": [], "m": [], "v": [], "s": []})
            for key, t in (("t", target), ("g", grad), ("m", state["exp_avg"]), ("v", state["exp_avg_sq"]),
                           ("s", state["step"])):
                b[key].append(t)
        return buckets, writebacks

    def _state_of(self, p: Tensor, plan: _Plan) -> dict[str, Any]:
        """``p``'s AdamW state, created (zero moments, full size or nnz) at its first update."""
        state = self.state[p]
        if not state:
            n = plan.state_numel(p)
            shape = (n,) if plan.kind == _COMPACT else p.shape
            # float32 scalar step, as torch.optim.AdamW stores it (state_dict compatible).
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return state


def _adamw_foreach(b: dict[str, list], lr: float, beta1: float, beta2: float, eps: float, wd: float) -> None:
    """One AdamW step on a bucket of same-device, same-dtype lists (``t`` targets, ``g`` grads, ``m``/``v``
    moments, ``s`` step counters), in place.

    Same op order and scalars as torch's ``_single_tensor_adam`` so results match bitwise.
    """
    targets, grads, exp_avgs, exp_avg_sqs, steps = b["t"], b["g"], b["m"], b["v"], b["s"]
    torch._foreach_add_(steps, 1)
    if wd != 0:
        torch._foreach_mul_(targets, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_vals = [s.item() for s in steps]
    step_sizes = [-(lr / (1 - beta1**t)) for t in step_vals]
    bc2_sqrts = [(1 - beta2**t) ** 0.5 for t in step_vals]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bc2_sqrts)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(targets, exp_avgs, denoms, step_sizes)


def _named_parameters(
    named_params_or_module: nn.Module | Iterable[tuple[str, Tensor]],
) -> list[tuple[str, Tensor]]:
    if isinstance(named_params_or_module, nn.Module):
        return list(named_params_or_module.named_parameters())
    return list(named_params_or_module)


def freeze_masked_out(
    named_params_or_module: nn.Module | Iterable[tuple[str, Tensor]],
    masks: Mapping[str, Tensor],
) -> list[str]:
    """Set ``requires_grad_(False)`` on parameters whose mask is all False; return their names.

    Autograd then skips those weight gradients entirely. Parameters without a mask are left
    alone; a mask naming no parameter, or with a wrong shape/dtype, raises ``ValueError``.
    """
    params = dict(_named_parameters(named_params_or_module))
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks that match no parameter: {unknown}")
    frozen = []
    for name, p in params.items():
        if name not in masks:
            continue
        _check_mask(name, p, masks[name])
        if not bool(masks[name].any()):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def masked_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors (for ``MaskedAdamW`` incl. index/mask buffers).

    Works for any ``torch.optim.Optimizer`` so dense AdamW can be compared on equal terms.
    """
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, Tensor):
                total += _tensor_bytes(v)
    if isinstance(optimizer, MaskedAdamW):
        total += optimizer.aux_bytes()
    return total
