"""LoRA adapters on any weight matrix (or row slices of one, e.g. q and v of a fused in-projection).

Adapters live in their own module. ``attach`` installs them as parametrizations W -> W + ΔW: ΔW = ``delta``
(scale · B A) for LoRA, or ΔW = ``lin_delta`` (its first-order expansion around the initialisation (A0, B0 = 0),
i.e. scale · B A0) for L-LoRA (Tang et al. 2024): only the adapter branch is linearised, the network stays
non-linear. The same ΔW is the task vector, so LoRA task vectors add and negate like any other, and θ0 + τ in
the ordinary model reproduces the adapted model exactly.

A init: ``kaiming`` is nn.Linear's / peft's (uniform, bound 1/sqrt(in)); ``xavier`` is the official TaLoS vision
L-LoRA's (``xavier_uniform_`` on an ``nn.Linear(in, r)`` weight [r, in], then times 1/sqrt(r)). B starts at 0.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

SCALINGS = ("alpha_over_rank", "alpha")
INITS = ("kaiming", "xavier")
ATTACHED_AS = "lora_adapters"  # the submodule name of attached adapters in their model


def _key(name: str) -> str:
    return name.replace(".", "__")  # module names cannot contain dots


class _Slot(nn.Module):
    """A and B factors for the row slices of one weight [out, in]; ΔW[rows] = scale · B @ A."""

    def __init__(self, shape: Sequence[int], slices: Sequence[slice], rank: int, scale: float, init: str,
                 generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        out, inp = shape
        self.shape = (out, inp)
        self.slices = [slice(*s.indices(out)) for s in slices]
        self.scale = scale
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for s in self.slices:
            rows = len(range(s.start, s.stop, s.step))
            a = _init_a(rank, inp, init, generator)
            self.A.append(nn.Parameter(a.to(device=device, dtype=dtype)))
            self.B.append(nn.Parameter(torch.zeros(rows, rank, device=device, dtype=dtype)))
        for i, a in enumerate(self.A):
            self.register_buffer(f"A0_{i}", a.detach().clone(), persistent=False)
        for i, b in enumerate(self.B):
            self.register_buffer(f"B0_{i}", b.detach().clone(), persistent=False)

    def _assemble(self, blocks: list[Tensor]) -> Tensor:
        full = blocks[0].new_zeros(self.shape)
        for s, blk in zip(self.slices, blocks):
            full = full.index_add(0, torch.arange(s.start, s.stop, s.step, device=full.device), blk)
        return full

    def delta(self) -> Tensor:
        return self._assemble([self.scale * (b @ a) for a, b in zip(self.A, self.B)])

    def lin_delta(self) -> Tensor:
        # first order in (A, B) around (A0, B0): scale · (ΔB A0 + B0 ΔA); B0 = 0 makes it scale · B A0
        out = []
        for i, (a, b) in enumerate(zip(self.A, self.B)):
            a0, b0 = getattr(self, f"A0_{i}"), getattr(self, f"B0_{i}")
            out.append(self.scale * ((b - b0) @ a0 + b0 @ (a - a0)))
        return self._assemble(out)


def _init_a(rank: int, inp: int, init: str, generator: torch.Generator) -> Tensor:
    """A0 [rank, inp] drawn from ``generator`` (CPU float32)."""
    if init == "xavier":  # official vision L-LoRA: xavier_uniform_ on nn.Linear(inp, rank).weight, then / sqrt(r)
        a = nn.init.xavier_uniform_(torch.empty(rank, inp), generator=generator)
        return a.mul_(1 / torch.tensor(float(rank)).sqrt())  # the float32 factor the official code uses
    bound = 1.0 / math.sqrt(inp)  # kaiming-uniform(a=sqrt(5)) bound used by nn.Linear and peft
    return (torch.rand(rank, inp, generator=generator) * 2 - 1) * bound


class _AddDelta(nn.Module):
    def __init__(self, slot: _Slot, linearized: bool) -> None:
        super().__init__()
        self.slot = [slot]  # a list: do not register the adapter twice as a submodule
        self.linearized = linearized

    def forward(self, w: Tensor) -> Tensor:
        slot = self.slot[0]
        return w + (slot.lin_delta() if self.linearized else slot.delta()).to(w.dtype)


class LoRAAdapters(nn.Module):
    """Adapters for ``targets`` = {parameter name: row slices (None = all rows)} of ``model``."""

    def __init__(self, model: nn.Module, targets: Mapping[str, Sequence[slice] | None], *, rank: int = 16,
                 alpha: float = 32.0, scaling: str = "alpha_over_rank", init: str = "kaiming",
                 seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if scaling not in SCALINGS:
            raise ValueError(f"unknown LoRA scaling {scaling!r}; valid choices: {', '.join(SCALINGS)}")
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}; valid choices: {', '.join(INITS)}")
        if not targets:
            raise ValueError("no LoRA targets")
        scale = alpha / rank if scaling == "alpha_over_rank" else float(alpha)
        named = dict(model.named_parameters())
        g = torch.Generator().manual_seed(seed)
        self.names = list(targets)
        self.slots = nn.ModuleDict()
        for n in self.names:
            if n not in named or named[n].dim() != 2:
                raise ValueError(f"LoRA target {n!r} is not a 2-D parameter of the model")
            p = named[n]
            self.slots[_key(n)] = _Slot(p.shape, targets[n] or [slice(None)], rank, scale, init, g, p.dtype,
                                        p.device)
        self._attached: list[tuple[nn.Module, str]] = []
        self._owner: list[nn.Module] = []

    def delta(self) -> dict[str, Tensor]:
        """Merged updates ΔW by target parameter name (differentiable)."""
        return {n: self.slots[_key(n)].delta() for n in self.names}

    def lin_delta(self) -> dict[str, Tensor]:
        """Updates linearised in the adapter parameters around their initialisation (L-LoRA)."""
        return {n: self.slots[_key(n)].lin_delta() for n in self.names}

    def attach(self, model: nn.Module, linearized: bool = False) -> None:
        """Install W -> W + ΔW on every target (parametrizations; the original tensors are untouched);
        ΔW = ``lin_delta`` with ``linearized`` (L-LoRA), else ``delta``.

        The adapters also become the submodule ``ATTACHED_AS`` of ``model`` until :meth:`detach`, so the model
        owns their parameters: DistributedDataParallel (torchrun) then all-reduces their gradients."""
        if hasattr(model, ATTACHED_AS):
            raise ValueError(f"the model already has a {ATTACHED_AS!r} attribute: LoRA adapters are attached once")
        for n in self.names:
            mod_name, _, attr = n.rpartition(".")
            mod = model.get_submodule(mod_name)
            parametrize.register_parametrization(mod, attr, _AddDelta(self.slots[_key(n)], linearized), unsafe=True)
            self._attached.append((mod, attr))
        model.add_module(ATTACHED_AS, self)
        self._owner = [model]  # a list: the model is not a submodule of its adapters

    def detach(self) -> None:
        """Remove the parametrizations and the adapters' submodule, restoring the original model."""
        for mod, attr in reversed(self._attached):
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        self._attached.clear()
        for model in self._owner:
            delattr(model, ATTACHED_AS)
        self._owner = []
