"""Merge methods that combine several task vectors into one (``--merge``); one registry entry per method."""
from __future__ import annotations

from typing import Callable, Mapping

from .registry import Registry
from .task_vector import TaskVector

MergeFn = Callable[..., "TaskVector | dict[str, TaskVector]"]

#: name -> ``merge(vectors: Mapping[task, TaskVector], **hparams)`` returning one merged TaskVector, or a dict
#: task -> TaskVector when the method builds one edit per task (TALL-masks). The protocols then scale the
#: result by one coefficient chosen on validation data (θ0 + α · merged).
MERGES: Registry[MergeFn] = Registry("merge method")


@MERGES.register("sum")
def merge_sum(vectors: Mapping[str, TaskVector], **_: object) -> TaskVector:
    """Task arithmetic: the plain sum of the task vectors."""
    vs = list(vectors.values())
    if not vs:
        raise ValueError("no task vectors to merge")
    return sum(vs[1:], vs[0])


def merge(name: str, vectors: Mapping[str, TaskVector], **hparams: object) -> "TaskVector | dict[str, TaskVector]":
    """Merge ``vectors`` with the registered method ``name`` (unknown names raise with the valid list)."""
    return MERGES.get(name)(vectors, **hparams)
