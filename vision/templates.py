"""Zero-shot CLIP prompt templates per dataset, stored as plain strings with one ``{}`` placeholder.

Form: every template is a ``str`` containing exactly one ``{}`` and no other braces, so
``template.format(classname)`` fills it (this is also the form ``open_clip.build_zero_shot_classifier``
accepts). Strings, unlike lambdas, can be hashed, logged and written to JSON.

The prompts are the ones the task-arithmetic literature (task_vectors) uses for the eight tasks; the
ImageNet entry is open_clip's 80 OpenAI templates, converted to strings the first time it is read
(importing open_clip costs seconds, which ``check`` and ``--help`` should not pay).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator, Mapping

__all__ = ["TEMPLATES", "SYNTHETIC_TEMPLATES", "get_templates", "fill"]


def _grid(pattern: str, *axes: tuple[str, ...]) -> list[str]:
    """Expand a pattern over the cartesian product of ``axes`` (first axis outermost)."""
    out = [pattern]
    for i, axis in enumerate(axes):
        out = [p.replace(f"<{i}>", value) for p in out for value in axis]
    return out


_CARS = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
]
# DTD: article outermost, then the noun the texture is attached to.
_DTD = _grid("a photo of <0> {} <1>.", ("a", "the"), ("texture", "pattern", "thing", "object"))
_EUROSAT = [
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
]
_GTSRB = [
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
]
_DIGITS = ['a photo of the number: "{}".']
# RESISC45: article outermost, then (source, kind) pairs in the order satellite/aerial x imagery/photo/view.
_RESISC45 = [
    f"{source} {kind} of {article}{{}}."
    for article in ("", "a ", "the ")
    for kind in ("imagery", "photo", "view")
    for source in ("satellite", "aerial")
]
_SUN397 = ["a photo of a {}.", "a photo of the {}."]

# The twelve datasets of the 14- and 20-task suites: the prompts of TALL-masks (github:nik-dim/tall_masks,
# src/datasets/templates.py), which come from the CLIP paper's prompt lists.
_CIFAR = [
    template.format(article=article)
    for article in ("a", "the")
    for template in ("a photo of {article} {{}}.", "a blurry photo of {article} {{}}.",
                     "a black and white photo of {article} {{}}.", "a low contrast photo of {article} {{}}.",
                     "a high contrast photo of {article} {{}}.", "a bad photo of {article} {{}}.",
                     "a good photo of {article} {{}}.", "a photo of {article} small {{}}.",
                     "a photo of {article} big {{}}.")
]
_SUITE: dict[str, list[str]] = {
    "CIFAR10": _CIFAR,
    "CIFAR100": _CIFAR,
    "STL10": ["a photo of a {}.", "a photo of the {}."],
    "Flowers102": ["a photo of a {}, a type of flower."],
    "OxfordIIITPet": ["a photo of a {}, a type of pet."],
    "PCAM": ["this is a photo of {}"],
    "FER2013": ["a photo of a {} looking face.", "a photo of a face showing the emotion: {}.",
                "a photo of a face looking {}.", "a face that looks {}.", "they look {}.", "look at how {} they are."],
    "EMNIST": ['a photo of the digit character: "{}".'],
    "FashionMNIST": ["a photo of a {}.", "a photo of the {}."],
    "KMNIST": ["a photo of the character {}."],
    "Food101": ["a photo of {}, a type of food."],
    "RenderedSST2": ["a {} review of a movie."],
}

#: Templates of the generated smoke-test datasets (``vision/synthetic.py``).
SYNTHETIC_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {} image.")

_STATIC: dict[str, list[str]] = {
    "Cars": _CARS,
    "DTD": _DTD,
    "EuroSAT": _EUROSAT,
    "GTSRB": _GTSRB,
    "MNIST": _DIGITS,
    "RESISC45": _RESISC45,
    "SUN397": _SUN397,
    "SVHN": _DIGITS,
    "Synthetic": list(SYNTHETIC_TEMPLATES),
    **_SUITE,
}


@functools.lru_cache(maxsize=None)
def _imagenet() -> tuple[str, ...]:
    """open_clip's 80 OpenAI ImageNet templates as ``{}`` strings (each lambda applied to ``"{}"``)."""
    import open_clip

    return tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)


_LAZY: dict[str, Callable[[], tuple[str, ...]]] = {"ImageNet": _imagenet}


class _TemplateTable(Mapping[str, list[str]]):
    """Read-only dict-like table; values are fresh lists so callers cannot edit the shared data."""

    def __getitem__(self, key: str) -> list[str]:
        if key in _STATIC:
            return list(_STATIC[key])
        if key in _LAZY:
            return list(_LAZY[key]())
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        # Without this, Mapping's default would call __getitem__ and import open_clip for "ImageNet".
        return key in _STATIC or key in _LAZY

    def __iter__(self) -> Iterator[str]:
        return iter([*_STATIC, *_LAZY])

    def __len__(self) -> int:
        return len(_STATIC) + len(_LAZY)


#: dataset (or template family) name -> list of ``{}`` template strings.
TEMPLATES: Mapping[str, list[str]] = _TemplateTable()


def get_templates(name: str) -> list[str]:
    """Templates of ``name``; a ``Val`` suffix is ignored. Unknown names raise ``KeyError``."""
    key = name[: -len("Val")] if name.endswith("Val") and name[: -len("Val")] in TEMPLATES else name
    if key not in TEMPLATES:
        raise KeyError(f"no templates for {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[key]


def fill(template: str, classname: str) -> str:
    """One prompt: ``template`` with its ``{}`` replaced by ``classname`` (braces in the name are safe)."""
    return template.replace("{}", classname, 1)
