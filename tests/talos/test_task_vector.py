"""Tests for talos.task_vector.TaskVector: arithmetic identities, application, statistics, storage."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from talos.io import save_tensors
from talos.task_vector import TaskVector

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and raw bits (distinguishes -0.0 from 0.0, compares NaN payloads)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = _BITS[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def state_dict(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(8, 6, generator=g).to(dtype),
        "enc.bias": torch.randn(8, generator=g).to(dtype),
        "head.weight": torch.randn(3, 8, generator=g).to(dtype),
        "steps": torch.tensor(5, dtype=torch.int64),  # non-floating buffer
    }


def snapshot(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sd.items()}


def assert_unchanged(sd: dict[str, torch.Tensor], snap: dict[str, torch.Tensor]) -> None:
    assert set(sd) == set(snap)
    for k in sd:
        assert bitwise_equal(sd[k], snap[k]), k


@pytest.fixture
def theta0() -> dict[str, torch.Tensor]:
    return state_dict(0)


@pytest.fixture
def theta_ft() -> dict[str, torch.Tensor]:
    return state_dict(1)


def random_tv(seed: int) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    return TaskVector({"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g)})


# ---------------------------------------------------------------- construction
def test_from_state_dicts_is_difference(theta0, theta_ft) -> None:
    snap0, snap1 = snapshot(theta0), snapshot(theta_ft)
    tv = TaskVector.from_state_dicts(theta0, theta_ft)
    assert set(tv.keys()) == {"enc.weight", "enc.bias", "head.weight"}  # int buffer skipped
    assert "steps" not in tv and "enc.bias" in tv and len(tv) == 3
    for k in tv.keys():
        assert torch.equal(tv[k], theta_ft[k] - theta0[k])
        assert tv[k].dtype == torch.float32
    assert_unchanged(theta0, snap0)
    assert_unchanged(theta_ft, snap1)


def test_from_state_dicts_selected_keys(theta0, theta_ft) -> None:
    tv = TaskVector.from_state_dicts(theta0, theta_ft, keys=["enc.weight"])
    assert list(tv.keys()) == ["enc.weight"]
    with pytest.raises(ValueError, match="steps"):
        TaskVector.from_state_dicts(theta0, theta_ft, keys=["steps"])
    with pytest.raises(ValueError, match="nope"):
        TaskVector.from_state_dicts(theta0, theta_ft, keys=["nope"])


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_from_state_dicts_widens_low_precision(low: torch.dtype) -> None:
    pre = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=low)}
    ft = {"w": torch.tensor([1.0078125, 2.0, 2.5], dtype=low)}
    tv = TaskVector.from_state_dicts(pre, ft)
    assert tv["w"].dtype == torch.float32
    assert torch.equal(tv["w"], ft["w"].float() - pre["w"].float())


def test_from_state_dicts_keeps_float64() -> None:
    pre = {"w": torch.zeros(3, dtype=torch.float64)}
    ft = {"w": torch.full((3,), 0.1, dtype=torch.float64)}
    assert TaskVector.from_state_dicts(pre, ft)["w"].dtype == torch.float64


def test_from_state_dicts_mismatches_name_keys(theta0, theta_ft) -> None:
    missing = {k: v for k, v in theta_ft.items() if k != "head.weight"}
    with pytest.raises(ValueError, match="head.weight"):
        TaskVector.from_state_dicts(theta0, missing)
    extra = {**theta_ft, "new.weight": torch.ones(2)}
    with pytest.raises(ValueError, match="new.weight"):
        TaskVector.from_state_dicts(theta0, extra)
    reshaped = {**theta_ft, "enc.bias": torch.ones(9)}
    with pytest.raises(ValueError, match="enc.bias"):
        TaskVector.from_state_dicts(theta0, reshaped)


# ---------------------------------------------------------------- arithmetic
def test_add_negation_is_exactly_zero(theta0, theta_ft) -> None:
    tv = TaskVector.from_state_dicts(theta0, theta_ft)
    zero = tv + (-tv)
    for k in tv.keys():
        assert torch.count_nonzero(zero[k]) == 0
    assert zero.nnz() == 0
    diff = tv - tv
    assert diff.nnz() == 0


def test_arithmetic_values_and_no_mutation() -> None:
    a, b = random_tv(0), random_tv(1)
    a0, b0 = snapshot(a.vector), snapshot(b.vector)
    s, d, n = a + b, a - b, -a
    m1, m2, q = 2.5 * a, a * 2.5, a / 4
    for k in a.keys():
        assert torch.equal(s[k], a0[k] + b0[k])
        assert torch.equal(d[k], a0[k] - b0[k])
        assert torch.equal(n[k], -a0[k])
        assert torch.equal(m1[k], a0[k] * 2.5)
        assert torch.equal(m2[k], a0[k] * 2.5)
        assert torch.equal(q[k], a0[k] / 4)
    for result in (s, d, n, m1, m2, q):
        assert result is not a and result is not b
    assert_unchanged(a.vector, a0)
    assert_unchanged(b.vector, b0)


def test_sum_of_several() -> None:
    tvs = [random_tv(i) for i in range(4)]
    total = sum(tvs)
    assert isinstance(total, TaskVector)
    for k in tvs[0].keys():
        expected = ((tvs[0][k] + tvs[1][k]) + tvs[2][k]) + tvs[3][k]
        assert torch.equal(total[k], expected)
    single = sum([tvs[0]])
    assert single is not tvs[0]
    single["a"].zero_()  # the result owns its tensors
    assert torch.count_nonzero(tvs[0]["a"]) > 0


def test_arithmetic_mismatches_raise() -> None:
    a = random_tv(0)
    other_keys = TaskVector({"a": torch.zeros(4, 5), "c": torch.zeros(7)})
    other_shape = TaskVector({"a": torch.zeros(5, 4), "b": torch.zeros(7)})
    for bad in (other_keys, other_shape):
        with pytest.raises(ValueError):
            a + bad
        with pytest.raises(ValueError):
            a - bad
        with pytest.raises(ValueError):
            a.dot(bad)
    with pytest.raises(TypeError):
        a * a  # type: ignore[operator]
    with pytest.raises(TypeError):
        a + 1  # type: ignore[operator]


# ---------------------------------------------------------------- application
def test_apply_coef_zero_is_bitwise_identity(theta0, theta_ft) -> None:
    theta0["enc.bias"][0] = -0.0  # a sign bit a float round trip could lose
    tv = TaskVector.from_state_dicts(theta0, theta_ft)
    snap = snapshot(theta0)
    out = tv.apply_to(theta0, coef=0.0)
    assert_unchanged(out, snap)
    assert_unchanged(theta0, snap)


def test_apply_recovers_finetuned(theta0, theta_ft) -> None:
    tv = TaskVector.from_state_dicts(theta0, theta_ft)
    snap = snapshot(theta0)
    out = tv.apply_to(theta0, 1.0)
    assert out is not theta0
    for k in tv.keys():
        torch.testing.assert_close(out[k], theta_ft[k], rtol=0, atol=1e-6)
        assert out[k] is not theta0[k]
    assert out["steps"] is theta0["steps"]  # keys outside tau pass through
    assert_unchanged(theta0, snap)


def test_apply_scales_and_keeps_dtype() -> None:
    base = {"w": torch.tensor([1.0, 2.0, 4.0], dtype=torch.bfloat16), "n": torch.ones(2)}
    tv = TaskVector({"w": torch.tensor([0.5, -1.0, 2.0])})
    out = tv.apply_to(base, coef=-2.0)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.tensor([0.0, 4.0, 0.0], dtype=torch.bfloat16))


def test_apply_mismatches_raise(theta0, theta_ft) -> None:
    tv = TaskVector.from_state_dicts(theta0, theta_ft)
    missing = {k: v for k, v in theta0.items() if k != "enc.bias"}
    with pytest.raises(ValueError, match="enc.bias"):
        tv.apply_to(missing)
    with pytest.raises(ValueError, match="head.weight"):
        tv.apply_to({**theta0, "head.weight": torch.zeros(8, 3)})


# ---------------------------------------------------------------- statistics
def test_dot_norm_density_by_hand() -> None:
    a = TaskVector({"x": torch.tensor([1.0, 0.0, -2.0]), "y": torch.tensor([[0.0, 3.0], [0.0, 0.0]])})
    b = TaskVector({"x": torch.tensor([4.0, 5.0, 0.5]), "y": torch.tensor([[1.0, -1.0], [2.0, 0.0]])})
    assert a.dot(b) == pytest.approx(1 * 4 + 0 * 5 + -2 * 0.5 + 3 * -1)
    assert a.norm() == pytest.approx(math.sqrt(1 + 4 + 9))
    assert a.numel() == 7
    assert a.nnz() == 3
    assert a.density() == pytest.approx(3 / 7)
    assert b.density() == pytest.approx(6 / 7)
    assert isinstance(a.dot(b), float) and isinstance(a.norm(), float) and isinstance(a.nnz(), int)
    assert TaskVector({}).density() == 0.0


def test_norm_and_dot_accumulate_in_float64() -> None:
    # 4096**2 + 1 = 2**24 + 1 is not representable in float32 (it would round to 2**24).
    tv = TaskVector({"w": torch.tensor([4096.0, 1.0])})
    assert tv.norm() == pytest.approx(math.sqrt(2**24 + 1), rel=1e-12)
    assert tv.dot(tv) == 2**24 + 1


def test_to_and_clone() -> None:
    a = random_tv(0)
    half = a.to(torch.float16)
    assert all(half[k].dtype == torch.float16 for k in half.keys())
    assert a["a"].dtype == torch.float32
    c = a.clone()
    c["a"].add_(1.0)
    assert not torch.equal(c["a"], a["a"])


# ---------------------------------------------------------------- storage
def sparse_vector(density: float, seed: int = 0) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in {"l0.weight": (300, 340), "l1.weight": (100_000,), "l2.weight": (250, 400)}.items():
        values = torch.randn(shape, generator=g)
        keep = torch.rand(shape, generator=g) < density
        out[name] = torch.where(keep, values, torch.zeros(()))
    return TaskVector(out)


def test_sparse_round_trip_is_bitwise(tmp_path: Path) -> None:
    tv = sparse_vector(0.1)
    special = tv["l1.weight"]
    special[:6] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45])
    special.view(torch.int32)[6] = 0x7FC00123  # a NaN with a non-default payload
    tv.save(tmp_path / "tv.safetensors")
    back = TaskVector.load(tmp_path / "tv.safetensors")
    assert list(back.keys()) == list(tv.keys())
    for k in tv.keys():
        assert bitwise_equal(back[k], tv[k]), k
    assert back["l1.weight"][0].item() == 0 and math.copysign(1.0, back["l1.weight"][0].item()) == -1.0


def test_sparse_file_is_small(tmp_path: Path) -> None:
    tv = sparse_vector(0.1)
    tv.save(tmp_path / "sparse.safetensors")
    save_tensors(tmp_path / "dense.safetensors", tv.vector)
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dense_and_mixed_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    sparse = torch.zeros(1000, dtype=dtype)
    sparse[::50] = torch.randn(20, generator=g).to(dtype)
    sparse[1] = -0.0
    tv = TaskVector({
        "dense": torch.randn(30, 40, generator=g).to(dtype),  # fully dense: stored as is
        "sparse": sparse,
        "all_zero": torch.zeros(64, dtype=dtype),
        "scalar": torch.tensor(1.5, dtype=dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
    })
    tv.save(tmp_path / "tv.safetensors")
    back = TaskVector.load(tmp_path / "tv.safetensors")
    assert list(back.keys()) == list(tv.keys())
    for k in tv.keys():
        assert bitwise_equal(back[k], tv[k]), k


def test_dense_vector_file_is_not_bigger_than_plain(tmp_path: Path) -> None:
    tv = random_tv(0)
    tv.save(tmp_path / "tv.safetensors")
    save_tensors(tmp_path / "plain.safetensors", tv.vector)
    # Only the manifest in the header differs: no tensor is ever stored in a larger form.
    extra = (tmp_path / "tv.safetensors").stat().st_size - (tmp_path / "plain.safetensors").stat().st_size
    assert extra < 400


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tv.safetensors"
    random_tv(0).save(path)
    random_tv(1).save(path)
    assert torch.equal(TaskVector.load(path)["a"], random_tv(1)["a"])
    assert [p.name for p in path.parent.iterdir()] == ["tv.safetensors"]


def test_load_rejects_other_files(tmp_path: Path) -> None:
    save_tensors(tmp_path / "weights.safetensors", {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="not a task vector"):
        TaskVector.load(tmp_path / "weights.safetensors")
    save_tensors(tmp_path / "other.safetensors", {"w": torch.ones(3)}, metadata={"format": "pt"})
    with pytest.raises(ValueError):
        TaskVector.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError):
        TaskVector.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        TaskVector.load(tmp_path / "missing.safetensors")
