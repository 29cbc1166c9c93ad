"""``vision/analyze.py``: every figure on tiny runs (tiny CLIP config, generated images), numbers checked against
the protocols' own results where they measure the same thing, and clear failures (CPU, offline)."""
from __future__ import annotations

import pytest

from tests.helpers import AnalysisRuns
from vision import analyze
from vision.synthetic import make_synthetic_datasets

TASKS = ["SynthShapes", "SynthColors"]


def common(data, save, *extra):
    return ["--model", "talos-tiny-vit", "--pretrained", "none", "--data-location", str(data), "--save", str(save),
            "--eval-datasets", ",".join(TASKS), "--control-dataset", "SynthControl", "--batch-size", "16",
            "--lr", "1e-3", "--warmup-length", "2", "--epochs", "1", "--calibration-batch-size", "8",
            "--eval-batch-size", "64", "--num-workers", "0", "--device", "cpu", "--no-progress",
            "--n-eval-points", "3", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """standard + talos runs of two tasks (gradient drift recorded), talos single-task and addition results."""
    root = tmp_path_factory.mktemp("vision_analyze")
    data = root / "data"
    make_synthetic_datasets(data, n_train=60, n_test=20)
    return AnalysisRuns("vision", "talos-tiny-vit", lambda save, *extra: common(data, save, *extra), root / "runs",
                        TASKS)


def test_accuracy_ratio_and_linearized_match_the_single_task_protocol(runs):
    single = runs.single["test"]
    r = runs.figure("accuracy_ratio", "--modes", "standard,talos")
    for i, t in enumerate(TASKS):  # diagonal = fine-tuned / zero-shot accuracy, as eval_single_task measured
        assert r["ratio"]["talos"][i][i] == pytest.approx(single["finetuned"][t] / single["zeroshot"][t])
    lin = runs.figure("linearized", "--modes", "talos")
    assert lin["per_mode"]["talos"]["finetuned"] == pytest.approx(single["finetuned"])
    assert set(lin["per_mode"]["talos"]["linearized"]) == set(TASKS)


def test_disentanglement_and_sensitivity_transfer(runs):
    xi = runs.figure("disentanglement", "--alphas", "0,0.5,1", "--max-examples", "20")
    # default: every mode with runs (posthoc evaluates the standard vectors through the linearized model)
    assert set(xi["xi"]) == {"standard", "posthoc", "talos"} and "lora" in xi["skipped_modes"]
    for grid in xi["xi"].values():
        assert len(grid) == 3 and grid[0][0] == 0.0  # α1 = α2 = 0: the same model
        assert all(0.0 <= v <= 2.0 for row in grid for v in row)
    s = runs.figure("sensitivity_transfer", "--max-examples", "20")
    assert s["fraction"] == 0.1 and len(s["ratio"]["least"]) == 2 and len(s["ratio"]["most"][0]) == 2
    assert all(abs(f - 0.1) < 1e-3 for f in s["pruned_fraction"]["least"].values())


def test_masks_drift_and_sparsity_ablation(runs, capsys):
    m = runs.figure("mask_overlap")
    assert m["iou"]["SynthShapes"]["SynthShapes"] == 1.0 and 0 <= m["iou"]["SynthShapes"]["SynthColors"] < 1
    assert m["density"]["SynthShapes"] == pytest.approx(0.1, abs=1e-3)
    d = runs.figure("gradient_drift")
    assert set(d["curves"]) == {"standard", "talos"}
    assert d["curves"]["talos"]["SynthShapes"]["steps"] == [0, 2, 4]  # 54 images / 16 = 4 steps, every 2
    a = runs.figure("sparsity_ablation", "--sparsities", "0.9")
    single, addition = runs.single["test"]["finetuned"], runs.addition
    assert a["rows"]["talos"]["0.9"] == pytest.approx({"single_task": sum(single.values()) / 2,
                                                       "normalized": addition["normalized"],
                                                       "absolute": addition["absolute"]})
    runs.figure("mask_overlap")  # exists: skipped
    assert "exists:" in capsys.readouterr().out


def test_unknown_figure_and_missing_runs_fail_clearly(runs, tmp_path, capsys):
    data = runs.save.parent / "data"
    with pytest.raises(SystemExit) as e:
        analyze.main(["fig9", *common(data, tmp_path)])
    assert e.value.code == 2 and "unknown figure 'fig9'; valid choices: accuracy_ratio" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="vision/finetune.py --train-dataset SynthShapes --finetuning-mode"):
        analyze.main(["accuracy_ratio", *common(data, tmp_path, "--modes", "talos")])
    with pytest.raises(FileNotFoundError, match="no runs of any of the modes"):
        analyze.main(["disentanglement", *common(data, tmp_path)])
