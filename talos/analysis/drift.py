"""Gradient drift during fine-tuning (Fig. 7): ‖∇θ f(x, θ_i) − ∇θ f(x, θ0)‖² on a fixed probe batch.

Off by default; ``--gradient-drift-every N`` records it every N optimizer steps through the training loop's
``on_step`` hook (one forward + backward of the probe batch per record, nothing when off). The result goes to
``gradient_drift.json`` in the fine-tuning run folder, beside ``metrics.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["DRIFT_FILE", "GradientDrift", "drift_path"]

#: file name of the record in a fine-tuning run folder
DRIFT_FILE = "gradient_drift.json"


def drift_path(run_dir: str | Path) -> Path:
    """Where a fine-tuning run keeps its gradient-drift record."""
    return Path(run_dir) / DRIFT_FILE


class GradientDrift:
    """Records ‖g(θ_i) − g(θ0)‖² with g(θ) = ∇ of the mean probe score over the trainable entries.

    ``probe(model) -> Tensor[N]`` is one score per probe example (vision: the true class's logit; NLP: the
    correct answer's log-likelihood), computed in fp32 with the model in eval mode. The gradient is taken with
    respect to the tensors the run trains (``named_params`` of the mode's training state: the LoRA factors for
    LoRA, the linearized model's parameters for linear FT), restricted to trainable entries by the masks.
    """

    def __init__(self, probe: Callable[[nn.Module], Tensor], every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.probe, self.every = probe, every
        self.records: list[dict[str, float]] = []
        self._g0: Tensor | None = None

    def _grad(self) -> Tensor:
        was_training = self.model.training
        self.model.eval()  # no dropout: the probe measures the function, not a random draw
        try:
            with torch.enable_grad():
                score = self.probe(self.model).float().mean()
            grads = torch.autograd.grad(score, [p for _, p in self.params], allow_unused=True)
        finally:
            self.model.train(was_training)
        flat = []
        for (n, p), g in zip(self.params, grads):
            g = torch.zeros_like(p) if g is None else g
            if self.masks is not None and n in self.masks:
                g = g * self.masks[n].to(g.device)
            flat.append(g.detach().float().flatten())
        return torch.cat(flat)  # [trainable tensors' numel]

    def start(self, model: nn.Module, named_params: Sequence[tuple[str, nn.Parameter]],
              masks: Mapping[str, Tensor] | None) -> Callable[[int], None]:
        """Take g(θ0) now (call before training) and return the ``on_step(step)`` hook of :func:`talos.train.train`."""
        self.model, self.params, self.masks = model, list(named_params), masks
        self._g0 = self._grad()
        self.records = [{"step": 0, "drift": 0.0}]
        return self.on_step

    def on_step(self, step: int) -> None:
        """Record the drift after optimizer step ``step`` when it is a multiple of ``every``."""
        if step % self.every:
            return
        g = self._grad()
        self.records.append({"step": step, "drift": float((g - self._g0).pow(2).sum())})

    def result(self) -> dict[str, Any]:
        """The record: steps, drifts, ‖g(θ0)‖² (to normalise) and the settings."""
        if self._g0 is None:
            raise RuntimeError("GradientDrift.start was not called")
        return {"every": self.every, "g0_norm_sq": float(self._g0.pow(2).sum()),
                "n_entries": int(self._g0.numel()), "records": self.records}
