"""No silent wrong result (issue 18), core cases: flag checks, divergence, RNG streams, resume settings,
manifests, load errors, locks, locked results.json updates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from talos import io
from talos.app import checks
from talos.report import update_results
from talos.rng import SeededDataset, stream_seed
from talos.train import DivergenceError, TrainConfig, setup_trainable, train
from tests.talos.app.test_flags import _parse

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- flags
def test_save_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    for save in (f, f / "sub"):
        with pytest.raises(SystemExit):
            _parse("--save", str(save), "--device", "cpu")
        assert "is not a folder" in capsys.readouterr().err


def test_missing_pretrained_file_and_content_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TALOS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no such file"):
        checks.check_pretrained_file(str(tmp_path / "missing.pt"))
    assert checks.check_pretrained_file("openai") is None and checks.check_pretrained_file("none") is None
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights-1")
    h1 = checks.check_pretrained_file(str(w))
    import hashlib

    assert h1 == "sha256:" + hashlib.sha256(b"weights-1").hexdigest()
    assert (tmp_path / "cache" / "file_hashes.json").is_file()  # cached: keyed by path, size, mtime
    w.write_bytes(b"weights-2")  # replaced file: a new hash, so a new run folder
    os.utime(w, ns=(1, 1))
    assert checks.check_pretrained_file(str(w)) == "sha256:" + hashlib.sha256(b"weights-2").hexdigest()


# ---------------------------------------------------------------------------------------------- training
class _Data(torch.utils.data.Dataset):
    def __init__(self, n=32, bad=None):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        if bad is not None:
            self.x[bad] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        # a random augmentation and dropout: resume and workers must not change them
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))


def _loss(m, batch):
    return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])


def _train(tmp, cfg, data=None, **kw):
    m = _model()
    params = setup_trainable(m, [n for n, _ in m.named_parameters()], None)
    out = train(m, data or _Data(), _loss, params, None, cfg, checkpoint_path=tmp / "ck.pt", progress=False, **kw)
    return m, out


def test_divergence_stops_at_the_first_non_finite_loss(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, warmup=0, checkpoint_every=1)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0 * 1_000_003 + 0)).tolist()
    bad = perm[2 * 8]  # first example of optimizer step 3
    with pytest.raises(DivergenceError, match="loss is nan at optimizer step 3.*--lr"):
        _train(tmp_path, cfg, _Data(bad=bad))
    ck = io.torch_load(tmp_path / "ck.pt")
    assert ck["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in ck["params"].values())


def test_divergence_by_huge_lr_is_caught(tmp_path):
    with pytest.raises(DivergenceError, match="optimizer step"):
        _train(tmp_path, TrainConfig(steps=200, batch_size=8, warmup=0, lr=1e30, grad_clip=None, weight_decay=0))


def test_resume_is_exact_with_workers_dropout_and_augmentation(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=8, warmup=0, lr=1e-2)  # 4 steps an epoch: stop mid-epoch 1
    a, _ = _train(tmp_path / "a", cfg)
    torch.manual_seed(123)  # a different global RNG history must not matter
    _train(tmp_path / "b", cfg, stop_after=5)
    cfg2 = TrainConfig(**{**cfg.__dict__, "num_workers": 2})
    b, out = _train(tmp_path / "b", cfg2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    _train(tmp_path, TrainConfig(steps=4, batch_size=8, warmup=0), stop_after=2)
    with pytest.raises(ValueError, match=r"ck.pt was written with other settings \(lr: checkpoint 1e-05 vs now 0.1"):
        _train(tmp_path, TrainConfig(steps=4, batch_size=8, warmup=0, lr=0.1))
    _train(tmp_path, TrainConfig(steps=4, batch_size=8, warmup=0, num_workers=0, checkpoint_every=7))  # free


def test_seconds_add_up_over_resumes(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import talos.train as T

    clock = iter(range(0, 10_000, 10))  # every time.time() call of the training loop advances 10 s
    monkeypatch.setattr(T, "time", SimpleNamespace(time=lambda: float(next(clock))))
    _train(tmp_path, TrainConfig(steps=4, batch_size=8, warmup=0), stop_after=2)
    saved = io.torch_load(tmp_path / "ck.pt")["seconds"]
    _, second = _train(tmp_path, TrainConfig(steps=4, batch_size=8, warmup=0))
    assert saved == 10.0 and second["seconds"] == saved + 10.0  # the resumed run's own 10 s added


def test_seeded_dataset_draws_per_example_and_epoch():
    ds = SeededDataset(_Data(), seed=0, stage="s", epoch=0)
    torch.manual_seed(1)
    a = ds[3][0]
    state = torch.get_rng_state()
    torch.manual_seed(2)
    assert torch.equal(ds[3][0], a)  # independent of the global RNG
    torch.manual_seed(1)
    ds[3]
    assert torch.equal(torch.get_rng_state(), state)  # and leaves it as it was
    ds.epoch = 1
    assert not torch.equal(ds[3][0], a)
    assert stream_seed(0, "a", 1) != stream_seed(0, "a", 2) != stream_seed(1, "a", 1)


# ---------------------------------------------------------------------------------------------- artifacts
def test_manifest_detects_truncation_and_flipped_bytes(tmp_path):
    p = tmp_path / "t.safetensors"
    io.save_tensors(p, {"w": torch.arange(10.0)})
    assert io.check_artifact(p) == f"not listed in {tmp_path / 'manifest.json'}"
    assert io.check_artifact(p, legacy_ok=True) is None  # no manifest at all: a legacy folder
    io.record_artifact(p)
    assert io.check_artifact(p) is None
    data = bytearray(p.read_bytes())
    data[-3] ^= 1
    p.write_bytes(bytes(data))
    assert "content hash differs" in io.check_artifact(p)
    p.write_bytes(bytes(data[:-5]))
    assert "truncated" in io.check_artifact(p)


def test_load_errors_name_the_file_and_never_suggest_unsafe_loading(tmp_path):
    for name, content, loader in [("c.pt", b"", io.torch_load), ("c2.pt", b"PK\x03\x04garbage", io.torch_load),
                                  ("m.json", b'{"a": 1', io.read_json), ("t.safetensors", b"\x08\x00", io.load_tensors)]:
        f = tmp_path / name
        f.write_bytes(content)
        with pytest.raises(io.ArtifactError) as e:
            loader(f)
        assert str(f) in str(e.value) and "weights_only" not in str(e.value) and "delete it" in str(e.value)
    ck = tmp_path / "full.pt"
    io.atomic_torch_save(ck, {"step": 1, "w": torch.ones(1000)})
    ck.write_bytes(ck.read_bytes()[:200])
    with pytest.raises(io.ArtifactError, match="truncated or corrupt"):
        io.torch_load(ck)


def test_untrusted_checkpoint_restarts_training(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, warmup=0)
    a, _ = _train(tmp_path / "a", cfg)
    _train(tmp_path / "b", cfg, stop_after=2)
    ck = tmp_path / "b" / "ck.pt"
    ck.write_bytes(ck.read_bytes()[:-100])  # truncated: discarded, training restarts from step 0
    b, out = _train(tmp_path / "b", cfg)
    assert out["steps"] == 4 and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------------------- locks
_HOLD = """
import sys, time
from talos.io import RunLock
lock = RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_second_process_on_a_run_folder_is_told_who_holds_it(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / ".checkpoint.pt.abc.tmp").write_bytes(b"left by a kill")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(d)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert not (d / ".checkpoint.pt.abc.tmp").exists()  # the lock holder cleans stale temp files
        with pytest.raises(RuntimeError, match=f"in use by another process \\(PID {proc.pid}\\)"):
            io.RunLock(d)
    finally:
        proc.kill()
        proc.wait()
    lock = io.RunLock(d)  # the kernel dropped the killed holder's lock
    lock.release()


def test_results_json_updates_are_not_lost(tmp_path):
    path = tmp_path / "results.json"

    def writer(k):
        for i in range(20):
            update_results(path, "merges", f"{k}-{i}", i)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads(path.read_text())["merges"]) == 80
    assert not list(tmp_path.glob(".*.tmp"))


_UPDATE = """
import sys
from talos.report import update_results
for i in range(150):
    update_results(sys.argv[1], "merges", f"{sys.argv[2]}-{i}", i)
"""


@pytest.mark.slow
def test_results_json_two_processes(tmp_path):
    path = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _UPDATE, str(path), k], env=env) for k in "ab"]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert len(json.loads(path.read_text())["merges"]) == 300
