"""Download and arrange the vision datasets into the layouts ``vision/datasets.py`` reads.

    python vision/prepare_datasets.py --dataset all --data-location ~/data
    python vision/prepare_datasets.py --dataset SUN397 --data-location ~/data      # prints manual steps
    python vision/prepare_datasets.py --dataset synthetic --data-location /tmp/d   # generated smoke data

Automatic (torchvision downloads): MNIST, SVHN, GTSRB, EuroSAT (re-split 80/10/10 into EuroSAT_splits/),
DTD (official partition 1: train+val -> dtd/train, test -> dtd/test). Manual (licences or dead links):
Cars, RESISC45, SUN397, ImageNet -- the steps are printed, and once the raw files are in place a re-run
arranges SUN397 and ImageNet itself. Datasets already in place are left untouched. Exit status 0 when every
requested dataset is ready, 1 when some still need manual steps, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # `python vision/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (vision/datasets.py would shadow HF `datasets`)

from vision.datasets import DATASETS, DatasetNotFoundError, base_name  # noqa: E402
from vision.synthetic import SYNTHETIC_TASKS, make_synthetic_datasets  # noqa: E402

__all__ = ["main", "instructions", "PAPER_DATASETS"]

#: What ``--dataset all`` prepares: the eight tasks and the control.
PAPER_DATASETS = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN", "ImageNet"]


def _q(path: Path) -> str:
    """``path`` quoted for the shell lines of the printed instructions."""
    return shlex.quote(str(path))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk), copying when links are impossible (other device)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------------
# Manual instructions
# --------------------------------------------------------------------------------------------------
def _cars_steps(loc: Path) -> str:
    d = loc / "stanford_cars"
    return f"""\
Stanford Cars: the official ai.stanford.edu links are dead; use the Kaggle mirrors.
  1. pip install kaggle scipy   (torchvision reads the .mat annotations with scipy)
  2. mkdir -p {_q(d)} && cd {_q(d)}
     kaggle datasets download -d jessicali9530/stanford-cars-dataset && unzip stanford-cars-dataset.zip
     kaggle datasets download -d abdelrahmant11/standford-cars-dataset-meta && unzip standford-cars-dataset-meta.zip
  3. Arrange exactly this layout (the zips nest cars_train/cars_train and cars_test/cars_test: flatten them;
     the devkit comes from car_devkit.tgz: tar -xzf car_devkit.tgz):
       {d}/devkit/cars_meta.mat
       {d}/devkit/cars_train_annos.mat
       {d}/cars_train/00001.jpg ...
       {d}/cars_test/00001.jpg ...
       {d}/cars_test_annos_withlabels.mat   (rename 'cars_test_annos_withlabels (1).mat' if needed)
  Alternative: an ImageFolder copy at {loc / 'stanford_cars_folder_based'}/{{train,test}}/<class name>/*.jpg"""


def _resisc45_steps(loc: Path) -> str:
    d = loc / "resisc45"
    base = "https://storage.googleapis.com/remote_sensing_representations"
    return f"""\
RESISC45 must be downloaded by hand.
  1. Download NWPU-RESISC45.rar (the authors' OneDrive link, or Google Drive id
     1DnPSU5nVSN7xv95bpZ3XQ0JhKXZOKgIv) and extract it into {d}:
       mkdir -p {_q(d)} && cd {_q(d)} && unrar x NWPU-RESISC45.rar
     giving {d}/NWPU-RESISC45/<class>/<class>_NNN.jpg (45 class folders).
  2. Fetch the splits of "In-domain representation learning for remote sensing" into {d}:
       wget -P {_q(d)} {base}/resisc45-train.txt {base}/resisc45-val.txt {base}/resisc45-test.txt
  Train = resisc45-train.txt, test = resisc45-test.txt (resisc45-val.txt is not used)."""


def _sun397_steps(loc: Path) -> str:
    return f"""\
SUN397 must be downloaded by hand (about 37 GB).
  1. cd {_q(loc)} && wget http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz && tar -xzf SUN397.tar.gz
     giving {loc / 'SUN397'}/a/abbey/sun_*.jpg ...
  2. cd {_q(loc / 'SUN397')} && wget https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip && unzip Partitions.zip
     giving ClassName.txt, Training_01.txt and Testing_01.txt (directly or under Partitions/).
  3. Re-run this command: it arranges partition 01 into {loc / 'sun397'}/train/<a_abbey>/ and
     {loc / 'sun397'}/test/<a_abbey>/ (hard links, no extra disk). task_vectors copies that keep the
     test split in sun397/val/ are read as they are."""


def _imagenet_steps(loc: Path) -> str:
    d = loc / "imagenet"
    return f"""\
ImageNet (ILSVRC2012) needs an image-net.org account.
  1. Download ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz into {d}
     (pip install scipy: the devkit metadata is a .mat file).
  2. Re-run this command: torchvision unpacks them into {d}/train/<wnid>/ and {d}/val/<wnid>/.
  Existing copies with {d}/train/<wnid>/ and {d}/val_in_folder/<wnid>/ (task_vectors) work as they are.
  ImageNetVal = 5,000 images held out from the train split (seeded); the test split is the official val."""


_MANUAL: dict[str, Callable[[Path], str]] = {
    "Cars": _cars_steps,
    "RESISC45": _resisc45_steps,
    "SUN397": _sun397_steps,
    "ImageNet": _imagenet_steps,
}


def instructions(name: str, location: str | os.PathLike) -> str:
    """The manual preparation steps of ``name`` (empty for datasets this script downloads itself)."""
    step = _MANUAL.get(base_name(name))
    return step(Path(location).expanduser()) if step else ""


# --------------------------------------------------------------------------------------------------
# Automatic preparation (network) and arranging of manually downloaded files
# --------------------------------------------------------------------------------------------------
def _prepare_mnist(loc: Path) -> None:
    import torchvision.datasets as tvd

    for train in (True, False):
        tvd.MNIST(root=str(loc), train=train, download=True)


def _prepare_svhn(loc: Path) -> None:
    # download_url directly: the SVHN class would also parse the .mat (scipy) just to download.
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_url

    for split in ("train", "test"):
        url, filename, md5 = tvd.SVHN.split_list[split]
        download_url(url, str(loc / "svhn"), filename, md5)


def _prepare_gtsrb(loc: Path) -> None:
    import torchvision.datasets as tvd

    for split in ("train", "test"):
        tvd.GTSRB(root=str(loc), split=split, download=True)


def _prepare_eurosat(loc: Path, seed: int = 0) -> None:
    """torchvision's EuroSAT (27,000 images) randomly re-split 80/10/10 into EuroSAT_splits/{train,val,test}.

    The original task_vectors split (21,600/2,700/2,700) was random and unpublished; this one has the
    same sizes and is reproducible. ``val`` is written for compatibility only: EuroSATVal follows the
    common 10%-of-train rule like every other task.
    """
    import torch
    import torchvision.datasets as tvd

    tvd.EuroSAT(root=str(loc), download=True)
    source = loc / "eurosat" / "2750"
    files = sorted(p for p in source.glob("*/*") if p.is_file())
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train, n_val = int(0.8 * len(files)), int(0.1 * len(files))
    out = loc / "EuroSAT_splits"
    for rank, i in enumerate(perm):
        split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        _link_or_copy(files[i], out / split / files[i].parent.name / files[i].name)


def _prepare_dtd(loc: Path) -> None:
    """DTD partition 1 (as PAINT / task_vectors): official train+val -> dtd/train, official test -> dtd/test."""
    import torchvision.datasets as tvd

    tvd.DTD(root=str(loc), split="train", partition=1, download=True)
    data = loc / "dtd" / "dtd"
    for target, parts in (("train", ("train1", "val1")), ("test", ("test1",))):
        for part in parts:
            for line in (data / "labels" / f"{part}.txt").read_text().split():
                cls, fname = line.split("/")
                _link_or_copy(data / "images" / cls / fname, loc / "dtd" / target / cls / fname)


def _arrange_sun397(loc: Path) -> bool:
    """Arrange an extracted SUN397 + Partitions into sun397/{train,test}/<class>/; False if files are missing."""
    raw = loc / "SUN397"
    for parts in (raw, raw / "Partitions"):
        if (parts / "Training_01.txt").is_file() and (parts / "Testing_01.txt").is_file():
            break
    else:
        return False
    for target, listing in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        for line in (parts / listing).read_text().split():
            rel = line.strip("/").split("/")  # "/a/abbey/sun_x.jpg" -> ["a", "abbey", "sun_x.jpg"]
            cls = "_".join(rel[:-1])  # "a_abbey"; nested scenes: "a_apartment_building_outdoor"
            _link_or_copy(raw.joinpath(*rel), loc / "sun397" / target / cls / rel[-1])
    return True


def _arrange_imagenet(loc: Path) -> bool:
    """Unpack the ILSVRC2012 archives with torchvision when all three are present; False otherwise."""
    d = loc / "imagenet"
    archives = ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"]
    if not all((d / a).is_file() for a in archives):
        return False
    from torchvision.datasets.imagenet import parse_devkit_archive, parse_train_archive, parse_val_archive

    parse_devkit_archive(str(d))
    if not (d / "train").is_dir():
        parse_train_archive(str(d))
    if not (d / "val").is_dir() and not (d / "val_in_folder").is_dir():
        parse_val_archive(str(d))
    return True


_AUTOMATIC: dict[str, Callable[[Path], None]] = {
    "MNIST": _prepare_mnist,
    "SVHN": _prepare_svhn,
    "GTSRB": _prepare_gtsrb,
    "EuroSAT": _prepare_eurosat,
    "DTD": _prepare_dtd,
}
_ARRANGERS: dict[str, Callable[[Path], bool]] = {"SUN397": _arrange_sun397, "ImageNet": _arrange_imagenet}


def _missing(name: str, loc: Path) -> Path | None:
    """The first missing path of ``name`` under ``loc`` (None when the dataset is complete)."""
    try:
        DATASETS.get(name).check(loc)
        return None
    except DatasetNotFoundError as e:
        return e.path


def _ready(name: str, loc: Path) -> bool:
    return _missing(name, loc) is None


def _prepare_one(name: str, loc: Path, dry_run: bool) -> bool:
    """Prepare ``name`` under ``loc``; print what happens; True when it is ready afterwards."""
    folder = DATASETS.get(name).folder(loc)
    if _ready(name, loc):
        print(f"{name}: ready at {folder}")
        return True
    if name in SYNTHETIC_TASKS:
        if dry_run:
            print(f"{name}: would generate synthetic images under {folder}")
            return False
        make_synthetic_datasets(loc, names=(name,))
    elif name in _AUTOMATIC:
        if dry_run:
            print(f"{name}: would download with torchvision and arrange into {folder}")
            return False
        print(f"{name}: downloading into {loc} ...")
        try:
            _AUTOMATIC[name](loc)
        except Exception as e:  # noqa: BLE001 - one failed download must not stop the other datasets
            print(f"{name}: download failed ({type(e).__name__}: {e}); re-run later or place the files by hand")
    elif name in _ARRANGERS and not dry_run and _ARRANGERS[name](loc):
        print(f"{name}: arranged raw files into {folder}")
    if _ready(name, loc):
        print(f"{name}: ready at {folder}")
        return True
    steps = instructions(name, loc)
    print(f"{name}: not ready: missing {_missing(name, loc)}")
    if steps:
        print(steps)
    return False


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    choices = [*PAPER_DATASETS, *SYNTHETIC_TASKS, *(n for n in DATASETS.names() if n not in PAPER_DATASETS
                                                    and n not in SYNTHETIC_TASKS)]
    p = argparse.ArgumentParser(
        description="Download / arrange vision datasets into the layouts vision/datasets.py reads.",
        epilog="Manual datasets (Cars, RESISC45, SUN397, ImageNet) print the exact steps.",
    )
    p.add_argument("--dataset", required=True,
                   help=f"one of: {', '.join(choices)}; 'all' (the paper's 8 tasks + ImageNet); "
                        "'synthetic' (the generated smoke-test tasks). A 'Val' suffix is ignored.")
    p.add_argument("--data-location", required=True, help="root folder of all datasets (--data-location of the scripts)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; download nothing")
    args = p.parse_args(argv)
    if args.dataset == "all":
        args.names = list(PAPER_DATASETS)
    elif args.dataset == "synthetic":
        args.names = list(SYNTHETIC_TASKS)
    else:
        names = [base_name(n) for n in args.dataset.split(",") if n]
        unknown = [n for n in names if n not in DATASETS]
        if unknown or not names:
            p.error(f"unknown dataset {', '.join(unknown) or repr(args.dataset)}; valid: {', '.join(choices)}, all, synthetic")
        args.names = list(dict.fromkeys(names))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 all ready, 1 manual steps left)."""
    args = _parse(argv)
    loc = Path(args.data_location).expanduser()
    ready = [_prepare_one(name, loc, args.dry_run) for name in args.names]
    return 0 if all(ready) else 1


if __name__ == "__main__":
    sys.exit(main())
