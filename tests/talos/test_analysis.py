"""The analysis layer's computations on hand-checkable cases, the gradient-drift hook, and the figure driver's
failure modes (unknown figure, missing runs) and skip-when-done."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from talos.analysis import (FIGURES, EditPredictor, GradientDrift, accuracy_ratios, disentanglement, kind_of,
                            layer_of, mask_stats, prune_edit, sensitivity_transfer)
from talos.stages import EditEvaluator
from talos.task_vector import TaskVector
from talos.train import TrainConfig, train


def _linear_world(seed: int = 0):
    """A linear classifier over 6 features and two tasks' fixed inputs: (model, names, preds, acc, data)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(6, 4)
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 6, generator=g))
        model.bias.zero_()
    data = {t: torch.randn(50, 6, generator=g) for t in ("A", "B")}
    labels = {t: torch.randint(0, 4, (50,), generator=g) for t in ("A", "B")}

    def preds(m, task, split):
        return m(data[task]).argmax(-1)

    def acc(m, task, split):
        return float((preds(m, task, split) == labels[task]).float().mean())

    return model, ["weight", "bias"], preds, acc, data


def _tv(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return TaskVector({n: scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()})


def test_xi_is_zero_for_zero_task_vectors_and_matches_brute_force():
    model, names, preds, _, data = _linear_world()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()  # θ0 (the predictor leaves its last edit)
    predict = EditPredictor(model, names, preds)
    zero = _tv(model, 0.0, 1)
    alphas = [-1.0, 0.0, 0.5, 2.0]
    assert disentanglement(predict, zero, zero, ["A", "B"], alphas).abs().sum() == 0
    t1, t2 = _tv(model, 0.5, 1), _tv(model, 0.5, 2)
    xi = disentanglement(predict, t1, t2, ["A", "B"], alphas)

    def out(c1, c2, x):  # θ0 + c1 τ1 + c2 τ2 written out by hand
        w = w0 + c1 * t1["weight"] + c2 * t2["weight"]
        return (x @ w.T + b0 + c1 * t1["bias"] + c2 * t2["bias"]).argmax(-1)

    for i, a1 in enumerate(alphas):
        for j, a2 in enumerate(alphas):
            ref = ((out(a1, 0, data["A"]) != out(a1, a2, data["A"])).float().mean()
                   + (out(0, a2, data["B"]) != out(a1, a2, data["B"])).float().mean())
            assert xi[i, j] == pytest.approx(float(ref), abs=1e-6), (a1, a2)
    assert xi.abs().sum() > 0  # the random vectors do interfere somewhere


def test_accuracy_ratio_is_one_for_zero_task_vectors_and_divides_by_zero_shot():
    model, names, _, acc, _ = _linear_world()
    ev = EditEvaluator(model, names, acc)
    zero = {t: _tv(model, 0.0, 1) for t in ("A", "B")}
    r = accuracy_ratios(ev, zero, ["A", "B"])
    assert r["ratio"] == [[1.0, 1.0], [1.0, 1.0]]
    table = {(None, "A"): 0.5, (None, "B"): 0.25, ("a", "A"): 0.75, ("a", "B"): 0.125, ("b", "A"): 0.5,
             ("b", "B"): 1.0}
    r = accuracy_ratios(lambda e, t, s: table[(e, t)], {"A": "a", "B": "b"}, ["A", "B"])
    assert r["ratio"] == [[1.5, 0.5], [1.0, 4.0]]


def test_mask_stats_iou_of_identical_masks_is_one_and_hand_case():
    m = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.tensor([[True, False], [False, False]]),
         "decoder.block.1.layer.2.DenseReluDense.wo.weight": torch.tensor([True, True, False, False])}
    other = {k: ~v for k, v in m.items()}
    st = mask_stats({"A": m, "B": dict(m), "C": other})
    assert st["iou"]["A"]["B"] == 1.0 and st["iou"]["A"]["A"] == 1.0
    assert st["iou"]["A"]["C"] == 0.0
    assert st["per_layer"]["A"] == {"enc 0": 0.25, "dec 1": 0.5}
    assert st["per_kind"]["A"] == {"attn q": 0.25, "mlp out": 0.5}
    assert st["density"]["C"] == pytest.approx(5 / 8)


def test_layer_and_kind_names_of_clip_t5_gpt2():
    assert layer_of("visual.transformer.resblocks.2.attn.in_proj_weight") == "block 2"
    assert kind_of("visual.transformer.resblocks.2.attn.out_proj.weight") == "attn out"
    assert kind_of("encoder.block.3.layer.1.EncDecAttention.k.weight") == "cross k"
    assert kind_of("decoder.block.0.layer.0.SelfAttention.o.weight") == "attn out"
    assert kind_of("encoder.block.0.layer.1.DenseReluDense.wi.weight") == "mlp in"
    assert kind_of("encoder.final_layer_norm.weight") == "layer norm"
    assert (layer_of("transformer.h.5.attn.c_attn.weight"), kind_of("transformer.h.5.attn.c_attn.weight")) == (
        "block 5", "attn qkv")
    assert kind_of("transformer.h.5.attn.c_proj.weight") == "attn out"
    assert kind_of("transformer.h.5.mlp.c_proj.weight") == "mlp out"


def test_prune_edit_zeroes_the_least_or_most_sensitive_fraction():
    theta0 = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0, 5.0, 6.0])}
    scores = {"a": torch.tensor([0.1, 0.5, 0.3]), "b": torch.tensor([0.9, 0.2, 0.7])}
    edit, masks = prune_edit(theta0, scores, 0.5, "least")  # the 3 lowest: 0.1, 0.2, 0.3
    assert masks["a"].tolist() == [True, False, True] and masks["b"].tolist() == [False, True, False]
    assert edit.apply_to(theta0)["a"].tolist() == [0.0, 2.0, 0.0]
    assert edit.apply_to(theta0)["b"].tolist() == [4.0, 0.0, 6.0]
    _, masks = prune_edit(theta0, scores, 0.34, "most")  # floor(0.34 * 6) = 2 entries: 0.9, 0.7
    assert masks["a"].tolist() == [False, False, False] and masks["b"].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="prune fraction"):
        prune_edit(theta0, scores, 1.0, "least")


def test_sensitivity_transfer_ratios_against_a_direct_computation():
    model, names, _, acc, _ = _linear_world()
    ev = EditEvaluator(model, names, acc)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = {t: {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for n, p in theta0.items()}
              for i, t in enumerate(("A", "B"))}
    out = sensitivity_transfer(ev, theta0, scores, ["A", "B"], 0.25)
    for which in ("least", "most"):
        for i, a in enumerate(("A", "B")):
            edit, _ = prune_edit(theta0, scores[a], 0.25, which)
            for j, b in enumerate(("A", "B")):
                assert out["ratio"][which][i][j] == pytest.approx(ev(edit, b, "test") / ev(None, b, "test"))


def test_gradient_drift_hand_case_and_train_hook():
    # f(x; w) = Σ (w ⊙ w) x: ∇_w f = 2 w ⊙ x, so after w -> w + d the drift is ‖2 d ⊙ x‖²
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    model = nn.Module()
    model.w = w
    x = torch.tensor([1.0, -1.0, 2.0])
    drift = GradientDrift(lambda m: ((m.w * m.w) * x).sum().unsqueeze(0), every=2)
    hook = drift.start(model, [("w", w)], {"w": torch.tensor([True, True, False])})
    with torch.no_grad():
        w.add_(torch.tensor([0.5, 0.5, 0.5]))
    hook(1)  # not a multiple of every: nothing recorded
    hook(2)
    res = drift.result()
    assert [r["step"] for r in res["records"]] == [0, 2]
    assert res["records"][1]["drift"] == pytest.approx(1.0 + 1.0)  # masked third entry does not count
    assert res["g0_norm_sq"] == pytest.approx(4.0 + 16.0)

    steps = []  # the training loop calls on_step after every optimizer step
    lin = nn.Linear(3, 2)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    train(lin, data, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), list(lin.named_parameters()), None,
          TrainConfig(steps=3, batch_size=4, warmup=0), progress=False, on_step=steps.append)
    assert steps == [1, 2, 3]


def _args(tmp_path, **over):
    from dataclasses import replace

    from talos.analysis.figures import AnalysisSettings
    from talos.app.flags import parse
    from tests.talos.app.test_flags import TOY

    analysis = dict(figure="accuracy_ratio", modes=None, sparsities=[0.9])
    analysis.update({k: over.pop(k) for k in list(over) if k in AnalysisSettings.__dataclass_fields__})
    argv = ["--device", "cpu", "--save", str(tmp_path), "--n-eval-points", "3", analysis.pop("figure")]
    if analysis["modes"]:
        argv += ["--modes", ",".join(analysis["modes"])]
    argv += ["--sparsities", ",".join(map(str, analysis["sparsities"]))]
    cfg = parse(replace(TOY, extra={"analysis": AnalysisSettings}), argv)
    return cfg.replace(**over) if over else cfg


def _domain():
    from talos.analysis import AnalysisDomain
    from tests.talos.app.test_flags import RUNS, TOY

    def load(args):
        raise AssertionError("model loaded")

    return AnalysisDomain(name="toy", runs=RUNS, settings=TOY, check_data=lambda a, t: None, load=load)


def test_unknown_figure_and_missing_runs_fail_clearly(tmp_path):
    from talos.analysis import FigureContext, run_figure

    with pytest.raises(ValueError, match="unknown figure 'fig9'; valid choices: accuracy_ratio"):
        FIGURES.get("fig9")
    ctx = FigureContext(_domain(), _args(tmp_path, modes=["standard"]))
    with pytest.raises(FileNotFoundError, match="toy/finetune.py --train-dataset A --finetuning-mode standard"):
        run_figure(ctx, "accuracy_ratio")  # (the domain's load() would fail the test: raises before)
    ctx = FigureContext(_domain(), _args(tmp_path))  # no --modes and no runs at all
    with pytest.raises(FileNotFoundError, match="no runs of any of the modes"):
        run_figure(ctx, "disentanglement")
    for fig, match in (("mask_overlap", "no mask for A"), ("gradient_drift", "--gradient-drift-every"),
                       ("sparsity_ablation", "sparsity_ablation.sh")):
        with pytest.raises(FileNotFoundError, match=match):
            run_figure(FigureContext(_domain(), _args(tmp_path, modes=["talos"])), fig)
    with pytest.raises(ValueError, match="unknown fine-tuning mode"):
        run_figure(FigureContext(_domain(), _args(tmp_path, modes=["magic"])), "accuracy_ratio")


def test_figure_is_skipped_when_it_exists(tmp_path, monkeypatch, capsys):
    from talos.analysis import FigureContext, run_figure
    from talos.analysis.drift import drift_path

    ctx = FigureContext(_domain(), _args(tmp_path, modes=["standard"]))
    for t in ("A", "B"):
        run = ctx.domain.runs.finetune(ctx.mode_args("standard"), t)
        run.dir.mkdir(parents=True)
        drift_path(run.dir).write_text('{"every": 1, "g0_norm_sq": 2.0, "n_entries": 3, "records": '
                                       '[{"step": 0, "drift": 0.0}, {"step": 1, "drift": 1.0}]}')
    numbers, run = run_figure(ctx, "gradient_drift")
    assert numbers["curves"]["standard"]["A"]["relative"] == [0.0, 0.5]
    assert (run.dir / "gradient_drift.png").stat().st_size > 1000
    spec = FIGURES.get("gradient_drift")
    monkeypatch.setattr(spec, "compute", lambda *a: pytest.fail("recomputed"))
    again, run2 = run_figure(ctx, "gradient_drift")
    assert run2.dir == run.dir and again == numbers and "exists:" in capsys.readouterr().out
