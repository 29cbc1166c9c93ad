"""Tests for talos.coefficients and talos.protocols on hand-made accuracy tables with hand-computed answers."""
from collections import Counter

import pytest
import torch

from talos.coefficients import (accuracy, choose_addition_coef, choose_negation_coef, coefficient_grid,
                             disentanglement_error, normalized_accuracy, summarize_addition, summarize_negation)


# ---------------------------------------------------------------- grid / accuracy


def test_default_grid_is_exact():
    assert coefficient_grid() == [
        0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
        0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0,
    ]


def test_grid_custom():
    assert coefficient_grid(5, 2.0) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert coefficient_grid(2) == [0.0, 1.0]


@pytest.mark.parametrize("n", [1, 0, -3])
def test_grid_too_few_points(n):
    with pytest.raises(ValueError):
        coefficient_grid(n)


def test_accuracy():
    assert accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    with pytest.raises(ValueError):
        accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


# ---------------------------------------------------------------- normalised accuracy


def test_normalized_accuracy():
    out = normalized_accuracy({"a": 0.45, "b": 0.9}, {"a": 0.9, "b": 0.9, "c": 0.5})
    assert out == pytest.approx({"a": 0.5, "b": 1.0})


@pytest.mark.parametrize("finetuned", [{"a": 0.9}, {"a": 0.9, "b": 0.0}, {"a": 0.9, "b": -0.1}])
def test_normalized_accuracy_bad(finetuned):
    with pytest.raises(ValueError):
        normalized_accuracy({"a": 0.5, "b": 0.5}, finetuned)


# ---------------------------------------------------------------- addition


def test_addition_uses_normalized_not_absolute_mean():
    finetuned = {"a": 1.0, "b": 0.5}
    val = {
        0.0: {"a": 0.5, "b": 0.1},  # abs 0.30, norm 0.45
        0.2: {"a": 0.9, "b": 0.2},  # abs 0.55 (best absolute), norm 0.65
        0.4: {"a": 0.6, "b": 0.4},  # abs 0.50, norm 0.70 (best normalised)
    }
    assert choose_addition_coef(val, finetuned) == 0.4


def test_addition_tie_goes_to_smallest_alpha():
    finetuned = {"a": 0.6, "b": 1.0}
    # Insertion order is deliberately not sorted; 0.3 and 0.5 both score exactly 0.5.
    val = {
        0.5: {"a": 0.45, "b": 0.25},
        0.1: {"a": 0.3, "b": 0.2},
        0.3: {"a": 0.3, "b": 0.5},
    }
    assert choose_addition_coef(val, finetuned) == 0.3


def test_addition_tie_tolerates_float_rounding():
    # Both alphas score 23/60 mathematically, but in floating point alpha=0.5 comes out
    # one ulp higher (0.38333333333333336 vs ...33); it must still count as a tie.
    finetuned = {"a": 0.3, "b": 1.0}
    val = {0.3: {"a": 0.05, "b": 0.6}, 0.5: {"a": 0.2, "b": 0.1}}
    assert (0.2 / 0.3 + 0.1) / 2 > (0.05 / 0.3 + 0.6) / 2  # the rounding this test relies on
    assert choose_addition_coef(val, finetuned) == 0.3


def test_addition_bad_inputs():
    finetuned = {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError):
        choose_addition_coef({}, finetuned)
    with pytest.raises(ValueError):
        choose_addition_coef({0.0: {"a": 0.5, "b": 0.5}}, {})
    with pytest.raises(ValueError, match="missing"):
        choose_addition_coef({0.0: {"a": 0.5, "b": 0.5}, 0.5: {"a": 0.9}}, finetuned)
    with pytest.raises(ValueError):
        choose_addition_coef({0.0: {"a": 0.5, "b": 0.5, "c": 0.5}}, finetuned)
    with pytest.raises(ValueError):
        choose_addition_coef({0.0: {"a": 0.5, "b": 0.5}}, {"a": 1.0, "b": 0.0})


# ---------------------------------------------------------------- negation


def test_negation_respects_control_threshold():
    # floor = 0.95 * 0.7 = 0.665; alpha=1.0 has the lowest target but breaks control.
    target = {0.0: 0.8, 0.5: 0.4, 1.0: 0.1}
    control = {0.0: 0.7, 0.5: 0.68, 1.0: 0.5}
    assert choose_negation_coef(target, control, zeroshot_control_acc=0.7) == 0.5
    # A looser threshold admits alpha=1.0.
    assert choose_negation_coef(target, control, 0.7, threshold=0.7) == 1.0


def test_negation_tie_goes_to_smallest_alpha():
    target = {0.6: 0.4, 0.0: 0.8, 0.5: 0.4}
    control = {0.6: 0.7, 0.0: 0.7, 0.5: 0.7}
    assert choose_negation_coef(target, control, 0.7) == 0.5


def test_negation_nothing_satisfies():
    with pytest.raises(ValueError, match="no alpha"):
        choose_negation_coef({0.0: 0.8, 1.0: 0.1}, {0.0: 0.6, 1.0: 0.5}, zeroshot_control_acc=0.7)


def test_negation_bad_inputs():
    with pytest.raises(ValueError):
        choose_negation_coef({0.0: 0.8, 1.0: 0.1}, {0.0: 0.7}, 0.7)
    with pytest.raises(ValueError):
        choose_negation_coef({}, {}, 0.7)


# ---------------------------------------------------------------- summaries


def test_summarize_addition():
    out = summarize_addition({"a": 0.8, "b": 0.4}, {"a": 1.0, "b": 0.8})
    assert out["absolute"] == pytest.approx(0.6)
    assert out["normalized"] == pytest.approx(0.65)  # (0.8 + 0.5) / 2
    assert out["per_task"]["a"] == pytest.approx({"absolute": 0.8, "normalized": 0.8})
    assert out["per_task"]["b"] == pytest.approx({"absolute": 0.4, "normalized": 0.5})
    with pytest.raises(ValueError):
        summarize_addition({"a": 0.8, "b": 0.4}, {"a": 1.0})
    with pytest.raises(ValueError):
        summarize_addition({}, {"a": 1.0})


def test_summarize_negation():
    out = summarize_negation({"a": (0.2, 0.6), "b": (0.4, 0.7)})
    assert out["target"] == pytest.approx(0.3)
    assert out["control"] == pytest.approx(0.65)
    assert out["per_task"]["b"] == {"target": 0.4, "control": 0.7}
    with pytest.raises(ValueError):
        summarize_negation({})
    with pytest.raises(ValueError):
        summarize_negation({"a": (0.2, 0.6, 0.1)})


# ---------------------------------------------------------------- disentanglement


THR0 = torch.tensor([0.25, 0.5, 0.75, 1.0])  # task 0: example k flips once a2 >= THR0[k]
THR1 = torch.tensor([0.5, 1.0])  # task 1: example k flips once a1 >= THR1[k]


def make_predict(calls: Counter):
    """Toy model: each task's predictions also move with its own alpha, which must cancel."""

    def predict(a1: float, a2: float, t: int) -> torch.Tensor:
        calls[(a1, a2, t)] += 1
        if t == 0:
            own = torch.full((4,), int(a1 >= 0.5))
            return own + 2 * (a2 >= THR0).long()
        own = torch.full((2,), int(a2 > 0.3))
        return own + 2 * (a1 >= THR1).long()

    return predict


def test_disentanglement_known_values():
    calls = Counter()
    grid = [0.0, 0.5, 1.0]
    xi = disentanglement_error(make_predict(calls), grid, grid)
    # xi = (#THR0 <= a2)/4 + (#THR1 <= a1)/2, hand-computed:
    expected = torch.tensor([[0.0, 0.5, 1.0], [0.5, 1.0, 1.5], [1.0, 1.5, 2.0]])
    assert xi.shape == (3, 3)
    assert xi.dtype.is_floating_point
    assert torch.allclose(xi, expected)
    assert xi[0, 0] == 0
    # The references (a1,0,0) / (0,a2,1) coincide with joint models on the grid, so
    # only the 9 distinct models per task are evaluated, each exactly once.
    assert len(calls) == 18 and set(calls.values()) == {1}


def test_disentanglement_memoises_references():
    calls = Counter()
    xi = disentanglement_error(make_predict(calls), [0.5, 1.0], [0.25, 0.5, 0.75])
    expected = torch.tensor([[0.75, 1.0, 1.25], [1.25, 1.5, 1.75]])
    assert torch.allclose(xi, expected)
    # task 0: 2 references + 6 joint; task 1: 3 references + 6 joint (naive: 4 * 6 = 24)
    assert sum(calls.values()) == 17
    assert set(calls.values()) == {1}


def test_disentanglement_single_point_zero():
    assert disentanglement_error(make_predict(Counter()), [0.0], [0.0]).tolist() == [[0.0]]


def test_disentanglement_bad_inputs():
    with pytest.raises(ValueError):
        disentanglement_error(make_predict(Counter()), [], [0.0])

    def ragged(a1, a2, t):
        return torch.zeros(3 if a2 == 0 else 4, dtype=torch.long)

    with pytest.raises(ValueError):
        disentanglement_error(ragged, [0.5], [0.5])


def test_task_negation_subtracts_the_merge_version_of_each_vector() -> None:
    """With a merge, negation evaluates θ0 − α · negation_edits(...)[t]; 'accuracy' here is a readout of the edit."""
    from talos.protocols import task_negation
    from talos.merges import negation_edits
    from talos.task_vector import TaskVector

    vectors = {"a": TaskVector({"w": torch.tensor([3.0, -1.0, 0.5])}),
               "b": TaskVector({"w": torch.tensor([0.2, 2.0, -0.1])})}
    seen: list[tuple[str, torch.Tensor | None]] = []

    def evaluate(edit, task, split):
        seen.append((task, None if edit is None else edit["w"].clone()))
        if task == "control":
            return 1.0  # never drops: the largest coefficient is allowed
        return 1.0 if edit is None else 1.0 - float(edit["w"].abs().sum()) / 10

    for method in ("sum", "ties"):
        seen.clear()
        res = task_negation(evaluate, vectors, "control", n_points=3, merge_method=method, merge_kwargs={})
        want = negation_edits(method, vectors)
        assert res["coef"] == {"a": 1.0, "b": 1.0}
        edits = [(t, w) for t, w in seen if w is not None and t != "control"]
        for t, w in edits:
            assert torch.allclose(w.abs() / w.abs().max(), want[t]["w"].abs() / want[t]["w"].abs().max())


def test_per_task_table_rows() -> None:
    from talos.stages import per_task_table

    add = {"coef": 0.3, "per_task": {"a": {"absolute": 0.5, "normalized": 0.6}}}
    assert per_task_table("addition", add) == (["task", "absolute", "normalized", "coef"], [["a", 0.5, 0.6, 0.3]])
    tall = {"coef": {"a": 0.2}, "per_task": {"a": {"absolute": 0.5, "normalized": 0.6}}}
    assert per_task_table("addition", tall)[1] == [["a", 0.5, 0.6, 0.2]]
    neg = {"coef": {"a": 0.4}, "per_task": {"a": {"target": 0.1, "control": 0.9}}}
    assert per_task_table("negation", neg) == (["task", "target", "control", "coef"], [["a", 0.1, 0.9, 0.4]])
    with pytest.raises(ValueError, match="valid choices"):
        per_task_table("nope", {})


def test_official_addition_normalises_by_the_merges_own_single_task_edits() -> None:
    """The official merge scripts divide by ``*_ft_accuracies.json``: the accuracy of the merge's single-task edit
    at coefficient 1, not the fine-tuned accuracy passed in. 'Accuracy' is a readout of the edit's L1 norm."""
    from talos.protocols import task_addition
    from talos.merges import normalizer_edits
    from talos.task_vector import TaskVector

    vectors = {"a": TaskVector({"w": torch.tensor([3.0, -1.0, 0.5, 0.1])}),
               "b": TaskVector({"w": torch.tensor([0.2, 2.0, -0.1, 0.05])})}

    def evaluate(edit, task, split):
        return 0.1 if edit is None else min(1.0, 0.1 + float(edit["w"].abs().sum()) / 10)

    finetuned = {s: {"a": 0.9, "b": 0.8} for s in ("val", "test")}
    kw = {"variant": "official", "k": 0.5}
    res = task_addition(evaluate, vectors, finetuned, merge_method="ties", merge_kwargs=kw, n_points=3)
    norm = normalizer_edits("ties", vectors, **kw)
    want = {t: evaluate(norm[t], t, "test") for t in vectors}
    assert res["normalizer"] == "merge_single_task" and res["normalizer_accuracy"]["test"] == want
    assert want != finetuned["test"]
    for t, row in res["per_task"].items():
        assert row["normalized"] == pytest.approx(row["absolute"] / want[t])
    paper = task_addition(evaluate, vectors, finetuned, merge_method="ties", merge_kwargs={"k": 0.5}, n_points=3)
    assert paper["normalizer"] == "finetuned"
    for t, row in paper["per_task"].items():
        assert row["normalized"] == pytest.approx(row["absolute"] / finetuned["test"][t])
