"""First-order Taylor models: f_lin(x; θ) = f(x; θ0) + J_θ f(x; θ0) · (θ − θ0), via ``torch.func.jvp``.

Used to train linearized fine-tuning (Ortiz-Jimenez et al. 2023) and to evaluate task vectors through the
linearized model (post-hoc linearization). (L-LoRA linearizes only its adapter branch: ``talos.lora_layers``.)
Fused attention kernels have no forward-mode rule, so attention runs on the math path inside the JVP.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp


@contextmanager
def math_attention() -> Iterator[None]:
    """Run scaled-dot-product attention on the math kernel (forward-mode AD works there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # nn.MultiheadAttention's inference fast path is a fused kernel too: switch it off meanwhile
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)


class LinearizedModel(nn.Module):
    """Wraps ``model`` so that ``forward`` is its first-order Taylor expansion around θ0 in ``names``.

    θ0 is a frozen copy taken at construction (buffers ``theta0.<i>``). The tangent is ``θ − θ0`` for the
    model's current values of ``names`` (so training the wrapped model's parameters trains the linear model,
    and setting them to θ0 + τ evaluates a task vector through it).
    Other parameters and buffers are used as they are. ``forward(*args, **kwargs)`` forwards to ``model``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        named = dict(model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ValueError(f"unknown parameter names: {missing[:5]}")
        for i, n in enumerate(self.names):
            self.register_buffer(f"theta0_{i}", named[n].detach().clone(), persistent=False)

    def theta0(self) -> dict[str, Tensor]:
        """The expansion point, by parameter name."""
        return {n: getattr(self, f"theta0_{i}") for i, n in enumerate(self.names)}

    def tangent(self) -> dict[str, Tensor]:
        """θ − θ0 by parameter name; differentiable w.r.t. the trainable parameters."""
        named = dict(self.model.named_parameters())
        return {n: named[n] - t0 for n, t0 in self.theta0().items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        theta0 = self.theta0()
        tangent = self.tangent()
        keys = [k for k in theta0 if k in tangent]
        primals = tuple(theta0[k] for k in keys)
        tangents = tuple(tangent[k].to(theta0[k].dtype) for k in keys)

        def f(*params: Tensor) -> Any:
            return functional_call(self.model, dict(zip(keys, params)), args, kwargs, strict=False)

        with math_attention():
            out, dout = jvp(f, primals, tangents)
        return torch.utils._pytree.tree_map(lambda a, b: a + b, out, dout)
