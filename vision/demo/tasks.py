"""The demo world's tasks as a dataset plugin: importing this module registers them with ``vision.datasets``.

The library does not know the demo; scripts load it by name (``--plugins vision.demo.tasks``, what
``vision/demo/run.py`` passes to every script it runs). Each task is an image folder
``<data-location>/toy_world/<Task>/{train,test}/<k>_<value>/`` written by
``python -m vision.demo.world --data-location <data-location>``; ``<Task>Val`` is the usual seeded 10% of
the train split. Class names and templates come from :data:`vision.demo.world.TASKS`. The tasks have no
epoch preset: the demo driver passes ``--epochs``.
"""
from __future__ import annotations

import os
import shlex

from vision.datasets import DATASETS, ImageFolderSpec, Location, register_dataset

from .world import SUBDIR, TASKS, Task

__all__ = ["ToyWorldSpec", "register"]


class ToyWorldSpec(ImageFolderSpec):
    """An :class:`ImageFolderSpec` whose missing-data error names the world generator, not a download."""

    def __init__(self, task: Task) -> None:
        super().__init__(task.name, f"{SUBDIR}/{task.name}", list(task.templates), list(task.classnames))
        self.task = task

    def prepare_hint(self, location: Location) -> str:
        """The world generator writes every demo task (no download exists)."""
        return f"python -m vision.demo.world --data-location {shlex.quote(os.fspath(location))}"


def register() -> None:
    """Register every demo task (idempotent; runs when this module is imported)."""
    for task in TASKS.values():
        if task.name not in DATASETS:
            register_dataset(ToyWorldSpec(task))


register()
