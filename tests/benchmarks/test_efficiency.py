"""benchmarks/efficiency.py on its tiny preset (CPU): counts against hand-computed references, the report, the CLI.

Speed is not asserted here: the benchmark measures it (benchmarks/results/efficiency_cpu.md).
"""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from benchmarks import efficiency, efficiency_report
from talos.calibration import kept_count

MODES = ["standard", "talos", "lora", "lota", "posthoc"]
RANK = 16  # ModeContext's default LoRA rank


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency") / "eff.json"
    (res,) = efficiency.main(["--preset", "test", "--in-process", "--modes", ",".join(MODES), "--out", str(out)])
    return res, out


def _sizes(domain: str) -> tuple[int, int]:
    """(eligible, dense) entries of the test preset's model, counted from the scripts' own builders."""
    if domain == "vision":
        from vision.models import ImageClassifier, load_clip, split_parameters

        clf = ImageClassifier(load_clip("talos-tiny-vit", "none")[0].visual, torch.zeros(1, 1))
        eligible, dense = split_parameters(clf, freeze_embeddings=False)
        named = dict(clf.named_parameters())
        return sum(named[n].numel() for n in eligible), sum(named[n].numel() for n in dense)
    from nlp.models import eligible_parameters, load_model

    model = load_model("talos-tiny-t5", None)[0]
    named = dict(model.named_parameters())
    return sum(named[n].numel() for n in eligible_parameters(model)), 0


@pytest.mark.parametrize("domain", ["vision", "nlp"])
def test_trainable_entries_match_hand_counts(result, domain):
    res, _ = result
    rows, (n_elig, n_dense) = res[domain], _sizes(domain)
    assert list(rows) == MODES  # standard first, every asked mode reported
    assert rows["standard"]["trainable"] == n_elig + n_dense
    # sparse modes keep floor(0.1 N) eligible entries (sparsity 0.9); the dense extras train fully
    assert rows["talos"]["trainable"] == rows["lota"]["trainable"] == kept_count(0.1, n_elig) + n_dense
    # LoRA: rank x (in + out) per adapted block; vision: q and v row blocks (64 x 64) of 2 layers; nlp: q and v
    # (32 x 32) of 2 encoder self-, 2 decoder self- and 2 decoder cross-attentions
    assert rows["lora"]["trainable"] == (2 * 2 * RANK * 128 if domain == "vision" else 6 * 2 * RANK * 64)
    assert rows["posthoc"] == {"trained_by": "standard"}


@pytest.mark.parametrize("domain", ["vision", "nlp"])
def test_frozen_tensors_and_optimizer_state(result, domain):
    rows = result[0][domain]
    std, talos, lora = rows["standard"], rows["talos"], rows["lora"]
    assert std["frozen_tensors"] == 0 < talos["frozen_tensors"] < talos["eligible_tensors"]
    assert lora["frozen_tensors"] == lora["eligible_tensors"]  # base weights frozen
    # dense AdamW: two fp32 moments per entry plus one step counter per tensor
    n_bytes, n = std["optimizer_state_mb"] * 2**20, std["trainable"]
    assert 8 * n < n_bytes <= 8 * n + 8 * std["eligible_tensors"] + 64
    assert talos["optimizer_state_mb"] < 0.25 * std["optimizer_state_mb"]
    for r in (std, talos, lora):
        assert len(r["step_times_s"]) == 2 and r["step_s"] > 0 and r["peak_mem_mb"] >= r["train_mem_mb"] >= 0


def test_calibration_and_report(result):
    res, out = result
    assert json.loads(out.read_text())["backbones"] == {"vision": "talos-tiny-vit", "nlp": "talos-tiny-t5"}
    for c in res["calibration"].values():
        assert c["rounds"] == 4 and c["examples"] == 4  # ModeContext's default rounds, one batch of 4
        assert c["per_example_s"] > 0 and c["plain_per_example_s"] > 0 and c["anchor_per_example_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert all(f"| {m} |" in md for m in MODES) and "| posthoc | = standard |" in md
    assert len(res["targets"]) == 2 * (len(efficiency_report.TARGETS) + len(efficiency_report.CAL_TARGETS))
    linear = [t for t in res["targets"] if "linear" in t["target"]]
    assert linear and all(t["value"] is None and t["pass"] is None for t in linear)  # linear not measured


def test_targets_and_trade_hand_computed():
    row = {"step_s": 1.0, "peak_mem_mb": 100.0, "train_mem_mb": 40.0, "trainable": 10, "frozen_tensors": 0,
           "eligible_tensors": 2, "optimizer_state_mb": 8.0, "step_times_s": [1.0]}
    rows = {"standard": row, "talos": {**row, "step_s": 1.1, "optimizer_state_mb": 1.0, "peak_mem_mb": 80.0},
            "linear": {**row, "step_s": 2.0}}
    cal = {"per_example_s": 0.5, "plain_per_example_s": 0.4, "anchor_per_example_s": 10.0, "rounds": 4,
           "examples": 8, "peak_mem_mb": 1.0}
    res = {"preset": "x", "device": "cpu", "date": "d", "wall_s": 1.0, "backbones": {"vision": "m"}, "vision": rows,
           "calibration": {"vision": cal}, "settings": asdict(efficiency.Settings())}
    got = {t["target"]: (round(t["value"], 6), t["pass"]) for t in efficiency_report.check_targets(res)}
    assert got == {"talos step <= 1.05x standard": (1.1, False), "talos optimizer state <= 0.25x standard": (0.125, True),
                   "talos peak memory <= 0.9x standard": (0.8, True), "linear step >= 1.5x standard": (2.0, True),
                   "talos step <= 0.7x linear": (0.55, True), "calibration <= 1.0x plain fwd+bwd per example": (1.25, False),
                   "anchor >= 15x calibration per example": (20.0, True)}
    res["targets"] = efficiency_report.check_targets(res)
    base = {"vision": {"talos": {**row, "step_s": 0.55, "train_mem_mb": 20.0}}}
    md = efficiency_report.markdown(res, base, "base.json")
    assert "| vision | talos | 550.0 -> 1100.0 | 2.00 | 100 -> 80 | 2.00 |" in md
    assert "| talos | 1100.0 | 1.10 |" in md and "| vision | calibration <= 1.0x plain fwd+bwd per example | 1.250 | FAIL |" in md


def test_grad_checkpointing_refuses_linearized_modes(tmp_path):
    (res,) = efficiency.main(["--preset", "test", "--in-process", "--domains", "vision", "--modes", "linear,standard",
                              "--grad-checkpointing", "--out", str(tmp_path / "gc.json")])
    assert list(res["vision"]) == ["standard", "linear"] and "nlp" not in res
    assert "jvp" in res["vision"]["linear"]["unsupported"] and res["vision"]["standard"]["step_s"] > 0
    assert res["settings"]["grad_checkpointing"] and (tmp_path / "gc.md").exists()


@pytest.mark.slow  # two fresh interpreters (torch, open_clip, transformers imports)
def test_one_job_in_its_own_process(tmp_path):
    """The --one path the table runs per measurement: a fresh process, its own peak, the same counts."""
    bb, s = efficiency.PRESETS["test"][0][0], efficiency.PRESETS["test"][1]
    job = {"kind": "train", "mode": "standard", "backbone": asdict(bb), "settings": asdict(s), "workdir": str(tmp_path)}
    r = efficiency.run_isolated(job)
    assert r["trainable"] == sum(_sizes("vision")) and r["peak_mem_mb"] >= r["base_mem_mb"] > 0
    with pytest.raises(RuntimeError, match="failed"):
        efficiency.run_isolated({**job, "mode": "talos"})  # no mask written for it: the child fails loudly


def test_bad_flags_exit():
    for argv in (["--modes", "no_such_mode"], ["--domains", "audio"], ["--in-process", "--baseline", "/no/such.json"]):
        with pytest.raises(SystemExit):
            efficiency.main(["--preset", "test", *argv])
