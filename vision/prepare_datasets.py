"""Download and arrange the vision datasets into the layouts ``vision/datasets.py`` reads; check and list them.

    python vision/prepare_datasets.py --dataset all --data-location ~/data        # the 8 tasks (+ ImageNet steps)
    python vision/prepare_datasets.py --dataset suite20 --data-location ~/data    # the 20-task suite
    python vision/prepare_datasets.py --dataset DTD --source torchvision --data-location ~/data
    python vision/prepare_datasets.py --dataset all --data-location ~/data --verify   # counts per split
    python vision/prepare_datasets.py --dataset suite20 --data-location ~/data --list # sources, counts, ready?

Every dataset has a list of sources, best first (``--list`` prints them); without ``--source`` the next one
is tried when one fails. Sources: the HF Hub (``huggingface_hub``, no account needed: parquet copies exported
as image files with their original bytes, or archives at a fixed revision with the published md5), torchvision's
downloaders, and plain URLs (resumable, checksummed). ImageNet stays manual (licence): the steps are printed.
Nothing half-written is left under ``--data-location``: downloads wait in ``<data-location>/.downloads/`` (kept
between runs so an interrupted run resumes) and each dataset folder appears by one rename when complete.
Exit status: 0 when every requested dataset is ready (or verifies), 1 otherwise, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # `python vision/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (vision/datasets.py would shadow HF `datasets`)

from vision import classnames as official  # noqa: E402
from vision import data_sources as src  # noqa: E402
from vision.datasets import (  # noqa: E402
    DATASETS, EUROSAT_CLASSNAMES, EXPECTED_COUNTS, SUITES, DatasetNotFoundError, base_name, dataset_labels,
    prepare_command,
)
# This script generates the smoke tasks too, so it loads their plugin (importing it registers them).
from vision.synthetic import SYNTHETIC_TASKS, make_synthetic_datasets  # noqa: E402

__all__ = ["main", "instructions", "PAPER_DATASETS", "SOURCES", "GROUPS", "verify"]

#: What ``--dataset all`` prepares: the eight tasks and the control.
PAPER_DATASETS = [*SUITES["8"], "ImageNet"]
GROUPS = {"all": PAPER_DATASETS, "suite8": SUITES["8"], "suite14": SUITES["14"], "suite20": SUITES["20"],
          "synthetic": list(SYNTHETIC_TASKS)}
DOWNLOADS = ".downloads"
#: torchgeo's pinned copy of NWPU-RESISC45 and the task_vectors split files (md5s as torchgeo publishes them).
RESISC45_REPO, RESISC45_REVISION = "torchgeo/resisc45", "a826b44d938a883185f11ebe3d512d38b464312f"
RESISC45_MD5 = {"NWPU-RESISC45.zip": "75206b2e16446591afa88e2628744886",
                "resisc45-train.txt": "b5a4c05a37de15e4ca886696a85c403e",
                "resisc45-val.txt": "a0770cee4c5ca20b8c32bbd61e114805",
                "resisc45-test.txt": "3dda9e4988b47eb1de9f07993653eb08"}


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _cache(loc: Path, name: str) -> Path:
    """The persistent download folder of ``name`` (kept on failure so that a re-run resumes)."""
    d = loc / DOWNLOADS / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _publish(built: Path, final: Path) -> None:
    """Move a completely prepared folder into place with one rename (never over an existing folder)."""
    if final.exists():
        raise FileExistsError(f"{final} exists but is incomplete; move it away and re-run")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(built, final)


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


# --------------------------------------------------------------------------------------------------
# HF Hub parquet copies -> image folders
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParquetSource:
    """A parquet dataset repo exported to ``<subdir>/{train,test}/<folder(label)>/`` with the official order."""

    repo: str
    subdir: str
    classes: Callable[[], list[str]]  # official class names in label order
    folder: Callable[[int], str]  # official label -> class folder name
    revision: str = "main"
    config: str | None = None  # the repo's subset folder, for repos with several
    image_column: str = "image"
    label_column: str = "label"
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))  # (hub split, our folder)
    optional: tuple[str, ...] = ()  # hub splits exported when the repo has them
    aliases: Callable[[], list[str]] | None = None  # another spelling of the official names (same order)

    def __call__(self, loc: Path) -> None:
        classes = self.classes()
        with src.staging(loc / self.subdir) as tmp:
            for hub_split, folder in self.splits:
                try:
                    files = src.hub_parquet_files(self.repo, self.revision, hub_split, self.config)
                except FileNotFoundError:
                    if hub_split not in self.optional:
                        raise
                    print(f"  {self.repo}: no {hub_split} split (optional)")
                    continue
                n = src.export_parquet(files, tmp / folder, classes, self.folder, image_column=self.image_column,
                                       label_column=self.label_column,
                                       aliases=self.aliases() if self.aliases else ())
                print(f"  {self.repo} {hub_split}: {n} images -> {loc / self.subdir / folder}")


def _index(i: int) -> str:
    return f"{i:03d}"


def _eurosat_classes() -> list[str]:
    return [EUROSAT_CLASSNAMES[f] for f in sorted(EUROSAT_CLASSNAMES)]


def _eurosat_folder(i: int) -> str:
    return sorted(EUROSAT_CLASSNAMES)[i]


def _sun397_folder(i: int) -> str:
    name = official.SUN397[i]  # "apartment building outdoor" -> "a_apartment_building_outdoor" (task_vectors)
    return f"{name[0]}_{name.replace(' ', '_')}"


def _fixed(name: str) -> Callable[[], list[str]]:
    return lambda: list(DATASETS.get(name).fixed_classnames())


# --------------------------------------------------------------------------------------------------
# torchvision downloads (into .downloads/, then one rename)
# --------------------------------------------------------------------------------------------------
def _torchvision_into(loc: Path, name: str, subdir: str, fetch: Callable[[Path], None]) -> None:
    """Run ``fetch(cache_root)``, which must create ``cache_root/<subdir>``, then move that folder into place."""
    cache = _cache(loc, name)
    with src.resumable_torchvision_downloads():
        fetch(cache)
    _publish(cache / subdir, loc / subdir)


def _tv_mnist(loc: Path) -> None:
    import torchvision.datasets as tvd

    _torchvision_into(loc, "MNIST", "MNIST", lambda r: [tvd.MNIST(root=str(r), train=t, download=True)
                                                        for t in (True, False)])


def _tv_svhn(loc: Path) -> None:
    # download_url directly: the SVHN class would also parse the .mat (scipy) just to download.
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_url

    def fetch(root: Path) -> None:
        for split in ("train", "test"):
            url, filename, md5 = tvd.SVHN.split_list[split]
            download_url(url, str(root / "svhn"), filename, md5)

    _torchvision_into(loc, "SVHN", "svhn", fetch)


def _tv_gtsrb(loc: Path) -> None:
    import torchvision.datasets as tvd

    _torchvision_into(loc, "GTSRB", "gtsrb", lambda r: [tvd.GTSRB(root=str(r), split=s, download=True)
                                                        for s in ("train", "test")])


def _tv_eurosat(loc: Path, seed: int = 0) -> None:
    """torchvision's EuroSAT (27,000 images) re-split 80/10/10 with a seeded permutation.

    Same sizes as the standard 21,600/2,700/2,700 split but NOT the same images (the task_vectors split was
    drawn at random and is only distributed as a copy): a fallback, named as such by ``--list``. ``val``
    is EuroSATVal's test split, as in the official code.
    """
    import torch
    import torchvision.datasets as tvd

    cache = _cache(loc, "EuroSAT")
    with src.resumable_torchvision_downloads():
        tvd.EuroSAT(root=str(cache), download=True)
    files = sorted(p for p in (cache / "eurosat" / "2750").glob("*/*") if p.is_file())
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train, n_val = int(0.8 * len(files)), int(0.1 * len(files))
    with src.staging(loc / "EuroSAT_splits") as tmp:
        for rank, i in enumerate(perm):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            _link_or_copy(files[i], tmp / split / files[i].parent.name / files[i].name)


def _tv_dtd(loc: Path) -> None:
    """DTD partition 1 (as task_vectors): official train+val -> dtd/train, official test -> dtd/test."""
    import torchvision.datasets as tvd

    cache = _cache(loc, "DTD")
    with src.resumable_torchvision_downloads():
        tvd.DTD(root=str(cache), split="train", partition=1, download=True)
    data = cache / "dtd" / "dtd"
    with src.staging(loc / "dtd") as tmp:
        for target, parts in (("train", ("train1", "val1")), ("test", ("test1",))):
            for part in parts:
                for line in (data / "labels" / f"{part}.txt").read_text().split():
                    cls, fname = line.split("/")
                    _link_or_copy(data / "images" / cls / fname, tmp / target / cls / fname)


def _tv_suite(name: str) -> Callable[[Path], None]:
    """torchvision download of one suite dataset (the spec knows its class, root and split arguments)."""
    def run(loc: Path) -> None:
        import torchvision.datasets as tvd

        spec = DATASETS.get(name)

        def fetch(cache: Path) -> None:
            for kwargs in spec.splits.values():
                getattr(tvd, spec.tv_class)(root=str(cache / spec.tv_root), download=True, **kwargs)

        _torchvision_into(loc, name, spec.subdir, fetch)

    return run


# --------------------------------------------------------------------------------------------------
# RESISC45 (torchgeo's pinned hub copy) and local arrangers
# --------------------------------------------------------------------------------------------------
def _resisc45(fetch: Callable[[str, Path], Path]) -> Callable[[Path], None]:
    """Unpack NWPU-RESISC45.zip and the split files fetched by ``fetch(filename, cache)`` into resisc45/."""
    def run(loc: Path) -> None:
        import zipfile

        cache = _cache(loc, "RESISC45")
        paths = {f: fetch(f, cache) for f in RESISC45_MD5}
        with src.staging(loc / "resisc45") as tmp:
            with zipfile.ZipFile(paths["NWPU-RESISC45.zip"]) as z:
                z.extractall(tmp)
            for f in ("resisc45-train.txt", "resisc45-val.txt", "resisc45-test.txt"):
                shutil.copyfile(paths[f], tmp / f)

    return run


def _resisc45_hub(filename: str, cache: Path) -> Path:
    return src.hub_file(RESISC45_REPO, filename, RESISC45_REVISION, md5=RESISC45_MD5[filename])


#: Base of the plain-URL fallback (the same pinned files through the hub's resolve endpoint; tests point it
#: at a local server).
RESISC45_URL = f"https://huggingface.co/datasets/{RESISC45_REPO}/resolve/{RESISC45_REVISION}"


def _resisc45_url(filename: str, cache: Path) -> Path:
    return src.download_url(f"{RESISC45_URL}/{filename}", cache / filename, md5=RESISC45_MD5[filename])


def _arrange_sun397(loc: Path) -> None:
    """Arrange an extracted SUN397 + Partitions (``<loc>/SUN397/``) into sun397/{train,test}/<a_abbey>/."""
    raw = loc / "SUN397"
    for parts in (raw, raw / "Partitions"):
        if (parts / "Training_01.txt").is_file() and (parts / "Testing_01.txt").is_file():
            break
    else:
        raise FileNotFoundError(f"no Training_01.txt / Testing_01.txt under {raw} or {raw / 'Partitions'}")
    with src.staging(loc / "sun397") as tmp:
        for target, listing in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
            for line in (parts / listing).read_text().split():
                rel = line.strip("/").split("/")  # "/a/abbey/sun_x.jpg" -> ["a", "abbey", "sun_x.jpg"]
                _link_or_copy(raw.joinpath(*rel), tmp / target / "_".join(rel[:-1]) / rel[-1])


def _arrange_imagenet(loc: Path) -> None:
    """Unpack the ILSVRC2012 archives with torchvision (they must be in ``<loc>/imagenet/``)."""
    d = loc / "imagenet"
    archives = ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"]
    missing = [a for a in archives if not (d / a).is_file()]
    if missing:
        raise FileNotFoundError(f"ImageNet needs {', '.join(missing)} in {d} (manual download)")
    from torchvision.datasets.imagenet import parse_devkit_archive, parse_train_archive, parse_val_archive

    parse_devkit_archive(str(d))
    if not (d / "train").is_dir():
        parse_train_archive(str(d))
    if not (d / "val").is_dir() and not (d / "val_in_folder").is_dir():
        parse_val_archive(str(d))


def _imagenet_steps(loc: Path) -> str:
    d = loc / "imagenet"
    return f"""\
ImageNet (ILSVRC2012) needs an image-net.org account (licence), so it stays manual:
  1. Log in at https://image-net.org/download-images and download ILSVRC2012_img_train.tar (138 GB),
     ILSVRC2012_img_val.tar (6.3 GB) and ILSVRC2012_devkit_t12.tar.gz into {d}:
       mkdir -p {_q(d)}   (pip install scipy: the devkit metadata is a .mat file)
  2. Re-run: python vision/prepare_datasets.py --dataset ImageNet --data-location {_q(loc)}
     torchvision unpacks them into {d}/train/<wnid>/ and {d}/val/<wnid>/.
  Existing copies with {d}/train/<wnid>/ and {d}/val_in_folder/<wnid>/ (task_vectors) work as they are.
  ImageNetVal = 5,000 images held out from the train split (seeded); the test split is the official val."""


def instructions(name: str, location: str | os.PathLike) -> str:
    """The manual preparation steps of ``name`` (empty for datasets this script downloads itself)."""
    return _imagenet_steps(Path(location).expanduser()) if base_name(name) == "ImageNet" else ""


# --------------------------------------------------------------------------------------------------
# The sources of every dataset, best first
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One way to prepare a dataset: ``--source`` name, a one-line description, and the function."""

    name: str
    what: str
    run: Callable[[Path], None]
    same_split_as_task_vectors: bool = True


def _hub(repo: str, subdir: str, classes: Callable[[], list[str]], folder: Callable[[int], str], **kw) -> Source:
    config = f" ({kw['config']})" if kw.get("config") else ""
    what = f"hf://datasets/{repo}{config} (parquet) -> {subdir}/"
    return Source("hub", what, ParquetSource(repo, subdir, classes, folder, **kw))


SOURCES: dict[str, list[Source]] = {
    "Cars": [_hub("tanganke/stanford_cars", "stanford_cars_folder_based", lambda: list(official.CARS), _index)],
    "DTD": [_hub("tanganke/dtd", "dtd", lambda: list(official.DTD), lambda i: official.DTD[i]),
            Source("torchvision", "torchvision DTD partition 1 (train+val / test)", _tv_dtd)],
    "EuroSAT": [_hub("tanganke/eurosat", "EuroSAT_splits", _eurosat_classes, _eurosat_folder,
                     splits=(("train", "train"), ("validation", "val"), ("test", "test")), optional=("validation",),
                     aliases=lambda: sorted(EUROSAT_CLASSNAMES)),
                Source("torchvision", "torchvision EuroSAT, seeded 80/10/10 re-split (NOT the standard split)",
                       _tv_eurosat, same_split_as_task_vectors=False)],
    "GTSRB": [Source("torchvision", "torchvision GTSRB", _tv_gtsrb),
              _hub("tanganke/gtsrb", "gtsrb", _fixed("GTSRB"), _index)],
    "MNIST": [Source("torchvision", "torchvision MNIST", _tv_mnist),
              _hub("ylecun/mnist", "MNIST", _fixed("MNIST"), _index),
              _hub("tanganke/mnist", "MNIST", _fixed("MNIST"), _index)],
    "RESISC45": [Source("hub", f"hf://datasets/{RESISC45_REPO}@{RESISC45_REVISION[:7]} zip + split files (md5)",
                        _resisc45(_resisc45_hub)),
                 Source("url", f"{RESISC45_URL} over plain HTTPS (resumable, md5)", _resisc45(_resisc45_url))],
    "SUN397": [_hub("tanganke/sun397", "sun397", lambda: list(official.SUN397), _sun397_folder),
               Source("local", "arrange an extracted SUN397/ + Partitions (Training_01/Testing_01)", _arrange_sun397)],
    "SVHN": [Source("torchvision", "torchvision SVHN (.mat files)", _tv_svhn),
             _hub("ufldl-stanford/svhn", "svhn", _fixed("SVHN"), _index, config="cropped_digits"),
             _hub("tanganke/svhn", "svhn", _fixed("SVHN"), _index)],
    "ImageNet": [Source("manual", "image-net.org archives placed by hand, unpacked by torchvision", _arrange_imagenet)],
    "FER2013": [_hub("Jeneral/fer-2013", "fer2013", lambda: list(official.FER2013), _index,
                     image_column="img_bytes", label_column="labels")],
}
for _name in SUITES["20"]:
    if _name not in SOURCES:
        SOURCES[_name] = [Source("torchvision", f"torchvision {DATASETS.get(_name).tv_class}", _tv_suite(_name))]


# --------------------------------------------------------------------------------------------------
# Prepare, verify, list
# --------------------------------------------------------------------------------------------------
def _missing(name: str, loc: Path) -> Path | None:
    """The first missing path of ``name`` under ``loc`` (None when the dataset is complete)."""
    try:
        DATASETS.get(name).check(loc)
        return None
    except DatasetNotFoundError as e:
        return e.path


def _prepare_one(name: str, loc: Path, source: str | None, dry_run: bool) -> bool:
    """Prepare ``name`` under ``loc`` from its sources in order (or only ``source``); True when ready."""
    folder = DATASETS.get(name).folder(loc)
    if _missing(name, loc) is None:
        print(f"{name}: ready at {folder}")
        return True
    if name in SYNTHETIC_TASKS:
        if not dry_run:
            make_synthetic_datasets(loc, names=(name,))
        print(f"{name}: {'would generate' if dry_run else 'generated'} synthetic images under {folder}")
        return not dry_run
    for s in [s for s in SOURCES[name] if source in (None, s.name)]:
        if dry_run:
            print(f"{name}: would prepare from {s.what}")
            if instructions(name, loc):
                print(instructions(name, loc))
            return False
        print(f"{name}: preparing from {s.what} ...")
        try:
            s.run(loc)
        except Exception as e:  # noqa: BLE001 - report and try the next source; other datasets go on
            print(f"{name}: source {s.name} failed ({type(e).__name__}: {e})")
            continue
        if _missing(name, loc) is None:
            print(f"{name}: ready at {folder}")
            return True
    print(f"{name}: not ready: missing {_missing(name, loc)}")
    steps = instructions(name, loc)
    if steps:
        print(steps)
    return False


def verify(name: str, loc: Path) -> list[str]:
    """What is wrong with ``name`` under ``loc`` (empty when classes and images per split match the expected)."""
    missing = _missing(name, loc)
    if missing is not None:
        return [f"missing {missing} (prepare it with: {prepare_command(name, loc)})"]
    spec, problems = DATASETS.get(name), []
    for split, (n_classes, n_images) in EXPECTED_COUNTS.get(name, {}).items():
        try:
            labels = dataset_labels(spec.build(split, None, loc))
        except Exception as e:  # noqa: BLE001 - a broken file is one of the things to report
            problems.append(f"{split}: cannot be read ({type(e).__name__}: {e})")
            continue
        if len(set(labels)) != n_classes:
            problems.append(f"{split}: {len(set(labels))} classes, expected {n_classes}")
        if len(labels) != n_images:
            problems.append(f"{split}: {len(labels)} images, expected {n_images}")
    return problems


def _counts(name: str) -> str:
    c = EXPECTED_COUNTS.get(name)
    return f"{c['train'][0]} classes, {c['train'][1]:,} train / {c['test'][1]:,} test" if c else "generated"


def _list_line(name: str, loc: Path) -> str:
    sources = ", ".join(f"{s.name}: {s.what}" for s in SOURCES.get(name, [])) or "generated (vision/synthetic.py)"
    state = "ready" if _missing(name, loc) is None else f"missing {_missing(name, loc)}"
    return f"{name:<14} {_counts(name):<44} {state}\n{'':<14} sources (best first): {sources}"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [n for n in DATASETS.names() if n in SOURCES or n in SYNTHETIC_TASKS]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="ImageNet is manual (licence): its steps are printed.")
    p.add_argument("--dataset", required=True,
                   help=f"comma-separated names ({', '.join(names)}) or a group: {', '.join(GROUPS)} "
                        "('all' = the 8 tasks + ImageNet). A 'Val' suffix is ignored.")
    p.add_argument("--data-location", required=True, help="root folder of all datasets (--data-location of the scripts)")
    p.add_argument("--source", default=None, help="use only this source (hub, torchvision, url, local, manual); "
                                                   "default: each dataset's sources in order (see --list)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; download nothing")
    p.add_argument("--verify", action="store_true", help="count classes and images per split against the expected "
                                                         "numbers and say what is wrong; prepares nothing")
    p.add_argument("--list", action="store_true", help="one line per dataset: sources, expected counts, ready or not")
    args = p.parse_args(argv)
    requested = []
    for item in (n for n in args.dataset.split(",") if n):
        requested += GROUPS[item] if item in GROUPS else [base_name(item)]
    unknown = [n for n in requested if n not in names]
    if unknown or not requested:
        p.error(f"unknown dataset {', '.join(unknown) or repr(args.dataset)}; valid: {', '.join(names)} "
                f"or {', '.join(GROUPS)}")
    args.names = list(dict.fromkeys(requested))
    if args.source is not None:
        lacking = [n for n in args.names if n not in SYNTHETIC_TASKS
                   and args.source not in [s.name for s in SOURCES[n]]]
        if lacking:
            p.error(f"--source {args.source} is not a source of {', '.join(lacking)} "
                    f"({'; '.join(f'{n}: ' + ', '.join(s.name for s in SOURCES[n]) for n in lacking)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 all ready / verified, 1 otherwise)."""
    args = _parse(argv)
    loc = Path(args.data_location).expanduser()
    if args.list:
        for name in args.names:
            print(_list_line(name, loc))
        return 0 if all(_missing(n, loc) is None for n in args.names) else 1
    if args.verify:
        ok = True
        for name in args.names:
            problems = verify(name, loc)
            ok &= not problems
            print(f"{name}: {'ok (' + _counts(name) + ')' if not problems else '; '.join(problems)}")
        return 0 if ok else 1
    ready = [_prepare_one(name, loc, args.source, args.dry_run) for name in args.names]
    return 0 if all(ready) else 1


if __name__ == "__main__":
    sys.exit(main())
