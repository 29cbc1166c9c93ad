"""``nlp/analyze.py``: every figure on tiny T5 runs of generated tasks, numbers checked against the protocols'
results where they measure the same thing (CPU, offline)."""
from __future__ import annotations

import pytest

from nlp import analyze
from tests.helpers import AnalysisRuns

TASKS = ["synth_qa", "synth_para"]


def common(synth, save, *extra):
    data, tok = synth
    return ["--model", "talos-tiny-t5", "--tokenizer", str(tok), "--data-location", str(data), "--save", str(save),
            "--eval-datasets", ",".join(TASKS), "--control-dataset", "synth_control", "--batch-size", "8",
            "--num-grad-accumulation", "1", "--num-steps", "4", "--lr", "1e-2", "--max-seq-len", "64",
            "--calibration-batch-size", "16", "--calibration-batches", "1", "--calibration-rounds", "2",
            "--eval-batch-size", "64", "--attn-implementation", "eager", "--device", "cpu", "--no-progress",
            "--n-eval-points", "3", *extra]


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory):
    """standard + talos runs of two tasks (gradient drift recorded), talos single-task and addition results."""
    return AnalysisRuns("nlp", "talos-tiny-t5", lambda save, *extra: common(synth, save, *extra),
                        tmp_path_factory.mktemp("nlp_analyze") / "runs", TASKS)


def test_every_figure_on_tiny_t5_runs(runs):
    single, addition = runs.single["test"], runs.addition
    r = runs.figure("accuracy_ratio", "--modes", "talos")
    for i, t in enumerate(TASKS):
        assert r["ratio"]["talos"][i][i] == pytest.approx(single["finetuned"][t] / single["zeroshot"][t])
    lin = runs.figure("linearized", "--modes", "talos")
    assert lin["per_mode"]["talos"]["finetuned"] == pytest.approx(single["finetuned"])
    xi = runs.figure("disentanglement", "--modes", "standard,talos", "--alphas", "0,1", "--max-examples", "16")
    assert all(grid[0][0] == 0.0 for grid in xi["xi"].values())
    s = runs.figure("sensitivity_transfer", "--max-examples", "16")
    assert all(abs(f - 0.1) < 1e-3 for f in s["pruned_fraction"]["most"].values())
    m = runs.figure("mask_overlap")
    assert m["iou"]["synth_qa"]["synth_qa"] == 1.0 and m["density"]["synth_qa"] == pytest.approx(0.1, abs=1e-3)
    assert set(m["per_layer"]["synth_qa"]) <= {"enc 0", "enc 1", "dec 0", "dec 1", "final norm", "other"}
    d = runs.figure("gradient_drift")
    assert set(d["curves"]) == {"standard", "talos"} and d["curves"]["standard"]["synth_qa"]["steps"] == [0, 2, 4]
    a = runs.figure("sparsity_ablation", "--sparsities", "0.9")
    assert a["rows"]["talos"]["0.9"]["normalized"] == addition["normalized"]
    assert a["rows"]["talos"]["0.9"]["single_task"] == pytest.approx(sum(single["finetuned"].values()) / 2)


def test_missing_runs_fail_clearly(synth, tmp_path):
    with pytest.raises(FileNotFoundError, match="nlp/finetune.py --train-dataset synth_qa --finetuning-mode talos"):
        analyze.main(["linearized", *common(synth, tmp_path, "--modes", "talos")])
