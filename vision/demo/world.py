"""The demo's two worlds of procedurally drawn, captioned images, deterministic from a seed, no downloads.

* ``disjoint`` (the default): seven image domains, one task each, no two alike (:mod:`vision.demo.domains`),
  like the paper's datasets.
* ``overlapping``: every task reads the *same* scenes and asks about one factor of them (below); a task's
  update changes every other task's inputs' features, the setting of the paper's third open question.

An overlapping-world scene (48x48 RGB) holds ``count`` copies of one object (``shape``, ``colour``, ``size``), each in its own
cell of the 8 px grid, in one half of the image (``position``), a rendered letter (``glyph``) in the other half, all over a background
pattern (``texture``)::

    factor    values
    shape     circle, square, triangle, cross, diamond
    colour    red, green, blue, yellow, purple, cyan
    count     one .. four
    position  top, bottom, left, right      (the half that holds the objects)
    size      small, medium, large          (object radius 2.75 / 3.4 / 4 px)
    texture   plain, striped, dotted, checkered
    glyph     E, H, K, P, S, Z              (5x7 bitmap letters, 2 or 3 px per cell)

Every factor is drawn independently and uniformly; continuous nuisances (exact positions, colour jitter,
background brightness, stripe orientation, glyph scale, pixel noise) are random too. The caption of a
scene names its factors, e.g. ``"two large blue triangle shapes on the left side, with the letter k, on
a dotted background"``; pre-training captions name a random subset of them (:func:`caption`).

Each overlapping task (:data:`SCENE_TASKS`) asks about one factor; its class names and zero-shot templates use
the words of the captions. :data:`TASKS` holds the tasks of both worlds, :data:`WORLDS` their target and
control tasks. :func:`write_tasks` writes them as image folders
``<location>/toy_world/<Task>/{train,test}/<k>_<class>/<i>.png`` (``vision.demo.tasks`` registers them
with ``vision.datasets``). Everything is a pure function of the seed: same seed, same bytes.

    python -m vision.demo.world --data-location out/demo/data          # every task, default sizes
"""
from __future__ import annotations

import argparse
import json
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

from .domains import DISJOINT_CONTROL, DISJOINT_TARGETS, DOMAINS, IMAGE_SIZE, Domain

__all__ = [
    "FACTORS", "SCENE_TASKS", "TASKS", "WORLDS", "TARGET_TASKS", "CONTROL_TASK", "IMAGE_SIZE", "SUBDIR", "Scene",
    "Task", "sample_scene", "render", "caption", "scene_rng", "write_tasks", "class_folder", "draw_example",
]

SUBDIR = "toy_world"
_MARKER = ".toy_world.json"

#: factor -> its values, in label order.
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross", "diamond"),
    "colour": ("red", "green", "blue", "yellow", "purple", "cyan"),
    "count": ("one", "two", "three", "four"),
    "position": ("top", "bottom", "left", "right"),
    "size": ("small", "medium", "large"),
    "texture": ("plain", "striped", "dotted", "checkered"),
    "glyph": ("E", "H", "K", "P", "S", "Z"),
}

_COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 235),
    "yellow": (230, 215, 40), "purple": (165, 60, 205), "cyan": (40, 205, 215),
}
_RADIUS = {"small": 2.75, "medium": 3.4, "large": 4.0}
_COUNT = {"one": 1, "two": 2, "three": 3, "four": 4}
# 5x7 bitmaps of the glyph letters (rows top to bottom).
_FONT = {
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A downstream classification task: the factor it asks about, its class names and templates."""

    name: str
    factor: str
    classnames: tuple[str, ...]  # in label order (one per value of the factor)
    templates: tuple[str, ...]  # '{}' strings, filled with each class name for the zero-shot head

    @property
    def values(self) -> tuple[str, ...]:
        return FACTORS[self.factor]

    @property
    def n_classes(self) -> int:
        return len(self.values)


_COUNT_NAMES = ("one shape", "two shapes", "three shapes", "four shapes")

#: The overlapping world's six target tasks, then its negation control (size). Names must not end in "Val".
SCENE_TASKS: dict[str, Task] = {t.name: t for t in (
    Task("ToyShape", "shape", FACTORS["shape"],
         ("a {} shape.", "an image of {} shapes.", "a picture with a {} shape.")),
    Task("ToyColor", "colour", FACTORS["colour"],
         ("a {} shape.", "an image of {} shapes.", "a picture with {} shapes.")),
    Task("ToyCount", "count", _COUNT_NAMES,
         ("{}.", "an image of {}.", "a picture with {}.")),
    Task("ToyPosition", "position", FACTORS["position"],
         ("shapes on the {} side.", "an image with shapes on the {} side.")),
    Task("ToyTexture", "texture", FACTORS["texture"],
         ("a {} background.", "shapes on a {} background.", "an image with a {} background.")),
    Task("ToyGlyph", "glyph", FACTORS["glyph"],
         ("the letter {}.", "an image with the letter {}.", "shapes with the letter {}.")),
    Task("ToySize", "size", FACTORS["size"],
         ("{} shapes.", "an image of {} shapes.", "a picture with a {} shape.")),
)}
TARGET_TASKS = ["ToyShape", "ToyColor", "ToyCount", "ToyPosition", "ToyTexture", "ToyGlyph"]
CONTROL_TASK = "ToySize"

AnyTask = Union[Task, Domain]
#: Every demo task of both worlds (the disjoint domains and the overlapping scene tasks).
TASKS: dict[str, AnyTask] = {**DOMAINS, **SCENE_TASKS}
#: world -> (target tasks, negation control task).
WORLDS: dict[str, tuple[list[str], str]] = {
    "disjoint": (DISJOINT_TARGETS, DISJOINT_CONTROL),
    "overlapping": (TARGET_TASKS, CONTROL_TASK),
}


def class_folder(task: AnyTask, label: int) -> str:
    """Folder name of class ``label``: ``<label>_<value>`` so that sorted folders give label order."""
    value = task.values[label] if isinstance(task, Task) else task.classnames[label]
    return f"{label}_{value}"


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """The discrete factors of one scene (continuous nuisances are drawn at render time)."""

    shape: str
    colour: str
    count: str
    position: str
    size: str
    texture: str
    glyph: str

    def label(self, task: Task) -> int:
        """Class index of this scene in ``task``."""
        return task.values.index(getattr(self, task.factor))


def scene_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator keyed by ``seed`` and strings (crc32: stable across processes, unlike ``hash``)."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(k.encode()) for k in keys])


def sample_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """A scene with every factor uniform, except those given in ``fixed`` (factor=value)."""
    for k, v in fixed.items():
        if k not in FACTORS or v not in FACTORS[k]:
            raise ValueError(f"bad factor value {k}={v!r}")
    values = {f: fixed[f] if f in fixed else vals[rng.integers(len(vals))] for f, vals in FACTORS.items()}
    return Scene(**values)


def _object_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in unit coordinates (u right, v down; radius 1)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    if shape == "triangle":  # apex up
        return (v >= -1.0) & (v <= 0.85) & (np.abs(u) <= (v + 1.0) * 0.55)
    if shape == "cross":
        return ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


_SS = 4  # supersampling per pixel side (anti-aliased edges)


def _paint(img: np.ndarray, cy: float, cx: float, r: float, shape: str, colour: np.ndarray) -> None:
    """Alpha-blend an anti-aliased ``shape`` of radius ``r`` centred at (cy, cx) (pixel units) into ``img``."""
    s = img.shape[0]
    y0, y1 = max(0, int(np.floor(cy - r - 1))), min(s, int(np.ceil(cy + r + 1)))
    x0, x1 = max(0, int(np.floor(cx - r - 1))), min(s, int(np.ceil(cx + r + 1)))
    sub = (np.arange(_SS) + 0.5) / _SS
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1)
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1)
    v, u = np.meshgrid((ys - cy) / r, (xs - cx) / r, indexing="ij")
    inside = _object_mask(shape, u, v).astype(np.float32)
    alpha = inside.reshape(y1 - y0, _SS, x1 - x0, _SS).mean(axis=(1, 3))[..., None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + colour * alpha


def _halves(position: str, s: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(objects region, glyph region) as (y0, y1, x0, x1): the named half and the opposite one."""
    h = s // 2
    regions = {"top": (0, h, 0, s), "bottom": (h, s, 0, s), "left": (0, s, 0, h), "right": (0, s, h, s)}
    opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
    return regions[position], regions[opposite[position]]


CELL = 8  # objects sit in the cells of this grid: the patch grid of talos-toy-clip (patch size 8)


def _place(rng: np.random.Generator, n: int, region: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Centres of ``n`` objects: distinct random grid cells of ``region``, jittered by up to 1 px.

    One object per 8x8 cell, aligned with the ViT's patches: a tiny ViT fine-tuned for a few dozen steps
    cannot learn shapes whose silhouettes straddle patches at arbitrary offsets (measured: chance level),
    while glyphs and positions, which span several patches, need no such help.
    """
    y0, y1, x0, x1 = region
    cells = [(y, x) for y in range(y0, y1, CELL) for x in range(x0, x1, CELL)]
    chosen = rng.choice(len(cells), size=n, replace=False)
    jitter = rng.uniform(-1.0, 1.0, (n, 2))
    return [(cells[c][0] + CELL / 2 + j[0], cells[c][1] + CELL / 2 + j[1]) for c, j in zip(chosen, jitter)]


def _background(rng: np.random.Generator, texture: str, s: int) -> np.ndarray:
    base = rng.uniform(30, 80)
    amp = 38.0
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    if texture == "plain":
        pattern = np.zeros((s, s), np.float32)
    elif texture == "striped":
        period = rng.uniform(5, 7)
        coord = y if rng.random() < 0.5 else x
        pattern = (((coord + rng.uniform(0, period)) % period) < period / 2).astype(np.float32)
    elif texture == "dotted":
        period = rng.uniform(5, 7)
        oy, ox = rng.uniform(0, period, 2)
        dy = (y + oy) % period - period / 2
        dx = (x + ox) % period - period / 2
        pattern = (dy * dy + dx * dx <= 1.5**2).astype(np.float32)
    elif texture == "checkered":
        cell = rng.uniform(3.5, 5)
        oy, ox = rng.uniform(0, cell, 2)
        pattern = ((np.floor((y + oy) / cell) + np.floor((x + ox) / cell)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    tint = rng.uniform(-8, 8, 3)
    return (base + amp * pattern)[..., None] + tint  # (s, s, 3)


def _glyph(img: np.ndarray, rng: np.random.Generator, letter: str, region: tuple[int, int, int, int]) -> None:
    bitmap = np.array([[c == "#" for c in row] for row in _FONT[letter]])  # (7, 5)
    scale = int(rng.integers(2, 4))  # 2 or 3 pixels per cell
    g = np.kron(bitmap, np.ones((scale, scale), bool))  # (7*scale, 5*scale)
    y0, y1, x0, x1 = region
    gy = int(rng.integers(y0 + 1, y1 - g.shape[0]))
    gx = int(rng.integers(x0 + 1, x1 - g.shape[1]))
    colour = rng.uniform(195, 250) + rng.uniform(-5, 5, 3)
    img[gy : gy + g.shape[0], gx : gx + g.shape[1]][g] = colour


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as an ``(size, size, 3)`` uint8 array; nuisances are drawn from ``rng``."""
    if size != IMAGE_SIZE:
        raise ValueError(f"the world is drawn at {IMAGE_SIZE}x{IMAGE_SIZE}")
    img = _background(rng, scene.texture, size)
    obj_region, glyph_region = _halves(scene.position, size)
    r = _RADIUS[scene.size]
    colour = np.clip(np.array(_COLOURS[scene.colour], np.float32) + rng.uniform(-25, 25, 3), 0, 255)
    for cy, cx in _place(rng, _COUNT[scene.count], obj_region):
        _paint(img, cy, cx, r, scene.shape, colour)
    _glyph(img, rng, scene.glyph, glyph_region)
    img = img + rng.normal(0, 5, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------
def caption(scene: Scene, rng: np.random.Generator | None = None, keep: float | dict[str, float] = 1.0,
            unnamed: dict[str, Sequence[str]] | None = None) -> str:
    """The scene's caption. With ``rng`` and ``keep < 1``, each factor is named with probability
    ``keep`` (a number, or one per factor; at least one factor is always named) and the trailing clauses
    come in random order.
    Factors whose value is in ``unnamed[factor]`` are never named (pre-training's held-out words).

    Words are the ones the downstream templates use: ``<count> <size> <colour> <shape> shape(s)``,
    ``on the <position> side``, ``with the letter <glyph>``, ``on a <texture> background``.
    """
    names = [f for f in FACTORS if getattr(scene, f) not in (unnamed or {}).get(f, ())]
    p = {f: float(keep[f] if isinstance(keep, dict) else keep) for f in FACTORS}
    full = rng is None or all(v >= 1.0 for v in p.values())
    if full:
        named = set(names)
    else:
        named = {f for f in names if rng.random() < p[f]}
        if not named:
            named = {names[int(rng.integers(len(names)))]}
    plural = scene.count != "one"
    words = [getattr(scene, f) for f in ("count", "size", "colour", "shape") if f in named]
    noun = " ".join(words + ["shapes" if plural else "shape"])
    clauses = []
    if "position" in named:
        clauses.append(f"on the {scene.position} side")
    if "glyph" in named:
        clauses.append(f"with the letter {scene.glyph.lower()}")
    if "texture" in named:
        clauses.append(f"on a {scene.texture} background")
    if not full and len(clauses) > 1:
        clauses = [clauses[i] for i in rng.permutation(len(clauses))]
    return ", ".join([noun] + clauses) if len(clauses) > 1 else " ".join([noun] + clauses)


# --------------------------------------------------------------------------------------------------
# Image folders of the downstream tasks
# --------------------------------------------------------------------------------------------------
def _prepare(folder: Path) -> None:
    if folder.exists():
        if not (folder / _MARKER).is_file():
            raise FileExistsError(f"{folder} exists and was not written by vision.demo.world; refusing to replace it")
        shutil.rmtree(folder)


def draw_example(task: AnyTask, label: int, rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    """One image of class ``label`` of ``task``: (uint8 (48, 48, 3), full caption, factors)."""
    if isinstance(task, Domain):
        return task.draw(label, rng), task.caption(label), {"domain": task.name, "class": task.classnames[label]}
    scene = sample_scene(rng, **{task.factor: task.values[label]})
    return render(scene, rng), caption(scene), asdict(scene)


def write_tasks(
    location: str | Path,
    tasks: Iterable[str] | None = None,
    n_train: int = 1000,
    n_test: int = 400,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the image folders of ``tasks`` (default: all) under ``location/toy_world``; task -> folder.

    Class of image ``i`` is ``i % n_classes``; the other factors are random. Each split also gets
    ``captions.jsonl`` (path, caption, factors). A folder whose marker records the same settings is kept
    as is (so re-runs are free); one written with other settings is replaced.
    """
    from PIL import Image

    names = list(TASKS) if tasks is None else list(tasks)
    root = Path(location).expanduser() / SUBDIR
    out: dict[str, Path] = {}
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown toy task {name!r}; valid: {', '.join(TASKS)}")
        task = TASKS[name]
        folder = root / name
        meta = {"task": name, "n_train": n_train, "n_test": n_test, "seed": seed, "image_size": IMAGE_SIZE,
                "classes": [class_folder(task, i) for i in range(task.n_classes)]}
        marker = folder / _MARKER
        if marker.is_file() and json.loads(marker.read_text()) == meta:
            out[name] = folder
            continue
        _prepare(folder)
        for split, n in (("train", n_train), ("test", n_test)):
            if n < task.n_classes:
                raise ValueError(f"{name}: {split} needs at least one image per class, got {n}")
            rng = scene_rng(seed, "task", name, split)
            for i in range(task.n_classes):
                (folder / split / class_folder(task, i)).mkdir(parents=True, exist_ok=True)
            lines = []
            for i in range(n):
                label = i % task.n_classes
                image, text, factors = draw_example(task, label, rng)
                rel = f"{split}/{class_folder(task, label)}/{i:05d}.png"
                Image.fromarray(image, mode="RGB").save(folder / rel)
                lines.append(json.dumps({"path": rel, "label": label, "caption": text, "factors": factors}))
            (folder / split / "captions.jsonl").write_text("\n".join(lines) + "\n")
        marker.write_text(json.dumps(meta, indent=1) + "\n")
        out[name] = folder
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(description="Write the demo world's downstream tasks as image folders")
    p.add_argument("--data-location", required=True)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: both worlds)")
    p.add_argument("--n-train", type=int, default=1000, help="images per task in the train split (10%% become Val)")
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = write_tasks(a.data_location, [t for t in a.tasks.split(",") if t], a.n_train, a.n_test, a.seed)
    for name, folder in out.items():
        print(f"{name}: {folder}")
    return out


if __name__ == "__main__":
    main()
