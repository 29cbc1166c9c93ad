"""Vision data layer: every registry dataset's layout on tiny generated fixtures, the Val rule, errors, prep."""
from __future__ import annotations

import functools
import io
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import random_split

from vision import prepare_datasets
from vision.datasets import (
    DATASETS,
    DatasetNotFoundError,
    ImageFolderSpec,
    base_name,
    check_datasets,
    get_dataset,
    is_val,
    split_train_val,
)
from vision.demo.world import TASKS as DEMO_TASKS
from vision.synthetic import SYNTHETIC_TASKS, make_synthetic_datasets
from vision.templates import TEMPLATES, fill, get_templates

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------
# fixture writers
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _encoded(color: tuple[int, int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), color).save(buf, format=fmt)
    return buf.getvalue()


def _img(path: Path, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> Path:
    """A tiny 6x5 image (bytes encoded once per colour and copied: thousands of files stay fast)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encoded(color, fmt))
    return path


def _folders(root: Path, classes: list[str], n: int, ext: str = "png") -> None:
    for ci, c in enumerate(classes):
        for i in range(n):
            _img(root / c / f"img_{i:03d}.{ext}", (ci * 40 % 256, 100, 7 * i % 256))


def _check_item(ds, n_classes: int) -> None:
    image, label = ds[0]
    assert isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3
    assert type(label) is int and 0 <= label < n_classes


class _FakeTV:
    """Stand-in for a torchvision dataset class that records how it was constructed."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        type(self).calls.append(kwargs)
        self.kwargs = kwargs

    def __len__(self):
        return 30

    def __getitem__(self, i):
        img = Image.new("L", (4, 4), 9)  # greyscale: the spec's transform must still return 3 channels
        return self.kwargs["transform"](img), self.kwargs["target_transform"](np.int64(i % 3))


# --------------------------------------------------------------------------------------------------
# the validation rule
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, n_val", [(100, 10), (8144, 814), (49_999, 4999), (60_000, 5000), (1_281_167, 5000)])
def test_split_sizes_disjoint_and_complete(n, n_val):
    train, val = split_train_val(n)
    assert len(val) == n_val and len(train) == n - n_val
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(n))


def test_split_matches_random_split_and_is_deterministic():
    n = 1234
    train, val = split_train_val(n)
    ref_train, ref_val = random_split(range(n), [n - 123, 123], generator=torch.Generator().manual_seed(0))
    assert train == list(ref_train.indices) and val == list(ref_val.indices)
    assert split_train_val(n) == (train, val)
    assert split_train_val(n, seed=1) != (train, val)
    # task_vectors asserts this for MNISTVal: its train subset starts at image 36044.
    assert split_train_val(60_000)[0][0] == 36044


def test_split_rejects_too_small_and_bad_fraction():
    with pytest.raises(ValueError):
        split_train_val(5)
    with pytest.raises(ValueError):
        split_train_val(100, fraction=1.5)


def test_names():
    assert base_name("CarsVal") == "Cars" and base_name("Cars") == "Cars" and base_name("Val") == "Val"
    assert is_val("SUN397Val") and not is_val("SUN397")


def test_val_and_train_splits_through_get_dataset(tmp_path):
    make_synthetic_datasets(tmp_path, names=["SynthShapes"], n_train=40, n_test=12)
    full = DATASETS.get("SynthShapes").build("train", None, tmp_path)
    val = get_dataset("SynthShapesVal", "test", None, tmp_path)
    train = get_dataset("SynthShapes", "train", None, tmp_path)
    train_v = get_dataset("SynthShapesVal", "train", None, tmp_path)
    test = get_dataset("SynthShapes", "test", None, tmp_path)
    assert len(full) == 40 and len(val) == 4 and len(train) == 36 and len(test) == 12
    assert list(train.indices) == list(train_v.indices) == split_train_val(40)[0]
    assert list(val.indices) == split_train_val(40)[1]
    assert sorted(list(train.indices) + list(val.indices)) == list(range(40))
    # the subsets point at the very images of the full split
    assert torch.equal(val[0][0], full[val.indices[0]][0]) and val[0][1] == full[val.indices[0]][1]
    _check_item(test, 4)


# --------------------------------------------------------------------------------------------------
# names and errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Flowers", "FlowersVal", "cars"])
def test_unknown_dataset_raises_listing_valid_names(name, tmp_path):
    with pytest.raises(ValueError, match="Cars, DTD, EMNIST, EuroSAT"):
        get_dataset(name, "test", None, tmp_path)
    with pytest.raises(ValueError, match="valid choices"):
        check_datasets([name], tmp_path)


def test_bad_split_raises(tmp_path):
    with pytest.raises(ValueError, match="split"):
        get_dataset("MNIST", "val", None, tmp_path)


@pytest.mark.parametrize("name", DATASETS.names())
def test_missing_data_error_names_dataset_path_and_command(name, tmp_path):
    location = tmp_path / "data root"
    spec = DATASETS.get(name)
    with pytest.raises(DatasetNotFoundError) as info:
        spec.check(location)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    message = str(err)
    assert err.dataset == name and name in message
    assert str(err.path) in message and err.path.is_relative_to(spec.folder(location))
    if name in DEMO_TASKS:  # the demo world is generated, not downloaded
        command = f"python -m vision.demo.world --data-location '{location}'"
    else:
        command = f"python vision/prepare_datasets.py --dataset {name} --data-location '{location}'"
    assert err.command == command and command in message
    with pytest.raises(DatasetNotFoundError):  # get_dataset checks before building
        get_dataset(name + "Val", "test", None, location)


def test_check_datasets_reports_every_missing_dataset_once(tmp_path):
    make_synthetic_datasets(tmp_path, names=["SynthColors"], n_train=10, n_test=4)
    check_datasets(["SynthColors", "SynthColorsVal"], tmp_path)  # present: no error
    with pytest.raises(DatasetNotFoundError) as info:
        check_datasets(["CarsVal", "SynthColors", "Cars", "DTD"], tmp_path)
    assert [e.dataset for e in info.value.errors] == ["Cars", "DTD"]
    assert "stanford_cars" in str(info.value) and str(tmp_path / "dtd" / "train") in str(info.value)


def test_check_is_cheap_and_loads_no_model(tmp_path):
    code = (
        "import sys; import vision.synthetic; from vision.datasets import check_datasets, DatasetNotFoundError\n"
        f"try: check_datasets(['ImageNetVal', 'Cars', 'SynthShapes'], {str(tmp_path)!r})\n"
        "except DatasetNotFoundError as e: print(len(e.errors))\n"
        "print('open_clip' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "False"]  # no model library was imported to check


# --------------------------------------------------------------------------------------------------
# every registry dataset on a fixture of its layout
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("test_dir", ["test", "val"])
def test_dtd_layout(tmp_path, test_dir):
    _folders(tmp_path / "dtd" / "train", ["banded", "blotchy", "woven"], 10)
    _folders(tmp_path / "dtd" / test_dir, ["banded", "woven"], 2)  # a test split missing a class
    spec = DATASETS.get("DTD")
    assert spec.classnames(tmp_path) == ["banded", "blotchy", "woven"]
    test = get_dataset("DTD", "test", None, tmp_path)
    assert len(test) == 4 and sorted({label for _, label in test}) == [0, 2]  # labels follow train folders
    assert len(get_dataset("DTDVal", "test", None, tmp_path)) == 3
    _check_item(test, 3)


def test_eurosat_layout_and_readable_names(tmp_path):
    classes = ["AnnualCrop", "Forest", "SeaLake"]
    _folders(tmp_path / "EuroSAT_splits" / "train", classes, 4, ext="jpg")
    _folders(tmp_path / "EuroSAT_splits" / "test", classes, 1, ext="jpg")
    assert DATASETS.get("EuroSAT").classnames(tmp_path) == ["annual crop land", "forest", "lake or sea"]
    assert len(get_dataset("EuroSAT", "train", None, tmp_path)) == 11
    _check_item(get_dataset("EuroSAT", "test", None, tmp_path), 3)


def test_eurosat_val_folder_is_eurosatval_as_in_the_official_code(tmp_path, caplog):
    classes = ["AnnualCrop", "Forest", "SeaLake"]
    base = tmp_path / "EuroSAT_splits"
    _folders(base / "train", classes, 4, ext="jpg")
    _folders(base / "test", classes, 1, ext="jpg")
    _folders(base / "val", classes, 2, ext="jpg")
    val = get_dataset("EuroSATVal", "test", None, tmp_path)
    assert sorted(Path(p).relative_to(base).parts[0] for p, _ in val.samples) == ["val"] * 6
    assert [label for _, label in val.samples] == [0, 0, 1, 1, 2, 2]
    for name in ("EuroSAT", "EuroSATVal"):  # the validation images are separate: train is the whole folder
        assert len(get_dataset(name, "train", None, tmp_path)) == 12
    assert len(get_dataset("EuroSAT", "test", None, tmp_path)) == 3
    import shutil

    shutil.rmtree(base / "val")
    with caplog.at_level("WARNING", logger="talos"):
        assert len(get_dataset("EuroSATVal", "test", None, tmp_path)) == 1  # the 10% rule, logged
    assert "holding out 10%" in caplog.text


@pytest.mark.parametrize("test_dir", ["test", "val"])
def test_sun397_layout(tmp_path, test_dir):
    classes = ["a_abbey", "a_apartment_building_outdoor", "b_bakery_shop"]
    _folders(tmp_path / "sun397" / "train", classes, 4)
    _folders(tmp_path / "sun397" / test_dir, classes, 1)
    assert DATASETS.get("SUN397").classnames(tmp_path) == ["abbey", "apartment building outdoor", "bakery shop"]
    _check_item(get_dataset("SUN397", "test", None, tmp_path), 3)
    assert len(get_dataset("SUN397Val", "test", None, tmp_path)) == 1


def test_imagenet_layout_uses_open_clip_names(tmp_path):
    import open_clip

    wnids = [f"n{i:08d}" for i in range(1000)]
    for i, w in enumerate(wnids):
        _img(tmp_path / "imagenet" / "train" / w / f"{w}_1.JPEG")
        _img(tmp_path / "imagenet" / "val_in_folder" / w / f"val_{i}.JPEG")
    spec = DATASETS.get("ImageNet")
    assert spec.classnames(tmp_path) == list(open_clip.IMAGENET_CLASSNAMES)
    test = get_dataset("ImageNet", "test", None, tmp_path)
    assert len(test) == 1000 and test[999][1] == 999
    assert len(get_dataset("ImageNetVal", "test", None, tmp_path)) == 100  # 10% (the 5,000 cap needs 50k)


def test_imagenet_with_wrong_class_count_raises(tmp_path):
    _folders(tmp_path / "imagenet" / "train", ["n01", "n02"], 1)
    _folders(tmp_path / "imagenet" / "val", ["n01", "n02"], 1)
    with pytest.raises(ValueError, match="expected 1000"):
        get_dataset("ImageNet", "test", None, tmp_path)


def test_resisc45_split_files(tmp_path):
    base = tmp_path / "resisc45"
    files = {c: [f"{c}_{i:03d}.jpg" for i in range(1, 6)] for c in ["airplane", "baseball_diamond", "wetland"]}
    for c, names in files.items():
        for f in names:
            _img(base / "NWPU-RESISC45" / c / f, fmt="JPEG")
    train = [f for names in files.values() for f in names[:4]]
    (base / "resisc45-train.txt").write_text("\n".join(reversed(train)) + "\n")  # order must not matter
    (base / "resisc45-test.txt").write_text("\n".join(names[4] for names in files.values()) + "\n")
    spec = DATASETS.get("RESISC45")
    assert len(spec.classnames(tmp_path)) == 45 and spec.classnames(tmp_path)[2] == "baseball diamond"
    full = spec.build("train", None, tmp_path)
    assert len(full) == 12
    assert [label for _, label in full.samples] == [0] * 4 + [2] * 4 + [44] * 4  # ImageFolder order
    test = get_dataset("RESISC45", "test", None, tmp_path)
    assert sorted(label for _, label in test) == [0, 2, 44]
    assert len(get_dataset("RESISC45Val", "test", None, tmp_path)) == 1


def test_gtsrb_torchvision_layout(tmp_path):
    base = tmp_path / "gtsrb"
    for c in range(3):
        for i in range(4):
            _img(base / "GTSRB" / "Training" / f"{c:05d}" / f"{c:05d}_{i:05d}.ppm", (c * 80, 20, 20), fmt="PPM")
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate([2, 0, 42]):
        _img(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", fmt="PPM")
        rows.append(f"{i:05d}.ppm;6;5;0;0;5;4;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    spec = DATASETS.get("GTSRB")
    assert len(spec.classnames(tmp_path)) == 43 and spec.classnames(tmp_path)[14] == "stop"
    test = get_dataset("GTSRB", "test", None, tmp_path)
    assert [test[i][1] for i in range(3)] == [2, 0, 42]
    assert len(get_dataset("GTSRB", "train", None, tmp_path)) == 11
    _check_item(get_dataset("GTSRBVal", "test", None, tmp_path), 43)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic 0x0800 + ndim, big-endian dims, uint8 payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_torchvision_layout(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    for prefix, n in (("train", 20), ("t10k", 7)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    assert DATASETS.get("MNIST").classnames(tmp_path) == [str(d) for d in range(10)]
    test = get_dataset("MNIST", "test", None, tmp_path)
    assert len(test) == 7 and test[3][1] == 3
    assert test[0][0].shape == (3, 28, 28)  # greyscale converted to RGB for CLIP
    assert len(get_dataset("MNIST", "train", None, tmp_path)) == 18


def test_svhn_uses_torchvision_with_svhn_root(tmp_path, monkeypatch):
    class FakeSVHN(_FakeTV):
        calls = []

    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    for f in ("train_32x32.mat", "test_32x32.mat"):
        _img(tmp_path / "svhn" / f)  # check() only tests existence
    test = get_dataset("SVHN", "test", None, tmp_path)
    train = get_dataset("SVHN", "train", None, tmp_path)
    assert [(c["root"], c["split"], c["download"]) for c in FakeSVHN.calls] == [
        (str(tmp_path / "svhn"), "test", False), (str(tmp_path / "svhn"), "train", False)]
    assert len(train) == 27
    _check_item(test, 10)


def test_cars_torchvision_layout(tmp_path, monkeypatch):
    class FakeCars(_FakeTV):
        calls = []

    monkeypatch.setattr(torchvision.datasets, "StanfordCars", FakeCars)
    base = tmp_path / "stanford_cars"
    for f in ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat"):
        _img(base / f)
    for d in ("cars_train", "cars_test"):
        (base / d).mkdir()
    val = get_dataset("CarsVal", "test", None, tmp_path)
    assert [(c["root"], c["split"], c["download"]) for c in FakeCars.calls] == [(str(tmp_path), "train", False)]
    assert len(val) == 3
    _check_item(val, 3)


def test_cars_folder_fallback(tmp_path):
    _folders(tmp_path / "stanford_cars_folder_based" / "train", ["AM_General_Hummer_SUV_2000", "Acura_RL_Sedan_2012"], 5)
    _folders(tmp_path / "stanford_cars_folder_based" / "test", ["AM_General_Hummer_SUV_2000", "Acura_RL_Sedan_2012"], 1)
    assert DATASETS.get("Cars").classnames(tmp_path) == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    _check_item(get_dataset("Cars", "test", None, tmp_path), 2)
    assert len(get_dataset("Cars", "train", None, tmp_path)) == 9


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_synthetic_registered_like_real_datasets(tmp_path, name):
    make_synthetic_datasets(tmp_path, names=[name], n_train=30, n_test=9)
    spec = DATASETS.get(name)
    assert spec.classnames(tmp_path) == list(SYNTHETIC_TASKS[name])
    assert spec.templates == ["a photo of a {}.", "a {} image."]
    val = get_dataset(name + "Val", "test", None, tmp_path)
    assert len(val) == 3
    image, label = val[0]
    assert image.shape == (3, 32, 32) and label == spec.build("train", None, tmp_path)[val.indices[0]][1]


def test_custom_image_folder_spec(tmp_path):
    spec = ImageFolderSpec("Flowers", "flowers", ["a photo of a {}, a type of flower."],
                           classnames=lambda folders: [f.upper() for f in folders])
    _folders(tmp_path / "flowers" / "train", ["daisy", "rose"], 10)
    _folders(tmp_path / "flowers" / "test", ["daisy", "rose"], 1)
    assert spec.classnames(tmp_path) == ["DAISY", "ROSE"]  # the callable receives the sorted folder names
    assert len(spec.build("train", None, tmp_path)) == 20
    with pytest.raises(ValueError, match="must not end in 'Val'"):
        ImageFolderSpec("FlowersVal", "flowers", ["{}"])
    with pytest.raises(ValueError, match="templates must be a list"):
        ImageFolderSpec("Flowers", "flowers", "a photo of a {}.")  # a bare string is not a template list


# --------------------------------------------------------------------------------------------------
# synthetic generator
# --------------------------------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_synthetic_layout_and_determinism(tmp_path):
    a = make_synthetic_datasets(tmp_path / "a", n_train=24, n_test=12)
    make_synthetic_datasets(tmp_path / "b", n_train=24, n_test=12)
    make_synthetic_datasets(tmp_path / "c", n_train=24, n_test=12, seed=1)
    assert sorted(a) == sorted(SYNTHETIC_TASKS)
    ta, tb, tc = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert ta == tb and ta.keys() == tc.keys() and ta != tc
    for name, classes in SYNTHETIC_TASKS.items():
        assert 3 <= len(classes) <= 5
        for split, n in (("train", 24), ("test", 12)):
            folder = tmp_path / "a" / name / split
            assert sorted(p.name for p in folder.iterdir()) == list(classes)
            counts = [len(list((folder / c).glob("*.png"))) for c in classes]
            assert sum(counts) == n and max(counts) - min(counts) <= 1
    image = Image.open(next((tmp_path / "a" / "SynthStripes" / "test" / "vertical").glob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"


def test_synthetic_classes_are_distinct(tmp_path):
    # Class means of the colour task must differ by channel; within shapes, no two images are identical.
    make_synthetic_datasets(tmp_path, names=["SynthColors", "SynthShapes"], n_train=40, n_test=4)
    means = {c: np.mean([np.asarray(Image.open(p), float).mean((0, 1)) for p in (tmp_path / "SynthColors" / "train" / c).glob("*.png")], 0)
             for c in SYNTHETIC_TASKS["SynthColors"]}
    assert means["red"][0] > means["red"][2] and means["blue"][2] > means["blue"][0]
    assert means["green"][1] > means["green"][0]
    blobs = [p.read_bytes() for p in (tmp_path / "SynthShapes" / "train").rglob("*.png")]
    assert len(set(blobs)) == len(blobs)


def test_synthetic_rerun_replaces_only_its_own_output(tmp_path):
    make_synthetic_datasets(tmp_path, names=["SynthShapes"], n_train=20, n_test=8)
    make_synthetic_datasets(tmp_path, names=["SynthShapes"], n_train=8, n_test=4)
    assert len(list((tmp_path / "SynthShapes" / "train").rglob("*.png"))) == 8
    (tmp_path / "SynthColors").mkdir()
    (tmp_path / "SynthColors" / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        make_synthetic_datasets(tmp_path, names=["SynthColors"])
    assert (tmp_path / "SynthColors" / "precious.txt").exists()
    with pytest.raises(ValueError):
        make_synthetic_datasets(tmp_path, names=["SynthNope"])


# --------------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATASETS.names())
def test_templates_exist_and_format(name):
    templates = DATASETS.get(name).templates
    assert templates and all(isinstance(t, str) for t in templates)
    if name in DEMO_TASKS:  # the demo world's templates live with its task definitions
        assert templates == list(DEMO_TASKS[name].templates)
    else:
        family = "Synthetic" if name in SYNTHETIC_TASKS else name
        assert get_templates(family + "Val") == get_templates(family) == templates
    for t in templates:
        assert t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1
        assert "tabby cat" in t.format("tabby cat") and fill(t, "a {b}") == t.replace("{}", "a {b}")


def test_template_families():
    assert len(TEMPLATES["ImageNet"]) == 80 and TEMPLATES["ImageNet"][0] == "a bad photo of a {}."
    assert len(TEMPLATES["RESISC45"]) == 18 and len(TEMPLATES["DTD"]) == 8 and len(TEMPLATES["Cars"]) == 8
    assert TEMPLATES["MNIST"] == ['a photo of the number: "{}".']
    TEMPLATES["Cars"].append("mutated {}")  # callers get copies
    assert len(TEMPLATES["Cars"]) == 8
    with pytest.raises(KeyError):
        get_templates("Flowers")
    assert len(TEMPLATES["CIFAR100"]) == 18 and TEMPLATES["CIFAR100"][-1] == "a photo of the big {}."
    assert TEMPLATES["Flowers102"] == ["a photo of a {}, a type of flower."] and len(TEMPLATES["FER2013"]) == 6


# --------------------------------------------------------------------------------------------------
# prepare_datasets (never touches the network here)
# --------------------------------------------------------------------------------------------------
def test_prepare_prints_imagenet_steps(tmp_path, capsys):
    assert prepare_datasets.main(["--dataset", "ImageNetVal", "--data-location", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for needle in ("ImageNet", str(tmp_path), "ILSVRC2012_img_val.tar", "val_in_folder", "image-net.org"):
        assert needle in out


def test_prepare_arranges_extracted_sun397(tmp_path, capsys):
    raw = tmp_path / "SUN397"
    for rel in ("a/abbey/sun_1.jpg", "a/abbey/sun_2.jpg", "a/apartment_building/outdoor/sun_3.jpg",
                "a/apartment_building/outdoor/sun_4.jpg"):
        _img(raw / rel, fmt="JPEG")
    (raw / "Training_01.txt").write_text("/a/abbey/sun_1.jpg\n/a/apartment_building/outdoor/sun_3.jpg\n")
    (raw / "Testing_01.txt").write_text("/a/abbey/sun_2.jpg\n/a/apartment_building/outdoor/sun_4.jpg\n")
    assert prepare_datasets.main(["--dataset", "SUN397", "--source", "local", "--data-location", str(tmp_path)]) == 0
    assert (tmp_path / "sun397" / "test" / "a_apartment_building_outdoor" / "sun_4.jpg").is_file()
    assert DATASETS.get("SUN397").classnames(tmp_path) == ["abbey", "apartment building outdoor"]
    assert "ready" in capsys.readouterr().out


def test_prepare_synthetic_and_dry_run(tmp_path, capsys):
    assert prepare_datasets.main(["--dataset", "SynthStripes", "--data-location", str(tmp_path)]) == 0
    check_datasets(["SynthStripesVal"], tmp_path)
    assert prepare_datasets.main(["--dataset", "MNIST", "--data-location", str(tmp_path), "--dry-run"]) == 1
    assert "would prepare from torchvision" in capsys.readouterr().out
    assert not (tmp_path / "MNIST").exists()


def test_prepare_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        prepare_datasets.main(["--dataset", "MNIST"])
    assert info.value.code == 2 and "--data-location" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        prepare_datasets.main(["--dataset", "Flowers", "--data-location", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Flowers" in err and "SUN397" in err
