"""Registers the demo world's tasks with ``vision.datasets`` (imported by it, so every script knows them).

Each task is an image folder ``<data-location>/toy_world/<Task>/{train,test}/<k>_<value>/`` written by
``python -m vision.demo.world --data-location <data-location>``; ``<Task>Val`` is the usual seeded 10% of
the train split. Class names and templates come from :data:`vision.demo.world.TASKS`.
"""
from __future__ import annotations

import os
import shlex

from vision.datasets import DATASETS, DatasetNotFoundError, ImageFolderSpec, register_dataset

from .world import SUBDIR, TASKS, Task

__all__ = ["ToyWorldSpec", "register"]


class ToyWorldSpec(ImageFolderSpec):
    """An :class:`ImageFolderSpec` whose missing-data error names the world generator, not a download."""

    def __init__(self, task: Task) -> None:
        super().__init__(task.name, f"{SUBDIR}/{task.name}", list(task.templates), list(task.classnames))
        self.task = task

    def check(self, location) -> None:
        try:
            super().check(location)
        except DatasetNotFoundError as e:
            e.command = f"python -m vision.demo.world --data-location {shlex.quote(os.fspath(location))}"
            e.args = (f"dataset {self.name} not found: missing {e.path}. Generate it with: {e.command}",)
            raise


def register() -> None:
    """Register every demo task (idempotent)."""
    for task in TASKS.values():
        if task.name not in DATASETS:
            register_dataset(ToyWorldSpec(task))


register()
