"""Procedurally drawn toy image-classification tasks for tests and CPU smoke runs (no downloads).

Four tasks, each deliberately driven by a different visual factor so that their task vectors differ:

* ``SynthShapes``  - the shape drawn (circle / cross / square / triangle); colour, size, position random.
* ``SynthColors``  - the dominant colour of a blob (blue / green / red / yellow); shape and position random.
* ``SynthStripes`` - stripe orientation (diagonal / horizontal / vertical); colours, period, phase random.
* ``SynthControl`` - texture family (checkerboard / dots / gradient / noise); plays ImageNet's control role.

Factors that do not define a task's label are randomised, so every task is learnable only through its
own factor. Files are written as ``<location>/<name>/{train,test}/<classname>/<index>.png`` (the layout
``vision.datasets`` reads for these names), and output is byte-identical for a given seed.

This module is a plugin: importing it registers the four tasks with ``vision.datasets`` (fine-tuning preset
:data:`EPOCHS`), which knows the paper's datasets only. Scripts load it by name::

    python vision/finetune.py --plugins vision.synthetic --train-dataset SynthShapes ...
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from vision.datasets import DATASETS, ImageFolderSpec, register_dataset

__all__ = ["SYNTHETIC_TASKS", "EPOCHS", "make_synthetic_datasets", "draw_image", "register"]

#: task name -> class names. Kept in sorted order so the class index equals ImageFolder's (sorted folders).
SYNTHETIC_TASKS: dict[str, tuple[str, ...]] = {
    "SynthShapes": ("circle", "cross", "square", "triangle"),
    "SynthColors": ("blue", "green", "red", "yellow"),
    "SynthStripes": ("diagonal", "horizontal", "vertical"),
    "SynthControl": ("checkerboard", "dots", "gradient", "noise"),
}

#: Fine-tuning epochs preset of every synthetic task (the CPU smoke run's setting).
EPOCHS = 2

_MARKER = ".synthetic.json"  # written into each task folder; lets a re-run safely replace its own output

_COLOR_CENTERS = {
    "blue": (40, 70, 220),
    "green": (40, 190, 60),
    "red": (220, 40, 40),
    "yellow": (230, 210, 40),
}

Rng = np.random.Generator


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [-1, 1]."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="ij")


def _background(rng: Rng, size: int, levels: tuple[float, float] = (60, 180)) -> np.ndarray:
    """Grey noisy background of random brightness; it never carries the label."""
    level = rng.uniform(*levels)
    return np.clip(level + rng.normal(0, 12, (size, size, 1)), 0, 255).repeat(3, axis=2)


def _random_color(rng: Rng) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _shape_mask(shape: str, rng: Rng, size: int, r_range: tuple[float, float] = (0.5, 0.75)) -> np.ndarray:
    """Boolean mask of ``shape`` at a random radius, jittered around the centre."""
    y, x = _grid(size)
    r = rng.uniform(*r_range)
    # Modest jitter: large enough that position carries no label, small enough that a tiny
    # randomly initialised network learns the shapes within a smoke run.
    cy, cx = rng.uniform(-min(0.2, 0.95 - r), min(0.2, 0.95 - r), 2)
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":  # apex up; width grows linearly towards the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shapes(label: str, rng: Rng, size: int) -> np.ndarray:
    img = _background(rng, size, (20, 90))
    # Random hue, but always clearly brighter than the (dark) background: the silhouette, not the
    # colour, is the signal, and a consistent contrast sign keeps it learnable from a few images.
    color = _random_color(rng)
    color = np.clip(color - color.mean() + rng.uniform(img.mean() + 100, 255), 0, 255)
    img[_shape_mask(label, rng, size)] = color
    return img


def _draw_colors(label: str, rng: Rng, size: int) -> np.ndarray:
    img = _background(rng, size)
    shape = rng.choice(["circle", "square", "triangle", "cross"])
    color = np.clip(np.array(_COLOR_CENTERS[label]) + rng.uniform(-30, 30, 3), 0, 255)
    img[_shape_mask(shape, rng, size, r_range=(0.5, 0.8))] = color
    return img


def _draw_stripes(label: str, rng: Rng, size: int) -> np.ndarray:
    y, x = _grid(size)
    coord = {"horizontal": y, "vertical": x, "diagonal": (x + y) / np.sqrt(2)}[label]
    if label == "diagonal" and rng.random() < 0.5:  # both diagonals, so "diagonal" is not a single direction
        coord = (x - y) / np.sqrt(2)
    period = rng.uniform(0.25, 0.5)
    on = np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi)) > 0
    a, b = _random_color(rng), _random_color(rng)
    if np.abs(a - b).sum() < 150:
        b = 255 - a
    return np.where(on[..., None], a, b)


def _draw_control(label: str, rng: Rng, size: int) -> np.ndarray:
    a, b = _random_color(rng), _random_color(rng)
    if np.abs(a - b).sum() < 150:
        b = 255 - a
    y, x = _grid(size)
    if label == "checkerboard":
        cell = rng.uniform(0.2, 0.4)
        oy, ox = rng.uniform(0, cell, 2)
        on = (np.floor((y + oy) / cell) + np.floor((x + ox) / cell)) % 2 == 0
        return np.where(on[..., None], a, b)
    if label == "dots":
        img = np.broadcast_to(b, (size, size, 3)).copy()
        for _ in range(rng.integers(6, 14)):
            cy, cx = rng.uniform(-0.9, 0.9, 2)
            img[(y - cy) ** 2 + (x - cx) ** 2 <= rng.uniform(0.06, 0.12) ** 2] = a
        return img
    if label == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = (np.cos(theta) * x + np.sin(theta) * y + 1.5) / 3.0  # in (0, 1)
        return a * t[..., None] + b * (1 - t[..., None])
    if label == "noise":
        return rng.uniform(0, 255, (size, size, 3))
    raise ValueError(f"unknown texture {label!r}")


_DRAWERS: dict[str, Callable[[str, Rng, int], np.ndarray]] = {
    "SynthShapes": _draw_shapes,
    "SynthColors": _draw_colors,
    "SynthStripes": _draw_stripes,
    "SynthControl": _draw_control,
}


def draw_image(task: str, label: str, rng: np.random.Generator, image_size: int = 32) -> Image.Image:
    """One RGB image of class ``label`` of synthetic ``task``, drawn with ``rng``."""
    if task not in _DRAWERS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(SYNTHETIC_TASKS)}")
    if label not in SYNTHETIC_TASKS[task]:
        raise ValueError(f"unknown class {label!r} for {task}; valid: {', '.join(SYNTHETIC_TASKS[task])}")
    pixels = _DRAWERS[task](label, rng, image_size)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def _task_rng(seed: int, task: str, split: str) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process, which would break determinism.
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])


def _prepare_folder(folder: Path) -> None:
    """Empty ``folder`` if it holds an earlier synthetic dataset; refuse to touch anything else."""
    if not folder.exists():
        return
    if not (folder / _MARKER).is_file():
        raise FileExistsError(
            f"{folder} exists and was not written by make_synthetic_datasets; refusing to overwrite it"
        )
    shutil.rmtree(folder)


def make_synthetic_datasets(
    location: str | Path,
    names: Iterable[str] = ("SynthShapes", "SynthColors", "SynthStripes", "SynthControl"),
    n_train: int = 200,
    n_test: int = 100,
    image_size: int = 32,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the synthetic tasks ``names`` under ``location``; return name -> task folder.

    ``n_train`` / ``n_test`` are images per task and split, spread evenly over the classes (class of
    image ``i`` is ``i % n_classes``). Re-running replaces earlier output of this function only.
    """
    names = list(names)
    for name in names:
        if name not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {name!r}; valid: {', '.join(SYNTHETIC_TASKS)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    root = Path(location).expanduser()
    out: dict[str, Path] = {}
    for name in names:
        classes = SYNTHETIC_TASKS[name]
        for split, n in (("train", n_train), ("test", n_test)):
            if n < len(classes):
                raise ValueError(f"{name}: {split} needs at least one image per class ({len(classes)}), got {n}")
        folder = root / name
        _prepare_folder(folder)
        for split, n in (("train", n_train), ("test", n_test)):
            rng = _task_rng(seed, name, split)
            for c in classes:
                (folder / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                label = classes[i % len(classes)]
                draw_image(name, label, rng, image_size).save(folder / split / label / f"{i:05d}.png")
        meta = {"task": name, "classes": list(classes), "n_train": n_train, "n_test": n_test,
                "image_size": image_size, "seed": seed}
        (folder / _MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        out[name] = folder
    return out


def register() -> None:
    """Register every synthetic task with ``vision.datasets`` (idempotent; runs when this module is imported)."""
    for name, classes in SYNTHETIC_TASKS.items():
        if name not in DATASETS:
            register_dataset(ImageFolderSpec(name, name, "Synthetic", classes, epochs=EPOCHS))


register()
