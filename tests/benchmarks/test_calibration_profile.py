"""benchmarks/calibration_profile.py on the tiny preset: the parts add up, timers change nothing, the floor's math.

Speed is not asserted here: the script measures it (benchmarks/results/calibration_profile_cpu.md).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import pytest
import torch

import talos.calibration as calibration
import talos.fisher as fisher
from benchmarks import calibration_profile as cp
from benchmarks.efficiency import PRESETS, build, mode_context
from talos.calibration import round_densities
from talos.modes import get_mode


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    return cp.main(["--preset", "test", "--in-process", "--domains", "vision", "--out", str(out)]), out


def test_rounds_and_parts_add_up(result):
    res, out = result
    assert out.exists() and out.with_suffix(".md").exists()
    for key in ("vision:talos-tiny-vit:exact", "vision:talos-tiny-vit:floor"):
        r = res["profiles"][key]
        assert [x["round"] for x in r["rounds"]] == [1, 2, 3, 4]
        assert [x["density"] for x in r["rounds"]] == pytest.approx(round_densities(0.9, 4))
        for x in r["rounds"]:
            assert all(x[k] >= 0 for k in cp.PARTS)
            assert x["products"] > 0 and x["keep_lowest"] > 0 and x["forward"] > 0
            assert x["rest"] >= -1e-3  # parts are disjoint slices of the round
        p = r["plain"]
        assert p["total"] >= p["forward"] + p["backward"] - 1e-3
        assert r["ratio"] == pytest.approx(sum(x["total"] for x in r["rounds"]) / 4 / p["total"])
        without = sum(x["total"] - x["products"] for x in r["rounds"]) / 4 / p["total"]
        assert r["ratio_without_products"] == pytest.approx(without) and without < r["ratio"]


def test_timers_change_nothing_and_are_removed():
    bb, s = PRESETS["test"][0][0], PRESETS["test"][1]
    plain = get_mode("talos").masks(mode_context(build(bb, s), s))
    originals = (fisher.sq_outer_sum, calibration.keep_lowest, calibration.soft_masked, torch.autograd.grad)
    acc: Counter = Counter()
    with cp.timed_parts(s, acc, floor=False):
        timed = get_mode("talos").masks(mode_context(build(bb, s), s))
    assert set(plain) == set(timed) and all(torch.equal(plain[n], timed[n]) for n in plain)
    assert acc["products"] > 0 and acc["backward"] >= acc["products"] and acc["soft_mask"] > 0
    assert (fisher.sq_outer_sum, calibration.keep_lowest, calibration.soft_masked, torch.autograd.grad) == originals
    with pytest.raises(ZeroDivisionError), cp.timed_parts(s, acc, floor=True):
        assert fisher.sq_outer_sum is not originals[0]
        1 / 0
    assert fisher.sq_outer_sum is originals[0] and torch.autograd.grad is originals[3]


def test_floor_is_one_squared_batch_gradient_not_the_fisher():
    g, a = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    batch_grad = sum(g[i].T @ a[i] for i in range(3))  # [5, 6], what a plain backward gives the weight
    assert torch.allclose(cp._floor_products(g, a, None), batch_grad.float() ** 2, rtol=1e-5)
    fisher_sum = sum((g[i].T @ a[i]) ** 2 for i in range(3))
    ws = fisher._Workspace(fisher.DEFAULT_CHUNK_ELEMENTS["cpu"])
    assert torch.allclose(fisher.sq_outer_sum(g, a, ws).double(), fisher_sum, rtol=1e-5)
    assert not torch.allclose(batch_grad ** 2, fisher_sum, rtol=1e-2)


def test_bad_flags_exit():
    for argv in (["--domains", "audio"], ["--variants", "fast"]):
        with pytest.raises(SystemExit):
            cp.main(["--preset", "test", *argv])


@pytest.mark.slow  # a fresh interpreter (torch, open_clip imports)
def test_one_job_in_its_own_process():
    bb, s = PRESETS["test"][0][0], PRESETS["test"][1]
    r = cp.run_isolated({"backbone": asdict(bb), "settings": asdict(s), "variant": "exact"})
    assert len(r["rounds"]) == 4 and r["ratio"] > r["ratio_without_products"] > 0
    with pytest.raises(RuntimeError, match="failed"):
        cp.run_isolated({"backbone": asdict(bb), "settings": asdict(s)})  # no variant: the child fails loudly
