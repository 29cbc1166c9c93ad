"""A picklable stand-in for the task_vectors ``ImageEncoder`` (``torch.save(module)``), for the importer tests.

The real pickles name open_clip's classes; this one rebuilds the same module tree (same attribute names, so the
same ``model.visual.*`` state-dict keys) from torch.nn modules and the classes below, so that the unpickling
child process only imports torch and this file (importing open_clip alone takes several seconds).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (same class name as open_clip's)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Node(nn.Module):
    """A plain container standing in for one of open_clip's module classes."""


def mirror(module: nn.Module) -> nn.Module:
    """``module`` rebuilt from torch.nn leaves, :class:`QuickGELU` and :class:`Node` containers."""
    if type(module).__name__ == "QuickGELU":
        return QuickGELU()
    if isinstance(module, nn.LayerNorm) and type(module) is not nn.LayerNorm:  # open_clip's LayerNorm subclass
        out = nn.LayerNorm(module.normalized_shape, eps=module.eps)
        out.load_state_dict(module.state_dict())
        return out
    if type(module).__module__.startswith("torch.nn"):  # (containers such as nn.Sequential: mirror their children)
        out = copy.deepcopy(module)
        for name, child in module.named_children():
            out.add_module(name, mirror(child))
        return out
    out = Node()
    for name, p in module.named_parameters(recurse=False):
        out.register_parameter(name, nn.Parameter(p.detach().clone()))
    for name, b in module.named_buffers(recurse=False):
        out.register_buffer(name, b.clone(), persistent=name not in module._non_persistent_buffers_set)
    for name, child in module.named_children():
        out.add_module(name, mirror(child))
    return out


class ImageEncoder(nn.Module):
    """An open_clip CLIP under ``.model`` without its text transformer, like the task_vectors authors' class."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        clip = copy.deepcopy(clip)
        delattr(clip, "transformer")
        self.model = mirror(clip)
