"""benchmarks/efficiency.py on its micro preset: the JSON schema, every registered mode, the report (CPU, fast).

Speed is not asserted here: it is measured by the benchmark itself (benchmarks/results/efficiency_cpu.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import efficiency  # noqa: E402

from talos.modes import MODES, run_order  # noqa: E402

MODE_KEYS = {"step_s", "peak_mem_mb", "trainable", "frozen_tensors", "optimizer_state_mb"}
CAL_KEYS = {"per_example_s", "plain_fwdbwd_per_example_s", "anchor_per_example_s"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency") / "eff.json"
    (res,) = efficiency.main(["--preset", "test", "--isolation", "none", "--out", str(out)])
    return res, out


def test_schema_and_every_registered_mode(result):
    res, out = result
    on_disk = json.loads(out.read_text())
    assert on_disk["vision"].keys() == res["vision"].keys()
    assert isinstance(on_disk["device"], str) and on_disk["device"].startswith("cpu")
    for domain in ("vision", "nlp"):
        assert set(res[domain]) == set(run_order())  # every mode finetune.py trains
        for mode, row in res[domain].items():
            assert MODE_KEYS <= set(row), (domain, mode)
            src = MODES.get(mode).source_mode
            if src is not None:  # posthoc: no training of its own
                assert row["trained_by"] == src and row["step_s"] is None
                continue
            assert "error" not in row, (domain, mode, row.get("error"))
            assert row["step_s"] > 0 and row["peak_mem_mb"] > 0 and row["optimizer_state_mb"] > 0
            assert 0 < row["trainable"] and 0 <= row["frozen_tensors"] <= row["eligible_tensors"]
        cal = res["calibration"][domain]
        assert CAL_KEYS <= set(cal) and all(cal[k] > 0 for k in CAL_KEYS)


def test_counts_follow_the_modes(result):
    res, _ = result
    for domain in ("vision", "nlp"):
        rows = res[domain]
        std, talos = rows["standard"], rows["talos"]
        # TaLoS keeps (1 - sparsity) of the eligible entries; dense extras (vision embeddings) train fully
        assert talos["trainable"] < std["trainable"]
        assert rows["lora"]["frozen_tensors"] == rows["lora"]["eligible_tensors"]  # base weights frozen
        assert std["frozen_tensors"] == 0
        assert talos["optimizer_state_mb"] < std["optimizer_state_mb"]


def test_markdown_and_targets(result):
    res, out = result
    md = out.with_suffix(".md").read_text()
    for mode in run_order():
        assert f"| {mode} |" in md
    names = {t["target"] for t in res["targets"]}
    assert {"talos step <= 1.05x standard", "anchor >= 15x calibration per example"} <= names
    assert all(t["pass"] in (True, False) for t in res["targets"])
    assert "PASS" in md or "FAIL" in md


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_jobs_report_their_own_peak(tmp_path):
    (res,) = efficiency.main(["--preset", "test", "--domains", "vision", "--modes", "standard,talos",
                              "--out", str(tmp_path / "f.json")])
    assert res["isolation"] == "fork" and not res["nlp"]
    for mode in ("standard", "talos"):
        row = res["vision"][mode]
        assert "error" not in row and row["peak_mem_mb"] >= row["base_mem_mb"] > 0


def test_bad_flags_exit():
    with pytest.raises(SystemExit):
        efficiency.main(["--preset", "test", "--modes", "no_such_mode"])
    with pytest.raises(SystemExit):
        efficiency.main(["--preset", "test", "--domains", "audio"])


def test_grad_checkpointing_run_with_baseline_table(result, tmp_path):
    _, base = result
    (res,) = efficiency.main(["--preset", "test", "--isolation", "none", "--grad-checkpointing", "--modes",
                              "standard,talos,linear", "--baseline", str(base), "--out", str(tmp_path / "gc.json")])
    assert res["config"]["grad_checkpointing"]
    for domain in ("vision", "nlp"):
        assert "error" not in res[domain]["talos"] and res[domain]["talos"]["step_s"] > 0
        assert res[domain]["linear"]["unsupported"]  # torch.func.jvp cannot run through checkpoints
    md = (tmp_path / "gc.md").read_text()
    assert "activation checkpointing: its trade" in md and "| vision | talos |" in md
