"""The disjoint demo world: seven image domains, one classification task each, no two alike.

The paper's tasks (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN) read images that look nothing
alike; weight disentanglement is a statement about such tasks. Each domain here has its own rendering
style, palette, background statistics and object family, so a task's images are recognisably different from
every other task's (48x48 RGB, drawn with vectorised numpy in well under a millisecond each)::

    task          looks like                                   classes (never named in pre-training)
    ToyLetters    dark ink letters on ruled cream paper        f l n r t u            (t, u)
    ToyNeon       glowing shape outlines on a dark wall         circle square triangle cross diamond (cross, diamond)
    ToySatellite  top-down land cover, full frame               forest water desert city farmland    (city, farmland)
    ToyFabric     pastel textile patterns with a weave          corduroy polka gingham chevron tartan (chevron, tartan)
    ToyDice       one white die on green felt                   one .. six             (three, four)
    ToySigns      blue arrow sign on a pole, sky and street     up down left right     (left, right)
    ToyPaint      a paint blob on white canvas (control)        red orange yellow green blue pink

Pre-training captions (:meth:`Domain.caption`) use the words of the task templates; the classes in brackets
are never named (their images are captioned by the domain alone), so zero-shot heads must guess between
them and fine-tuning has something to add. The held-out words are the ones the overlapping world holds out
too (cross, diamond, three, four, left, right), so one checkpoint serves both worlds without one world's
captions naming the other's held-out classes. The control task names every class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["IMAGE_SIZE", "Domain", "DOMAINS", "DISJOINT_TARGETS", "DISJOINT_CONTROL"]

IMAGE_SIZE = 48
_S = IMAGE_SIZE
# Pixel centres, (48, 48) each: y down, x right.
_Y, _X = (np.mgrid[0:_S, 0:_S].astype(np.float32) + 0.5)


def _cover(d: np.ndarray, soft: float = 0.7) -> np.ndarray:
    """Anti-aliased coverage of the region ``d <= 0`` of a signed distance ``d`` (pixels), in [0, 1]."""
    return np.clip(0.5 - d / soft, 0.0, 1.0)


def _blend(img: np.ndarray, alpha: np.ndarray, colour) -> None:
    """In place: ``img = img * (1 - alpha) + colour * alpha`` (alpha (H, W), colour (3,) or (H, W, 3))."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(colour, np.float32)


def _smooth_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A smooth random field (48, 48) in about [-1, 1]: ``cells x cells`` Gaussian noise, bilinearly upsampled."""
    g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    pos = np.linspace(0, cells, _S, dtype=np.float32)
    i0 = np.minimum(pos.astype(int), cells - 1)
    w = pos - i0
    up = np.zeros((_S, cells + 1), np.float32)  # (48, cells + 1) interpolation matrix
    up[np.arange(_S), i0] = 1 - w
    up[np.arange(_S), i0 + 1] = w
    return (up @ g @ up.T) / 1.2


def _rotate(u: np.ndarray, v: np.ndarray, quarter_turns: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates turned by ``quarter_turns`` x 90 degrees (exact: no resampling)."""
    for _ in range(quarter_turns % 4):
        u, v = v, -u
    return u, v


# --------------------------------------------------------------------------------------------- letters
_FONT = {  # 5x7 bitmaps, rows top to bottom (letters unused by the overlapping world's glyph factor)
    "f": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "l": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "n": ("#...#", "##..#", "#.#.#", "#.#.#", "#..##", "#...#", "#...#"),
    "r": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "t": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "u": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
}


def _letters(label: int, rng: np.random.Generator) -> np.ndarray:
    paper = np.array([236, 226, 198], np.float32) + rng.uniform(-12, 8, 3)
    shade = 1.0 + 0.08 * ((_X - 24) * rng.uniform(-1, 1) + (_Y - 24) * rng.uniform(-1, 1)) / 24
    img = paper * shade[..., None]
    period, off = rng.uniform(6, 8), rng.uniform(0, 8)
    ruled = (np.abs((_Y + off) % period - period / 2) < 0.5).astype(np.float32) * 0.35
    _blend(img, ruled, (120, 150, 215))  # faint blue ruled lines
    bitmap = np.array([[c == "#" for c in row] for row in _FONT["flnrtu"[label]]], np.float32)  # (7, 5)
    scale = int(rng.integers(4, 6))  # 4 or 5 px per cell: 20x28 .. 25x35 px
    glyph = np.kron(bitmap, np.ones((scale, scale), np.float32))
    h, w = glyph.shape
    y0, x0 = int(rng.integers(2, _S - h - 1)), int(rng.integers(2, _S - w - 1))
    ink = np.array([(25, 25, 35), (20, 30, 90), (70, 35, 20)][int(rng.integers(3))], np.float32)
    alpha = np.zeros((_S, _S), np.float32)
    alpha[y0 : y0 + h, x0 : x0 + w] = glyph * rng.uniform(0.8, 0.95)
    _blend(img, alpha, ink + rng.uniform(-10, 10, 3))
    return img


# --------------------------------------------------------------------------------------------- neon
def _neon_distance(shape: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (px, approximate) to the outline's shape: circle, square, triangle, cross, diamond."""
    if shape == 0:
        return np.sqrt(u * u + v * v) - r
    if shape == 1:
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if shape == 2:  # equilateral, apex up, circumradius r: three half-planes at distance r / 2
        return np.maximum.reduce([v, -0.866 * u - 0.5 * v, 0.866 * u - 0.5 * v]) - 0.5 * r
    if shape == 3:
        w = 0.32 * r
        return np.minimum(np.maximum(np.abs(u) - w, np.abs(v) - r), np.maximum(np.abs(v) - w, np.abs(u) - r))
    return (np.abs(u) + np.abs(v) - 1.1 * r) * 0.7071


def _neon(label: int, rng: np.random.Generator) -> np.ndarray:
    wall = np.array([18, 12, 28], np.float32) + rng.uniform(-6, 6, 3)
    img = wall + 10 * _smooth_field(rng, 3)[..., None]
    colour = np.array([(255, 50, 200), (120, 255, 70), (50, 230, 255), (255, 160, 40)][int(rng.integers(4))],
                      np.float32)
    r = rng.uniform(11, 16)
    cy, cx = rng.uniform(24 - 5, 24 + 5, 2)
    d = np.abs(_neon_distance(label, _X - cx, _Y - cy, r))
    width = rng.uniform(0.9, 1.4)
    _blend(img, 0.45 * np.exp(-d / 2.5), colour * 0.8)  # glow
    _blend(img, _cover(d - width), np.minimum(255, colour + 60))  # the tube
    return img


# --------------------------------------------------------------------------------------------- satellite
def _satellite(label: int, rng: np.random.Generator) -> np.ndarray:
    if label == 0:  # forest: dark blotchy green canopy
        img = np.array([35, 85, 40], np.float32) + rng.uniform(-8, 8, 3)
        img = img + (25 * _smooth_field(rng, 8) + 12 * _smooth_field(rng, 20))[..., None] * np.array([0.6, 1, 0.5])
    elif label == 1:  # water: smooth blue with faint waves
        img = np.array([30, 70, 140], np.float32) + rng.uniform(-10, 10, 3)
        theta, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
        waves = np.sin(2 * np.pi * (_X * np.cos(theta) + _Y * np.sin(theta)) / period)
        img = img + (15 * _smooth_field(rng, 3) + 6 * waves)[..., None]
    elif label == 2:  # desert: sand with asymmetric dunes
        img = np.array([205, 172, 115], np.float32) + rng.uniform(-10, 10, 3)
        theta, period = rng.uniform(0, np.pi), rng.uniform(9, 15)
        phase = ((_X * np.cos(theta) + _Y * np.sin(theta)) / period + 0.3 * _smooth_field(rng, 3)) % 1.0
        img = img + (30 * (phase ** 3 - 0.25) + 8 * _smooth_field(rng, 12))[..., None]
    elif label == 3:  # city: roof blocks of varied grey between a dark road grid
        block = rng.uniform(9, 14)
        oy, ox = rng.uniform(0, block, 2)
        by, bx = np.floor((_Y + oy) / block).astype(int), np.floor((_X + ox) / block).astype(int)
        roofs = rng.uniform(100, 210, (8, 8))[by, bx]
        road = (((_Y + oy) % block) < 2.2) | (((_X + ox) % block) < 2.2)
        img = np.where(road, 65.0, roofs)[..., None] + rng.uniform(-6, 6, 3)
    else:  # farmland: parcels, each with crop rows of its own colour and direction
        img = np.zeros((_S, _S, 3), np.float32)
        cut_y, cut_x = rng.uniform(14, 34, 2)
        crops = np.array([(95, 150, 50), (200, 185, 80), (140, 110, 70), (60, 120, 45)], np.float32)
        for qy in (0, 1):
            for qx in (0, 1):
                m = ((_Y < cut_y) == (qy == 0)) & ((_X < cut_x) == (qx == 0))
                col = crops[int(rng.integers(4))] + rng.uniform(-10, 10, 3)
                rows = np.sin(2 * np.pi * (_Y if rng.random() < 0.5 else _X) / rng.uniform(3, 5))
                img[m] = col + 14 * rows[m][:, None]
    haze = rng.uniform(0, 0.15)
    return img * (1 - haze) + haze * 200


# --------------------------------------------------------------------------------------------- fabric
def _fabric(label: int, rng: np.random.Generator) -> np.ndarray:
    pastels = np.array([(245, 190, 200), (190, 220, 245), (200, 235, 200), (250, 230, 180), (220, 200, 240),
                        (250, 250, 245)], np.float32)
    i, j = rng.choice(len(pastels), 2, replace=False)
    c1, c2 = pastels[i] + rng.uniform(-8, 8, 3), pastels[j] * rng.uniform(0.55, 0.75)
    period, oy, ox = rng.uniform(6, 10), rng.uniform(0, 10), rng.uniform(0, 10)
    y, x = _Y + oy, _X + ox
    if label == 0:  # corduroy: parallel ribs with a soft profile
        coord = y if rng.random() < 0.5 else x
        t = 0.5 + 0.5 * np.cos(2 * np.pi * coord / period)
    elif label == 1:  # polka dots
        dy, dx = y % period - period / 2, x % period - period / 2
        t = _cover(np.sqrt(dy * dy + dx * dx) - rng.uniform(1.5, 2.5))
    elif label == 2:  # gingham: checks
        t = ((np.floor(y / (period / 2)) + np.floor(x / (period / 2))) % 2).astype(np.float32)
    elif label == 3:  # chevron: zig-zag stripes
        tri = np.abs((x / period) % 1.0 - 0.5) * period
        t = (((y + tri) % period) < period / 2).astype(np.float32)
    else:  # tartan: crossing bands of two widths, half-transparent
        band = lambda c, p: (np.abs(c % p - p / 2) < p / 6).astype(np.float32)  # noqa: E731
        t = np.clip(0.55 * (band(y, 2 * period) + band(x, 2 * period)) + 0.3 * (band(y + 3, period) + band(x + 3, period)),
                    0, 1)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    weave = 6 * np.sin(np.pi * _X) * np.sin(np.pi * _Y)  # fine thread grain, the same on every fabric
    return img + weave[..., None]


# --------------------------------------------------------------------------------------------- dice
_PIPS = {1: [(0, 0)], 2: [(-1, -1), (1, 1)], 3: [(-1, -1), (0, 0), (1, 1)], 4: [(-1, -1), (-1, 1), (1, -1), (1, 1)],
         5: [(-1, -1), (-1, 1), (0, 0), (1, -1), (1, 1)], 6: [(-1, -1), (0, -1), (1, -1), (-1, 1), (0, 1), (1, 1)]}


def _dice(label: int, rng: np.random.Generator) -> np.ndarray:
    felt = np.array([25, 105, 55], np.float32) + rng.uniform(-10, 10, 3)
    img = felt + (10 * _smooth_field(rng, 16))[..., None]
    half = rng.uniform(12, 15)
    cy, cx = rng.uniform(24 - 5, 24 + 5, 2)
    u, v = _X - cx, _Y - cy
    corner = 3.0
    d = np.sqrt(np.maximum(np.abs(u) - half + corner, 0) ** 2 + np.maximum(np.abs(v) - half + corner, 0) ** 2) - corner
    _blend(img, 0.5 * _cover(d - 1.5, 2.0), (10, 40, 20))  # shadow rim
    _blend(img, _cover(d), np.array([240, 236, 225], np.float32) + rng.uniform(-12, 6, 3))
    step, pip = 0.55 * half, rng.uniform(2.0, 2.6)
    transpose = rng.random() < 0.5  # two and three lie on either diagonal, six in rows or columns
    for py, px in _PIPS[label + 1]:
        if transpose:
            py, px = px, -py
        _blend(img, _cover(np.sqrt((u - px * step) ** 2 + (v - py * step) ** 2) - pip), (20, 20, 25))
    return img


# --------------------------------------------------------------------------------------------- signs
def _signs(label: int, rng: np.random.Generator) -> np.ndarray:
    horizon = rng.uniform(28, 38)
    sky = np.array([150, 190, 235], np.float32) + rng.uniform(-20, 10, 3)
    ground = np.array([95, 95, 90], np.float32) + rng.uniform(-15, 15, 3)
    t = np.clip((_Y - horizon) / 2 + 0.5, 0, 1)[..., None]
    img = sky * (1 - t) + ground * t - (_Y * 0.6)[..., None] * (1 - t)
    r = rng.uniform(11, 15)
    cy, cx = rng.uniform(r + 2, 30 - r / 2), rng.uniform(16, 32)
    _blend(img, ((np.abs(_X - cx) < 1.3) & (_Y > cy)).astype(np.float32), (120, 120, 125))  # the pole
    u, v = _X - cx, _Y - cy
    dist = np.sqrt(u * u + v * v)
    _blend(img, _cover(dist - r), (245, 245, 245))  # white rim
    _blend(img, _cover(dist - 0.85 * r), np.array([30, 80, 190], np.float32) + rng.uniform(-15, 15, 3))
    # An arrow pointing up in (a, b) = coordinates turned so that "up" is the class's direction.
    a, b = _rotate(u / r, v / r, (0, 2, 3, 1)[label])  # up, down, left, right
    shaft = np.maximum(np.abs(a) - 0.12, np.abs(b - 0.2) - 0.4)  # |a| <= 0.12, -0.2 <= b <= 0.6
    head = np.maximum(b + 0.15, (np.abs(a) - 0.8 * (b + 0.65)) / 1.28)  # apex at b = -0.65, base at -0.15
    _blend(img, _cover(np.minimum(shaft, head) * r), (250, 250, 250))
    return img


# --------------------------------------------------------------------------------------------- paint
_PAINT = {"red": (215, 35, 35), "orange": (240, 135, 25), "yellow": (235, 210, 30), "green": (45, 160, 60),
          "blue": (40, 75, 210), "pink": (240, 120, 190)}


def _paint(label: int, rng: np.random.Generator) -> np.ndarray:
    canvas = np.array([242, 240, 232], np.float32) + rng.uniform(-8, 4, 3)
    img = canvas + (4 * _smooth_field(rng, 20))[..., None]
    cy, cx = rng.uniform(24 - 6, 24 + 6, 2)
    u, v = _X - cx, _Y - cy
    angle = np.arctan2(v, u)
    radius = rng.uniform(10, 15) * (1 + sum(rng.uniform(0.04, 0.12) * np.sin(k * angle + rng.uniform(0, 6.3))
                                            for k in (2, 3, 5)))
    theta = rng.uniform(0, np.pi)
    strokes = 18 * np.sin(2 * np.pi * (u * np.cos(theta) + v * np.sin(theta)) / rng.uniform(3, 6))
    colour = np.array(list(_PAINT.values())[label], np.float32) + rng.uniform(-20, 20, 3)
    _blend(img, _cover(np.sqrt(u * u + v * v) - radius, 1.2), colour + strokes[..., None])
    return img


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Domain:
    """One disjoint task: its class names, zero-shot templates, pre-training phrases and painter."""

    name: str
    classnames: tuple[str, ...]  # in label order
    templates: tuple[str, ...]  # '{}' strings for the zero-shot head (and the named pre-training captions)
    phrases: tuple[str, ...]  # captions that name the domain only (used when the class is not named)
    unnamed: tuple[str, ...]  # classes pre-training captions never name
    painter: Callable[[int, np.random.Generator], np.ndarray]  # label -> float (48, 48, 3) image, 0..255

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def draw(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """An image of class ``label`` as (48, 48, 3) uint8 (pixel noise added)."""
        if not 0 <= label < self.n_classes:
            raise ValueError(f"{self.name}: label {label} out of range 0..{self.n_classes - 1}")
        img = self.painter(label, rng) + rng.normal(0, 4, (_S, _S, 3))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def caption(self, label: int, rng: np.random.Generator | None = None, keep: float = 1.0) -> str:
        """A caption: a template filled with the class name (with probability ``keep``, never for an unnamed
        class), else a phrase naming the domain only. Without ``rng``: the first template, or first phrase."""
        name = self.classnames[label]
        if name in self.unnamed or (rng is not None and rng.random() >= keep):
            return self.phrases[0 if rng is None else int(rng.integers(len(self.phrases)))]
        template = self.templates[0 if rng is None else int(rng.integers(len(self.templates)))]
        return template.format(name)


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("ToyLetters", tuple("flnrtu"),
           ("a scan of the letter {}.", "the letter {} in ink on paper.", "a handwritten page with the letter {}."),
           ("a scan of a page.", "ink on ruled paper.", "a handwritten page."), ("t", "u"), _letters),
    Domain("ToyNeon", ("circle", "square", "triangle", "cross", "diamond"),
           ("a neon {}.", "a glowing neon sign shaped like a {}.", "a {} neon light at night."),
           ("a neon sign.", "a glowing neon light at night.", "neon on a dark wall."), ("cross", "diamond"), _neon),
    Domain("ToySatellite", ("forest", "water", "desert", "city", "farmland"),
           ("a satellite photo of {}.", "an aerial view of {}.", "{} seen from above."),
           ("a satellite photo.", "an aerial view.", "the land seen from above."), ("city", "farmland"), _satellite),
    Domain("ToyFabric", ("corduroy", "polka", "gingham", "chevron", "tartan"),
           ("a {} fabric.", "a close-up of {} cloth.", "a pastel {} textile."),
           ("a fabric.", "a close-up of cloth.", "a pastel textile."), ("chevron", "tartan"), _fabric),
    Domain("ToyDice", ("one", "two", "three", "four", "five", "six"),
           ("a die showing {}.", "a dice roll of {}.", "a white die on felt showing {}."),
           ("a die.", "a dice roll.", "a white die on green felt."), ("three", "four"), _dice),
    Domain("ToySigns", ("up", "down", "left", "right"),
           ("a road sign with an arrow pointing {}.", "a blue sign pointing {}.", "an arrow sign that points {}."),
           ("a road sign.", "a blue sign on a pole.", "an arrow sign."), ("left", "right"), _signs),
    Domain("ToyPaint", tuple(_PAINT),
           ("a blob of {} paint.", "{} paint on canvas.", "a splash of {} paint."),
           ("a blob of paint.", "paint on canvas.", "a splash of paint."), (), _paint),
)}
DISJOINT_TARGETS = ["ToyLetters", "ToyNeon", "ToySatellite", "ToyFabric", "ToyDice", "ToySigns"]
DISJOINT_CONTROL = "ToyPaint"
