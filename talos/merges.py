"""Merge methods that combine several task vectors into one (``--merge``); one registry entry per method."""
from __future__ import annotations

from typing import Callable, Sequence

from .registry import Registry
from .task_vector import TaskVector

MergeFn = Callable[..., TaskVector]

#: name -> ``merge(vectors: Sequence[TaskVector], **hparams) -> TaskVector``. The protocols then scale the
#: merged vector by one coefficient chosen on validation data (θ0 + α · merged).
MERGES: Registry[MergeFn] = Registry("merge method")


@MERGES.register("sum")
def merge_sum(vectors: Sequence[TaskVector], **_: object) -> TaskVector:
    """Task arithmetic: the plain sum of the task vectors."""
    if not vectors:
        raise ValueError("no task vectors to merge")
    return sum(vectors[1:], vectors[0])


def merge(name: str, vectors: Sequence[TaskVector], **hparams: object) -> TaskVector:
    """Merge ``vectors`` with the registered method ``name`` (unknown names raise with the valid list)."""
    return MERGES.get(name)(vectors, **hparams)
