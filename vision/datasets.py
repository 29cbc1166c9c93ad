"""Vision datasets: one registry of specs that find, check and load each task's data under --data-location.

Splits (the rule every task follows, ImageNet included)::

    <Name>,    "train" -> official train split MINUS the held-out validation images
    <Name>,    "test"  -> official test split
    <Name>Val, "train" -> the same train-minus-val images as <Name>/"train"
    <Name>Val, "test"  -> the validation images: 10% of the official train split, at most 5,000,
                          drawn with torch.randperm seeded 0 (identical to task_vectors' random_split)

Exception, as in the official code: a dataset whose layout ships its own validation folder (EuroSAT's
``EuroSAT_splits/val``, the official ``EuroSATVal``) uses it as ``<Name>Val/"test"``, and then every "train"
is the full train folder (disjoint from it already). Without that folder the 10% rule applies (logged).

Fine-tuning never sees the validation images (they calibrate TaLoS masks and choose merge
coefficients), which is why ``get_dataset(<Name>, "train")`` already excludes them. ``spec.build("train")``
is the full official train split, for callers that need it explicitly.

Adding a dataset takes one spec and one registry line, e.g. for ``<location>/flowers/{train,test}/<class>/``::

    from vision.datasets import ImageFolderSpec, register_dataset
    register_dataset(ImageFolderSpec("Flowers", "flowers", templates=["a photo of a {}, a type of flower."]))

after which ``get_dataset("FlowersVal", "test", preprocess, location)`` works like the built-in tasks.
Registered names must not end in ``Val`` (the suffix selects the validation split). A spec's ``epochs`` is its
fine-tuning preset (what ``--epochs`` defaults to, :func:`epoch_preset`).

This registry holds the paper's datasets and the TALL-masks suites only. Generated datasets (the smoke tasks,
the toy world) register from outside as plugins, modules loaded by name (``talos.registry.load_plugins``, the
scripts' ``--plugins``, e.g. ``--plugins vision.synthetic``).

Nothing here touches the network: missing data raises :class:`DatasetNotFoundError` naming the path and
the command that creates it (:meth:`DatasetSpec.prepare_hint`; ``vision/prepare_datasets.py`` by default).
``check`` only tests that paths exist, so scripts call :func:`check_datasets` before loading any model.
"""
from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset, Subset

from talos.registry import Registry

from .classnames import CARS, FER2013, FLOWERS102, PCAM
from .classnames import CIFAR10 as CIFAR10_CLASSES
from .templates import TEMPLATES, get_templates

__all__ = [
    "DATASETS",
    "EXPECTED_COUNTS",
    "SUITES",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageFolderSpec",
    "FileListDataset",
    "base_name",
    "is_val",
    "check_datasets",
    "dataset_labels",
    "epoch_preset",
    "epoch_presets",
    "get_dataset",
    "prepare_command",
    "register_dataset",
    "split_train_val",
]

logger = logging.getLogger("talos")
Location = str | os.PathLike
SPLITS = ("train", "test")
VAL_SUFFIX = "Val"


# --------------------------------------------------------------------------------------------------
# Names, the validation rule, errors
# --------------------------------------------------------------------------------------------------
def is_val(name: str) -> bool:
    """True when ``name`` asks for a validation split (``"CarsVal"``)."""
    return name.endswith(VAL_SUFFIX) and len(name) > len(VAL_SUFFIX)


def base_name(name: str) -> str:
    """The dataset behind ``name``: ``"CarsVal" -> "Cars"``, ``"Cars" -> "Cars"``."""
    return name[: -len(VAL_SUFFIX)] if is_val(name) else name


def split_train_val(n: int, seed: int = 0, fraction: float = 0.1, max_val: int = 5000) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` of an ``n``-image train split: ``min(int(n * fraction), max_val)`` go to val.

    Reproduces ``torch.utils.data.random_split(range(n), [n - v, v], torch.Generator().manual_seed(seed))``
    exactly (one seeded ``randperm``; the first ``n - v`` entries are train), so the validation images
    are the ones task_vectors-based code holds out. Both lists keep the permutation's order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_val = min(int(n * fraction), max_val)
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"cannot hold out a validation split from {n} images (fraction={fraction})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[: n - n_val], perm[n - n_val :]


def prepare_command(name: str, location: Location) -> str:
    """The shell command that prepares dataset ``name`` under ``location``."""
    return (
        f"python vision/prepare_datasets.py --dataset {shlex.quote(base_name(name))} "
        f"--data-location {shlex.quote(os.fspath(location))}"
    )


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing: names the dataset, the exact path looked for, and the fix."""

    def __init__(self, dataset: str, path: Location, location: Location, alternatives: Sequence[Path] = (),
                 command: str | None = None) -> None:
        self.dataset = dataset
        self.path = Path(path)
        self.location = Path(location)
        self.command = command if command is not None else prepare_command(dataset, location)
        also = f" (also accepted: {', '.join(map(str, alternatives))})" if alternatives else ""
        message = (
            f"dataset {dataset} not found: missing {self.path}{also}. "
            f"Prepare it with: {self.command}"
        )
        # Only the message goes to OSError: setting errno/filename would make str() print "[Errno ...]".
        super().__init__(message)
        self.errors: list[DatasetNotFoundError] = [self]

    @classmethod
    def combine(cls, errors: Sequence["DatasetNotFoundError"]) -> "DatasetNotFoundError":
        """One error for several missing datasets; ``.errors`` keeps each, the message lists them all."""
        if len(errors) == 1:
            return errors[0]
        first = errors[0]
        combined = cls(first.dataset, first.path, first.location, command=first.command)
        combined.dataset = ", ".join(e.dataset for e in errors)
        combined.errors = list(errors)
        combined.args = (f"{len(errors)} datasets not found:\n" + "\n".join(f"  - {e}" for e in errors),)
        return combined


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
class _RGBThen:
    """Convert PIL images to RGB, then apply ``transform`` (``ToTensor`` when None).

    MNIST is greyscale and some JPEG/PNG files are palette or CMYK; CLIP expects 3 channels whatever
    the caller's transform does. A class rather than a lambda so DataLoader workers can pickle it.
    """

    def __init__(self, transform: Callable | None) -> None:
        if transform is None:
            import torchvision.transforms as T

            transform = T.ToTensor()
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        if hasattr(image, "mode") and image.mode != "RGB":
            image = image.convert("RGB")
        return self.transform(image)


class FileListDataset(Dataset):
    """``(path, label)`` samples read with PIL as RGB, transformed, returned as ``(image, int label)``."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None, classes: Sequence[str]) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.transform = _RGBThen(transform)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        return self.transform(image), int(label)


def _scan_image_folder(directory: Path, classes: Sequence[str],
                       labels: Sequence[int] | None = None) -> list[tuple[str, int]]:
    """ImageFolder's sample list for ``directory`` with a fixed class order.

    Same order as ``torchvision.datasets.ImageFolder`` (class-sorted, then sorted file names), which
    keeps the seeded validation split identical to task_vectors'. Taking the classes from the train
    folder keeps labels aligned when a test folder lacks (or adds) a class.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    extra = sorted(set(_list_class_folders(directory)) - set(classes))
    if extra:
        raise ValueError(f"{directory} has class folders absent from the train split: {extra[:5]}")
    class_to_idx = {c: (labels[i] if labels is not None else i) for i, c in enumerate(classes)}
    return make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)


def _list_class_folders(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir())


def _torchvision_datasets():
    # Imported lazily: `check` must stay cheap, and tests monkeypatch classes on this module object.
    import torchvision.datasets as tvd

    return tvd


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------
class DatasetSpec:
    """How one dataset is laid out under ``--data-location``, checked, named and loaded.

    Subclasses implement :meth:`layouts` (the paths each accepted on-disk layout needs, preferred
    layout first), :meth:`classnames` and :meth:`_build`. ``epochs``: the fine-tuning preset (None: the
    dataset has none and ``--epochs`` is required); a dataset whose data is not made by
    ``vision/prepare_datasets.py`` overrides :meth:`prepare_hint`.
    """

    def __init__(self, name: str, subdir: str, templates: Sequence[str] | str, *, epochs: int | None = None) -> None:
        if is_val(name):
            raise ValueError(f"dataset names must not end in {VAL_SUFFIX!r}: {name!r}")
        if isinstance(templates, str) and templates not in TEMPLATES:
            raise ValueError(f"templates must be a list of '{{}}' strings or a family in {list(TEMPLATES)}, "
                             f"got {templates!r}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"{name}: epochs must be >= 1, got {epochs}")
        self.name = name
        self.subdir = subdir
        self._templates = templates
        self.epochs = epochs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.subdir!r})"

    @property
    def templates(self) -> list[str]:
        """Zero-shot templates: ``{}`` strings (a string argument names a family in ``vision.templates``)."""
        if isinstance(self._templates, str):
            return get_templates(self._templates)
        return list(self._templates)

    @staticmethod
    def root(location: Location) -> Path:
        """``location`` as an absolute-ish path (``~`` expanded)."""
        return Path(os.fspath(location)).expanduser()

    def folder(self, location: Location) -> Path:
        """The folder this dataset lives in under ``location``."""
        return self.root(location) / self.subdir

    def layouts(self, location: Location) -> list[list[Path]]:
        """Accepted layouts, preferred first; each is the list of paths that must exist."""
        return [[self.folder(location)]]

    def check(self, location: Location) -> None:
        """Raise :class:`DatasetNotFoundError` unless some accepted layout is complete (existence checks only)."""
        layouts = self.layouts(location)
        for paths in layouts:
            if all(p.exists() for p in paths):
                return
        # Name the first missing path of the preferred layout, and what each other layout lacks
        # (e.g. dtd/val when dtd/test is missing), so the message says exactly what to create.
        first_missing = [next(p for p in paths if not p.exists()) for paths in layouts]
        missing = first_missing[0]
        alternatives = list(dict.fromkeys(p for p in first_missing[1:] if p != missing))
        raise DatasetNotFoundError(self.name, missing, location, alternatives, command=self.prepare_hint(location))

    def prepare_hint(self, location: Location) -> str:
        """The shell command that creates this dataset under ``location`` (named when it is missing)."""
        return prepare_command(self.name, location)

    def classnames(self, location: Location) -> list[str]:
        """Class names in label order (what the zero-shot head is built from)."""
        raise NotImplementedError

    def build_val(self, transform: Callable | None, location: Location) -> Dataset | None:
        """The dataset's own validation split when its layout has one (None: hold out 10% of train)."""
        return None

    def build(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        """The FULL official ``split`` ("train" or "test") yielding ``(image_tensor, label_int)``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.check(location)
        return self._build(split, transform, location)

    def _build(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        raise NotImplementedError


ClassnamesArg = Sequence[str] | Callable[[list[str]], list[str]] | None


class ImageFolderSpec(DatasetSpec):
    """``<location>/<subdir>/<train_dir>/<class>/*`` and a test folder of the same form.

    ``classnames``: ``None`` -> class folder names with ``_`` as spaces; a callable -> applied to the
    sorted folder names; a sequence -> fixed names in label order (checked against the folder count).
    ``test_dirs``: accepted test folder names, first existing wins (e.g. task_vectors stores DTD's and
    SUN397's official test split as ``val``).
    ``official``: the official class list; class folders named by zero-padded label index (``000``, ``001``,
    what ``prepare_datasets.py`` writes when a class name cannot be a folder name) take their names from it,
    and their images are ordered by file name across classes (the source's row order), not class by class.
    ``val_dirs``: folders of an official validation split (EuroSAT's ``val``), used by :meth:`build_val`.
    """

    def __init__(
        self,
        name: str,
        subdir: str,
        templates: Sequence[str] | str,
        classnames: ClassnamesArg = None,
        *,
        train_dir: str = "train",
        test_dirs: Sequence[str] = ("test",),
        official: Sequence[str] | None = None,
        val_dirs: Sequence[str] = (),
        epochs: int | None = None,
    ) -> None:
        super().__init__(name, subdir, templates, epochs=epochs)
        self._classnames = classnames
        self.val_dirs = tuple(val_dirs)
        self.official = list(official) if official is not None else None
        self.train_dir = train_dir
        self.test_dirs = tuple(test_dirs)

    def layouts(self, location: Location) -> list[list[Path]]:
        base = self.folder(location)
        return [[base / self.train_dir, base / t] for t in self.test_dirs]

    def split_dir(self, split: str, location: Location) -> Path:
        """Folder holding ``split`` (the first existing accepted test folder for "test")."""
        base = self.folder(location)
        if split == "train":
            return base / self.train_dir
        for t in self.test_dirs:
            if (base / t).is_dir():
                return base / t
        return base / self.test_dirs[0]

    def class_folders(self, location: Location) -> list[str]:
        """Sorted class folder names of the train split (they define the label order)."""
        return _list_class_folders(self.split_dir("train", location))

    def classnames(self, location: Location) -> list[str]:
        if self._classnames is not None and not callable(self._classnames):
            return list(self._classnames)
        self.check(location)
        folders = self.class_folders(location)
        if self._indexed(folders):
            return list(self.official)
        if callable(self._classnames):
            return list(self._classnames(folders))
        return [f.replace("_", " ") for f in folders]

    def build_val(self, transform: Callable | None, location: Location) -> Dataset | None:
        if not self.val_dirs:
            return None
        self.check(location)
        for d in self.val_dirs:
            if (self.folder(location) / d).is_dir():
                classes = self.class_folders(location)
                return FileListDataset(_scan_image_folder(self.folder(location) / d, classes), transform, classes)
        logger.warning("%s: no %s folder under %s; holding out 10%% of train as %sVal", self.name,
                       "/".join(self.val_dirs), self.folder(location), self.name)
        return None

    def _indexed(self, classes: Sequence[str]) -> bool:
        return self.official is not None and bool(classes) and all(c.isdigit() for c in classes)

    def _build(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        classes = self.class_folders(location)
        if self._indexed(classes):  # label = folder index, names from the official list
            samples = _scan_image_folder(self.split_dir(split, location), classes, [int(c) for c in classes])
            # Exports are named by source row (or original file name): file-name order restores the source's
            # order across classes, which the seeded <Task>Val split depends on (torchvision's for Cars/MNIST).
            samples.sort(key=lambda s: (os.path.basename(s[0]), s[1]))
            return FileListDataset(samples, transform, self.official)
        if self._classnames is not None and not callable(self._classnames) and len(classes) != len(self._classnames):
            raise ValueError(
                f"{self.name}: {self.split_dir('train', location)} has {len(classes)} class folders, "
                f"expected {len(self._classnames)}"
            )
        samples = _scan_image_folder(self.split_dir(split, location), classes)
        return FileListDataset(samples, transform, classes)


class _ImageNetSpec(ImageFolderSpec):
    """ImageNet-1k: ``imagenet/train/<wnid>/`` and ``imagenet/val_in_folder/<wnid>/`` (or ``val/<wnid>/``).

    Class names and templates come from open_clip (``IMAGENET_CLASSNAMES``, ``OPENAI_IMAGENET_TEMPLATES``);
    the sorted wnid folders give the standard label order those names follow.
    """

    def __init__(self) -> None:
        super().__init__("ImageNet", "imagenet", "ImageNet", test_dirs=("val_in_folder", "val"))

    def classnames(self, location: Location) -> list[str]:
        import open_clip

        return list(open_clip.IMAGENET_CLASSNAMES)

    def _build(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        classes = self.class_folders(location)
        if len(classes) != 1000:
            raise ValueError(f"ImageNet: {self.split_dir('train', location)} has {len(classes)} class folders, expected 1000")
        return FileListDataset(_scan_image_folder(self.split_dir(split, location), classes), transform, classes)


class _CarsSpec(DatasetSpec):
    """Stanford Cars in torchvision's layout (needs scipy), or an ImageFolder fallback.

    torchvision layout (what task_vectors reads)::

        stanford_cars/devkit/{cars_meta.mat, cars_train_annos.mat}
        stanford_cars/cars_train/*.jpg
        stanford_cars/cars_test/*.jpg
        stanford_cars/cars_test_annos_withlabels.mat

    fallback: ``stanford_cars_folder_based/{train,test}/<class name>/*.jpg`` (task_vectors' 404 fallback).
    """

    FALLBACK = "stanford_cars_folder_based"

    def __init__(self) -> None:
        super().__init__("Cars", "stanford_cars", "Cars", epochs=35)
        self._folder_spec = ImageFolderSpec("Cars", self.FALLBACK, "Cars", official=CARS)

    def layouts(self, location: Location) -> list[list[Path]]:
        base = self.folder(location)
        torchvision_layout = [
            base / "devkit" / "cars_meta.mat",
            base / "devkit" / "cars_train_annos.mat",
            base / "cars_train",
            base / "cars_test_annos_withlabels.mat",
            base / "cars_test",
        ]
        return [torchvision_layout, *self._folder_spec.layouts(location)]

    def _uses_folders(self, location: Location) -> bool:
        tv = self.layouts(location)[0]
        return not all(p.exists() for p in tv)

    def classnames(self, location: Location) -> list[str]:
        self.check(location)
        if self._uses_folders(location):
            return self._folder_spec.classnames(location)
        try:
            import scipy.io as sio
        except ImportError as e:  # torchvision needs it too; say so before a model loads
            raise ImportError("Stanford Cars annotations are .mat files: pip install scipy") from e
        meta = sio.loadmat(str(self.folder(location) / "devkit" / "cars_meta.mat"), squeeze_me=True)
        return [str(c).replace("_", " ") for c in meta["class_names"].tolist()]

    def _build(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        if self._uses_folders(location):
            return self._folder_spec._build(split, transform, location)
        return _torchvision_datasets().StanfordCars(
            root=str(self.root(location)), split=split, transform=_RGBThen(transform), target_transform=int,
            download=False,
        )


class _NativeOrExport(DatasetSpec):
    """A dataset in its native (torchvision) layout, or the image folders ``prepare_datasets.py`` exports from a
    hub parquet copy: ``<subdir>/{train,test}/<NNN>/`` (label index folders; names from :meth:`fixed_classnames`).

    Subclasses implement ``_native_layouts``, ``_build_native`` and ``fixed_classnames``.
    """

    def _native_layouts(self, location: Location) -> list[list[Path]]:
        raise NotImplementedError

    def _build_native(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        raise NotImplementedError

    def fixed_classnames(self) -> list[str]:
        """The official class names in label order."""
        raise NotImplementedError

    def export_spec(self) -> ImageFolderSpec:
        """The spec of the exported image-folder layout."""
        return ImageFolderSpec(self.name, self.subdir, self._templates, official=self.fixed_classnames())

    def layouts(self, location: Location) -> list[list[Path]]:
        return [*self._native_layouts(location), *self.export_spec().layouts(location)]

    def uses_export(self, location: Location) -> bool:
        """True when no native layout is complete (the exported folders are read instead)."""
        return not any(all(p.exists() for p in paths) for paths in self._native_layouts(location))

    def classnames(self, location: Location) -> list[str]:
        return self.fixed_classnames()

    def _build(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        if self.uses_export(location):
            return self.export_spec()._build(split, transform, location)
        return self._build_native(split, transform, location)


class _MNISTSpec(_NativeOrExport):
    """torchvision MNIST: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or legacy ``processed/``)."""

    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def __init__(self) -> None:
        super().__init__("MNIST", "MNIST", "MNIST", epochs=5)

    def _native_layouts(self, location: Location) -> list[list[Path]]:
        base = self.folder(location)
        return [[base / "raw" / f for f in self.FILES], [base / "processed" / f for f in ("training.pt", "test.pt")]]

    def fixed_classnames(self) -> list[str]:
        return [str(d) for d in range(10)]

    def _build_native(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        return _torchvision_datasets().MNIST(
            root=str(self.root(location)), train=split == "train", transform=_RGBThen(transform),
            target_transform=int, download=False,
        )


class _SVHNSpec(_NativeOrExport):
    """torchvision SVHN under ``svhn/``: ``svhn/{train,test}_32x32.mat`` (needs scipy; label 10 -> digit 0)."""

    def __init__(self) -> None:
        super().__init__("SVHN", "svhn", "SVHN", epochs=4)

    def _native_layouts(self, location: Location) -> list[list[Path]]:
        base = self.folder(location)
        return [[base / "train_32x32.mat", base / "test_32x32.mat"]]

    def fixed_classnames(self) -> list[str]:
        return [str(d) for d in range(10)]

    def _build_native(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        return _torchvision_datasets().SVHN(
            root=str(self.folder(location)), split=split, transform=_RGBThen(transform), target_transform=int,
            download=False,
        )


# The class names OpenAI's CLIP uses for GTSRB (in label order 0..42). Spelling kept as published
# ("horizonal", "bicyle"): heads must match the prompts the reported numbers were obtained with.
GTSRB_CLASSNAMES = [
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
]


class _GTSRBSpec(_NativeOrExport):
    """torchvision GTSRB: ``gtsrb/GTSRB/Training/<00000..00042>/*.ppm``, ``gtsrb/GTSRB/Final_Test/Images/*.ppm``
    and ``gtsrb/GT-final_test.csv`` (test labels)."""

    def __init__(self) -> None:
        super().__init__("GTSRB", "gtsrb", "GTSRB", epochs=11)

    def _native_layouts(self, location: Location) -> list[list[Path]]:
        base = self.folder(location)
        return [[base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images", base / "GT-final_test.csv"]]

    def fixed_classnames(self) -> list[str]:
        return list(GTSRB_CLASSNAMES)

    def _build_native(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        return _torchvision_datasets().GTSRB(
            root=str(self.root(location)), split=split, transform=_RGBThen(transform), target_transform=int,
            download=False,
        )


RESISC45_CLASSES = [
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake",
    "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
    "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship",
    "snowberg", "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland",
]  # sorted: the class index equals ImageFolder's over NWPU-RESISC45/


class _RESISC45Spec(DatasetSpec):
    """NWPU-RESISC45 with the "In-domain representation learning for remote sensing" splits::

        resisc45/NWPU-RESISC45/<class>/<class>_NNN.jpg
        resisc45/resisc45-{train,test}.txt   (one file name per line; -val.txt is not used)
    """

    IMAGES = "NWPU-RESISC45"

    def __init__(self) -> None:
        super().__init__("RESISC45", "resisc45", "RESISC45", epochs=15)

    def split_file(self, split: str, location: Location) -> Path:
        return self.folder(location) / f"resisc45-{split}.txt"

    def layouts(self, location: Location) -> list[list[Path]]:
        base = self.folder(location)
        return [[base / self.IMAGES, self.split_file("train", location), self.split_file("test", location)]]

    def classnames(self, location: Location) -> list[str]:
        return [c.replace("_", " ") for c in RESISC45_CLASSES]

    def _build(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        index = {c: i for i, c in enumerate(RESISC45_CLASSES)}
        images = self.folder(location) / self.IMAGES
        samples = []
        for line in self.split_file(split, location).read_text().splitlines():
            fname = line.strip()
            if not fname:
                continue
            cls = fname.rsplit("_", 1)[0]  # "baseball_diamond_001.jpg" -> "baseball_diamond"
            if cls not in index:
                raise ValueError(f"RESISC45: {fname!r} in {self.split_file(split, location)} names no known class")
            samples.append((str(images / cls / fname), index[cls]))
        # ImageFolder order (class, then file name): keeps the seeded val split equal to task_vectors'.
        samples.sort(key=lambda s: (s[1], s[0]))
        return FileListDataset(samples, transform, RESISC45_CLASSES)


# EuroSAT folder names -> the readable CLIP class names task_vectors uses.
EUROSAT_CLASSNAMES = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}


def _eurosat_names(folders: list[str]) -> list[str]:
    unknown = [f for f in folders if f not in EUROSAT_CLASSNAMES]
    if unknown:
        raise ValueError(f"EuroSAT: unexpected class folders {unknown}; expected {sorted(EUROSAT_CLASSNAMES)}")
    return [EUROSAT_CLASSNAMES[f] for f in folders]


def _sun397_names(folders: list[str]) -> list[str]:
    # Folders are the SUN397 path joined by "_" ("a_abbey", "b_bakery_shop"): drop the letter prefix.
    return [f[2:].replace("_", " ") for f in folders]


class _TorchvisionSpec(DatasetSpec):
    """A torchvision dataset read from its own on-disk layout (``download=False``), as TALL-masks reads it.

    ``root``: folder (relative to ``--data-location``) passed to torchvision as ``root``; ``files``: paths
    (relative to ``<location>/<subdir>``) that must exist; ``splits``: keyword arguments of each split;
    ``classes``: names in label order, or None to take the torchvision dataset's ``classes`` attribute.
    """

    def __init__(self, name: str, subdir: str, tv_class: str, *, root: str, files: Sequence[str],
                 splits: dict[str, dict[str, Any]], classes: Sequence[str] | None = None,
                 epochs: int | None = None) -> None:
        super().__init__(name, subdir, name, epochs=epochs)
        self.tv_class, self.tv_root, self.files, self.splits = tv_class, root, tuple(files), splits
        self._classes = list(classes) if classes is not None else None

    def layouts(self, location: Location) -> list[list[Path]]:
        return [[self.folder(location) / f for f in self.files]]

    def _dataset(self, split: str, location: Location, **extra: Any) -> Dataset:
        cls = getattr(_torchvision_datasets(), self.tv_class)
        return cls(root=str(self.root(location) / self.tv_root), download=False, **self.splits[split], **extra)

    def classnames(self, location: Location) -> list[str]:
        if self._classes is not None:
            return list(self._classes)
        self.check(location)
        return list(self._dataset("test", location).classes)

    def _build(self, split: str, transform: Callable | None, location: Location) -> Dataset:
        return self._dataset(split, location, transform=_RGBThen(transform), target_transform=int)


def _idx_files(prefix: str) -> list[str]:
    """The four idx files of an MNIST-format torchvision dataset under ``prefix``."""
    return [f"{prefix}{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


def _suite_specs() -> list[DatasetSpec]:
    """The twelve datasets TALL-masks adds to the eight tasks (torchvision layouts, FER2013 from the HF Hub),
    with TALL-masks' epoch presets (github:nik-dim/tall_masks, finetune.py ``epochs``)."""
    bool_split = {"train": {"train": True}, "test": {"train": False}}
    named_split = {"train": {"split": "train"}, "test": {"split": "test"}}
    return [
        _TorchvisionSpec("CIFAR10", "cifar-10-batches-py", "CIFAR10", root="", splits=bool_split,
                         epochs=6, files=[*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"],
                         classes=CIFAR10_CLASSES),
        _TorchvisionSpec("CIFAR100", "cifar-100-python", "CIFAR100", root="", splits=bool_split,
                         epochs=6, files=["train", "test", "meta"]),
        _TorchvisionSpec("STL10", "stl10", "STL10", root="stl10", splits=named_split, epochs=60,
                         files=[f"stl10_binary/{f}" for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin",
                                                              "class_names.txt")]),
        _TorchvisionSpec("Flowers102", "flowers102", "Flowers102", root="flowers102", splits=named_split,
                         epochs=147, files=["flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
                         classes=FLOWERS102),
        _TorchvisionSpec("OxfordIIITPet", "OxfordIIITPet", "OxfordIIITPet", root="OxfordIIITPet",
                         splits={"train": {"split": "trainval"}, "test": {"split": "test"}},
                         epochs=82, files=["oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt",
                                           "oxford-iiit-pet/annotations/test.txt"]),
        _TorchvisionSpec("PCAM", "PCAM", "PCAM", root="PCAM", splits=named_split, classes=PCAM,
                         epochs=1, files=[f"pcam/camelyonpatch_level_2_split_{s}_{xy}.h5" for s in ("train", "test")
                                          for xy in ("x", "y")]),
        ImageFolderSpec("FER2013", "fer2013", "FER2013", official=FER2013, epochs=10),
        _TorchvisionSpec("EMNIST", "EMNIST", "EMNIST", root="EMNIST",
                         splits={"train": {"split": "digits", "train": True},
                                 "test": {"split": "digits", "train": False}},
                         epochs=2, files=[f"EMNIST/raw/emnist-digits-{s}-{k}-ubyte" for s in ("train", "test")
                                          for k in ("images-idx3", "labels-idx1")],
                         classes=[str(d) for d in range(10)]),
        _TorchvisionSpec("FashionMNIST", "FashionMNIST", "FashionMNIST", root="FashionMNIST", splits=bool_split,
                         epochs=5, files=_idx_files("FashionMNIST/raw/"),
                         classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                  "Sneaker", "Bag", "Ankle boot"]),
        _TorchvisionSpec("KMNIST", "KMNIST", "KMNIST", root="KMNIST", splits=bool_split,
                         epochs=5, files=_idx_files("KMNIST/raw/"),
                         classes=["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
        _TorchvisionSpec("Food101", "food101", "Food101", root="food101", splits=named_split,
                         epochs=4, files=["food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"]),
        _TorchvisionSpec("RenderedSST2", "RenderedSST2", "RenderedSST2", root="RenderedSST2", splits=named_split,
                         epochs=39, files=["rendered-sst2/train", "rendered-sst2/test"],
                         classes=["negative", "positive"]),
    ]


#: The task suites of the TALL-masks benchmark (github:nik-dim/tall_masks, src/utils/variables_and_paths.py:
#: ALL_DATASETS[:8] / [:14] / [:20], in that order).
SUITES: dict[str, list[str]] = {
    "8": ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN"],
}
SUITES["14"] = [*SUITES["8"], "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013"]
SUITES["20"] = [*SUITES["14"], "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST"]

#: Expected (classes, images) of each dataset's FULL official splits, what ``prepare_datasets.py --verify``
#: checks. Counts from the datasets' papers / torchvision docs / the hub cards (see the README's Datasets table).
EXPECTED_COUNTS: dict[str, dict[str, tuple[int, int]]] = {
    "Cars": {"train": (196, 8144), "test": (196, 8041)},
    "DTD": {"train": (47, 3760), "test": (47, 1880)},
    "EuroSAT": {"train": (10, 21600), "test": (10, 2700)},
    "GTSRB": {"train": (43, 26640), "test": (43, 12630)},
    "MNIST": {"train": (10, 60000), "test": (10, 10000)},
    "RESISC45": {"train": (45, 18900), "test": (45, 6300)},
    "SUN397": {"train": (397, 19850), "test": (397, 19850)},
    "SVHN": {"train": (10, 73257), "test": (10, 26032)},
    "ImageNet": {"train": (1000, 1281167), "test": (1000, 50000)},
    "CIFAR10": {"train": (10, 50000), "test": (10, 10000)},
    "CIFAR100": {"train": (100, 50000), "test": (100, 10000)},
    "STL10": {"train": (10, 5000), "test": (10, 8000)},
    "Flowers102": {"train": (102, 1020), "test": (102, 6149)},
    "OxfordIIITPet": {"train": (37, 3680), "test": (37, 3669)},
    "PCAM": {"train": (2, 262144), "test": (2, 32768)},
    "FER2013": {"train": (7, 28709), "test": (7, 7178)},
    "EMNIST": {"train": (10, 240000), "test": (10, 40000)},
    "FashionMNIST": {"train": (10, 60000), "test": (10, 10000)},
    "KMNIST": {"train": (10, 60000), "test": (10, 10000)},
    "Food101": {"train": (101, 75750), "test": (101, 25250)},
    "RenderedSST2": {"train": (2, 6920), "test": (2, 1821)},
}


def dataset_labels(dataset: Dataset) -> list[int]:
    """Every label of ``dataset`` without decoding images (torchvision's label attributes, else iterating)."""
    for attr in ("targets", "labels", "_labels"):
        if hasattr(dataset, attr):
            return [int(x) for x in getattr(dataset, attr)]
    for attr in ("_samples", "samples"):
        value = getattr(dataset, attr, None)
        if value and isinstance(value[0], tuple):
            return [int(x[1]) for x in value]
    return [int(dataset[i][1]) for i in range(len(dataset))]


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register ``spec`` under ``spec.name`` (a name registered twice raises ``ValueError``)."""
    return DATASETS.register(spec.name)(spec)


# The eight tasks with the paper's epoch presets (task_vectors' fine-tuning setting); ImageNet, the negation
# control, is never fine-tuned.
register_dataset(_CarsSpec())
register_dataset(ImageFolderSpec("DTD", "dtd", "DTD", test_dirs=("test", "val"), epochs=76))
register_dataset(ImageFolderSpec("EuroSAT", "EuroSAT_splits", "EuroSAT", _eurosat_names, val_dirs=("val",),
                                 epochs=12))
register_dataset(_GTSRBSpec())
register_dataset(_MNISTSpec())
register_dataset(_RESISC45Spec())
register_dataset(ImageFolderSpec("SUN397", "sun397", "SUN397", _sun397_names, test_dirs=("test", "val"), epochs=14))
register_dataset(_SVHNSpec())
register_dataset(_ImageNetSpec())
for _spec_ in _suite_specs():
    register_dataset(_spec_)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS.get(base_name(name))
    except ValueError as e:
        raise ValueError(f"{e} (append {VAL_SUFFIX!r} to a name for its validation split)") from None


def epoch_preset(name: str) -> int | None:
    """The fine-tuning epochs preset of dataset ``name`` (``Val`` suffix ignored); None for an unknown name or
    a dataset without one."""
    base = base_name(name)
    return DATASETS.get(base).epochs if base in DATASETS else None


def epoch_presets() -> dict[str, int]:
    """``{name: epochs}`` of every registered dataset that has a preset (the ``--epochs`` help lists them)."""
    return {n: DATASETS.get(n).epochs for n in DATASETS.names() if DATASETS.get(n).epochs is not None}


def check_datasets(names: Iterable[str], location: Location) -> None:
    """Check every dataset in ``names`` (``Val`` suffixes ignored) and report all missing ones at once."""
    specs = {}
    for name in names:
        spec = _spec(name)  # unknown names fail before any filesystem check
        specs.setdefault(spec.name, spec)
    errors = []
    for spec in specs.values():
        try:
            spec.check(location)
        except DatasetNotFoundError as e:
            errors.append(e)
    if errors:
        raise DatasetNotFoundError.combine(errors)


def get_dataset(name: str, split: str, transform: Callable | None, location: Location) -> Dataset:
    """Dataset ``name`` ("Cars" or "CarsVal"), ``split`` "train" or "test", yielding ``(image, label_int)``.

    See the module docstring for what each (name, split) pair contains: in short, every "train" is
    train-minus-val, ``<Name>/"test"`` is the official test split, ``<Name>Val/"test"`` the validation
    images. ``transform`` receives an RGB PIL image (``None``: ``ToTensor``).
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test" and not is_val(name):
        return spec.build("test", transform, location)
    own_val = spec.build_val(transform, location)
    if own_val is not None:  # a separate official validation split: train is the whole train folder
        return own_val if split == "test" else spec.build("train", transform, location)
    full = spec.build("train", transform, location)
    train_idx, val_idx = split_train_val(len(full))
    return Subset(full, val_idx if (split == "test") else train_idx)

