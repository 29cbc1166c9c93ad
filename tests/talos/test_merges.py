"""Tests for talos.merges: every registered merge against hand-computed answers, plus the entry point's checks."""
from __future__ import annotations

import pytest
import torch

from talos.merges import MERGES, hparams_of, merge
from talos.task_vector import TaskVector

T = torch.tensor


def tv(**tensors: torch.Tensor) -> TaskVector:
    return TaskVector(tensors)


def assert_tv_equal(got: TaskVector, want: TaskVector) -> None:
    """Same keys (in order), dtypes, shapes and exact values."""
    assert list(got.keys()) == list(want.keys())
    for k in want.keys():
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), f"{k}: {got[k]} != {want[k]}"


def random_vectors(n_tasks: int = 3, dtype: torch.dtype = torch.float32) -> dict[str, TaskVector]:
    g = torch.Generator().manual_seed(0)
    return {
        f"task{i}": tv(
            w=torch.randn(4, 6, generator=g).to(dtype),
            b=torch.randn(6, generator=g).to(dtype),
            conv=torch.randn(2, 3, 2, 2, generator=g).to(dtype),
        )
        for i in range(n_tasks)
    }


# ---------------------------------------------------------------------------------------------- registry
def test_registered_names_and_hparams() -> None:
    assert MERGES.names() == ["breadcrumbs", "consensus", "dare", "sum", "tall_masks", "ties"]
    assert {m: hparams_of(m) for m in MERGES.names()} == {
        "sum": {},
        "ties": {"k": 0.1},
        "dare": {"p": 0.9, "seed": 0},
        "breadcrumbs": {"beta": 0.1, "gamma": 0.2},
        "tall_masks": {"lam": 0.2},
        "consensus": {"k": 2, "lam": 0.2},
    }


@pytest.mark.parametrize("name", MERGES.names())
def test_every_method_through_merge_keeps_inputs_and_shapes(name: str) -> None:
    vectors = random_vectors()
    before = {t: v.clone() for t, v in vectors.items()}
    out = merge(name, vectors)
    # inputs untouched, bit for bit
    for t, v in vectors.items():
        assert_tv_equal(v, before[t])
    edits = out if name == "tall_masks" else {"merged": out}
    if name == "tall_masks":
        assert isinstance(out, dict) and list(out) == list(vectors)
    else:
        assert isinstance(out, TaskVector)
    for e in edits.values():
        assert list(e.keys()) == ["w", "b", "conv"]
        for k in e.keys():
            assert e[k].shape == vectors["task0"][k].shape and e[k].dtype == torch.float32
        # results are fresh tensors, not views of the inputs
        for v in vectors.values():
            assert all(e[k].data_ptr() != v[k].data_ptr() for k in e.keys())


@pytest.mark.parametrize("name", MERGES.names())
@pytest.mark.parametrize("dtype,want", [(torch.float64, torch.float64), (torch.float16, None)])
def test_dtypes(name: str, dtype: torch.dtype, want: torch.dtype | None) -> None:
    out = merge(name, random_vectors(2, dtype))
    edits = out.values() if isinstance(out, dict) else [out]
    for e in edits:
        for t in e.vector.values():
            # float64 stays float64; 16-bit inputs are merged in float32 (sum keeps TaskVector's add rule)
            assert t.dtype == (want or (torch.float16 if name == "sum" else torch.float32))


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown merge method 'nope'.*ties"):
        merge("nope", random_vectors())


@pytest.mark.parametrize(
    "name,hparams,match",
    [
        ("sum", {"k": 0.1}, "unknown hyperparameter.*'k'.*'sum'.*accepted.*none"),
        ("ties", {"topk": 0.1}, "unknown hyperparameter.*'topk'.*accepted.*k=0.1"),
        ("tall_masks", {"lam": 0.2, "k": 2}, "unknown hyperparameter.*'k'.*lam=0.2"),
        ("ties", {"k": 0.0}, r"k must be in \(0, 1\]"),
        ("ties", {"k": 1.5}, r"k must be in \(0, 1\]"),
        ("ties", {"k": True}, "finite real"),
        ("ties", {"k": float("nan")}, "finite real"),
        ("dare", {"p": 1.0}, r"p must be in \[0, 1\)"),
        ("dare", {"p": -0.1}, r"p must be in \[0, 1\)"),
        ("dare", {"seed": 1.5}, "seed must be an integer"),
        ("breadcrumbs", {"beta": 1.0}, r"beta must be in \[0, 1\)"),
        ("breadcrumbs", {"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
        ("breadcrumbs", {"beta": 0.6, "gamma": 0.6}, "beta \\+ gamma must be <= 1"),
        ("tall_masks", {"lam": -0.5}, "lam must be >= 0"),
        ("consensus", {"k": 0}, "k must be >= 1"),
        ("consensus", {"k": 1.5}, "k must be an integer"),
        ("consensus", {"lam": float("inf")}, "finite real"),
    ],
)
def test_invalid_hyperparameters(name: str, hparams: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        merge(name, random_vectors(), **hparams)


@pytest.mark.parametrize("name", MERGES.names())
def test_bad_inputs(name: str) -> None:
    with pytest.raises(ValueError, match="no task vectors"):
        merge(name, {})
    with pytest.raises(ValueError, match="different keys"):
        merge(name, {"a": tv(w=T([1.0])), "b": tv(v=T([1.0]))})
    with pytest.raises(ValueError, match="shape"):
        merge(name, {"a": tv(w=T([1.0])), "b": tv(w=T([1.0, 2.0]))})


# ---------------------------------------------------------------------------------------------- sum
def test_sum() -> None:
    vectors = {"a": tv(w=T([1.0, -2.0]), b=T([0.5])), "b": tv(w=T([3.0, 2.0]), b=T([0.25]))}
    assert_tv_equal(merge("sum", vectors), tv(w=T([4.0, 0.0]), b=T([0.75])))


# ---------------------------------------------------------------------------------------------- TIES
def ties_vectors() -> dict[str, TaskVector]:
    # N = 10 entries per task (w: 6, b: 4); k = 0.3 keeps the top 3 magnitudes of each WHOLE vector.
    return {
        # top 3: 5, -4 (w) and 3 (b). Per tensor, w would keep only one entry: the threshold is global.
        "A": tv(w=T([[5.0, -4.0, 0.5], [1.0, 0.0, 0.0]]), b=T([3.0, 0.1, 0.0, 0.0])),
        # top 3: -7 (b), -6 and -2 (w)
        "B": tv(w=T([[-2.0, -6.0, 1.0], [0.0, 0.5, 0.0]]), b=T([-7.0, 0.0, 0.0, 0.2])),
        # top 3: 8 (w), 4 and 3.5 (b)
        "C": tv(w=T([[1.0, 0.0, 8.0], [0.0, 0.0, 0.0]]), b=T([4.0, 0.0, 0.0, 3.5])),
    }


def test_ties_hand_computed() -> None:
    # trimmed:      A: w [[5,-4,0],[0,0,0]]  b [3,0,0,0]
    #               B: w [[-2,-6,0],[0,0,0]] b [-7,0,0,0]
    #               C: w [[0,0,8],[0,0,0]]   b [4,0,0,3.5]
    # w[0,0]: sum 3 -> +, agreeing {5} -> 5 (B's -2 disagrees, C's 0 is not counted)
    # w[0,1]: sum -10 -> -, agreeing {-4,-6} -> -5
    # w[0,2]: only C survives trimming (A's 0.5 and B's 1 were trimmed) -> 8
    # b[0]:   3 - 7 + 4 = 0 -> tie, elected sign 0 -> 0
    # b[3]:   only C -> 3.5
    want = tv(w=T([[5.0, -5.0, 8.0], [0.0, 0.0, 0.0]]), b=T([0.0, 0.0, 0.0, 3.5]))
    assert_tv_equal(merge("ties", ties_vectors(), k=0.3), want)


def test_ties_no_trim_sign_election() -> None:
    # k = 1 keeps everything: per entry, mean of the values with the sign of the sum.
    vectors = {"a": tv(w=T([1.0, -3.0, 2.0, 0.0])), "b": tv(w=T([3.0, 1.0, -2.0, 0.0])),
               "c": tv(w=T([-1.0, 1.0, 4.0, 0.0]))}
    # sums: 3 (+) -> (1+3)/2 = 2; -1 (-) -> -3; 4 (+) -> (2+4)/2 = 3; 0 with no mass -> 0
    assert_tv_equal(merge("ties", vectors, k=1.0), tv(w=T([2.0, -3.0, 3.0, 0.0])))


def test_ties_threshold_ties_kept_and_at_least_one() -> None:
    # k = 0.25 of 4 entries keeps the 1 largest; entries tied with it at the threshold are kept too
    assert_tv_equal(merge("ties", {"a": tv(w=T([2.0, -2.0, 1.0, 2.0]))}, k=0.25), tv(w=T([2.0, -2.0, 0.0, 2.0])))
    # k·N < 1 still keeps the largest entry
    assert_tv_equal(merge("ties", {"a": tv(w=T([1.0, -3.0, 2.0]))}, k=0.1), tv(w=T([0.0, -3.0, 0.0])))


# ---------------------------------------------------------------------------------------------- DARE
def test_dare_p0_equals_sum() -> None:
    vectors = random_vectors()
    assert_tv_equal(merge("dare", vectors, p=0.0), merge("sum", vectors))


def test_dare_deterministic_and_seeded() -> None:
    vectors = random_vectors()
    a, b = merge("dare", vectors, seed=3), merge("dare", vectors, seed=3)
    assert_tv_equal(a, b)
    c = merge("dare", vectors, seed=4)
    assert any(not torch.equal(a[k], c[k]) for k in a.keys())
    # a task's mask depends on (seed, task name) only, not on the order of the tasks
    reordered = {t: vectors[t] for t in reversed(list(vectors))}
    d = merge("dare", reordered, seed=3)
    for k in a.keys():
        torch.testing.assert_close(d[k], a[k], rtol=1e-6, atol=1e-6)


def test_dare_single_task_survivors_rescaled() -> None:
    x = torch.linspace(1.0, 2.0, 1000)
    out = merge("dare", {"a": tv(w=x)}, p=0.75, seed=0)["w"]
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * (1.0 / 0.25))
    assert 0.2 < kept.float().mean().item() < 0.3


def test_dare_preserves_expectation() -> None:
    # each entry of each task: 10 with prob 0.1, else 0 -> mean 1, variance 9; over 3 tasks × 1e5 entries
    # the mean of the merge is 3 ± 0.0055 (1 sigma).
    n = 100_000
    vectors = {t: tv(w=torch.ones(n)) for t in ("a", "b", "c")}
    out = merge("dare", vectors, p=0.9, seed=0)["w"]
    assert abs(out.mean().item() - 3.0) < 0.03
    assert set(out.unique().tolist()) <= {0.0, 10.0, 20.0, 30.0}
    # each task keeps about 10% of its entries
    single = merge("dare", {"a": vectors["a"]}, p=0.9, seed=0)["w"]
    assert abs((single != 0).float().mean().item() - 0.1) < 0.005


# ---------------------------------------------------------------------------------------------- Breadcrumbs
def test_breadcrumbs_rows_hand_computed() -> None:
    # rows of 10: beta 0.1 drops the largest entry, gamma 0.2 keeps the next two
    a = tv(
        # row 0 by |x|: -9 (drop), 7, 6 (keep); row 1: 1.0 (drop), 0.9, 0.8 (keep)
        w=T([[1.0, -9.0, 3.0, 0.5, 7.0, -2.0, 0.0, 4.0, -5.0, 6.0],
             [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]),
        # 1-D: one row; |x|: 10 (drop), -8, 7 (keep)
        b=T([10.0, -8.0, 7.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]),
    )
    b = tv(
        # row 0 ranks: 5 (drop), 4, -3 (keep); row 1: all equal -> stable by position: idx 0 dropped, 1-2 kept
        w=T([[5.0, 4.0, -3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
             [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]),
        b=T([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    )
    want = tv(
        w=T([[0.0, 4.0, -3.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 6.0],
             [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.9, 0.0]]),
        b=T([0.0, -8.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    )
    assert_tv_equal(merge("breadcrumbs", {"a": a, "b": b}), want)


def test_breadcrumbs_beta0_and_nd_rows() -> None:
    # beta = 0: keep the top gamma fraction per row; a (2, 2, 2) tensor has rows of 4 = dims 1-2 flattened
    x = T([[[1.0, -4.0], [3.0, 2.0]], [[0.5, 0.25], [-8.0, 0.0]]])
    want = T([[[0.0, -4.0], [3.0, 0.0]], [[0.5, 0.0], [-8.0, 0.0]]])
    assert_tv_equal(merge("breadcrumbs", {"a": tv(c=x)}, beta=0.0, gamma=0.5), tv(c=want))
    # 0.25 + 0.5 of 4: drop 1, keep 2
    want = T([[[0.0, 0.0], [3.0, 2.0]], [[0.5, 0.25], [0.0, 0.0]]])
    assert_tv_equal(merge("breadcrumbs", {"a": tv(c=x)}, beta=0.25, gamma=0.5), tv(c=want))


def test_breadcrumbs_counts_survive_float_rounding() -> None:
    # 0.7 + 0.1 == 0.7999999999999999 in floats; of 10 entries it must still keep rank 7 (0-based) only
    x = T([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    want = T([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0])
    assert_tv_equal(merge("breadcrumbs", {"a": tv(b=x)}, beta=0.7, gamma=0.1), tv(b=want))


# ---------------------------------------------------------------------------------------------- TALL-masks / consensus
def tall_vectors() -> dict[str, TaskVector]:
    return {
        "t1": tv(w=T([4.0, 0.0, 1.0, -2.0, 1.0])),
        "t2": tv(w=T([1.0, 2.0, 1.0, 2.0, 0.0])),
        "t3": tv(w=T([-1.0, 2.0, 1.0, 1.0, 0.0])),
    }
# τ_MTL = [4, 4, 3, 1, 1]. With lam = 0.5, m_t = |τ_t| >= 0.5 |τ_MTL - τ_t|:
#   t1: |τ| [4,0,1,2,1] vs 0.5|[0,4,2,3,0]| = [0,2,1,1.5,0]     -> [1,0,1,1,1]  (entry 2: equality counts)
#   t2: |τ| [1,2,1,2,0] vs 0.5|[3,2,2,-1,1]| = [1.5,1,1,.5,.5]  -> [0,1,1,1,0]
#   t3: |τ| [1,2,1,1,0] vs 0.5|[5,2,2,0,1]| = [2.5,1,1,0,.5]    -> [0,1,1,1,0]
# votes = [1, 2, 3, 3, 1]


def test_tall_masks_hand_computed() -> None:
    out = merge("tall_masks", tall_vectors(), lam=0.5)
    assert isinstance(out, dict) and list(out) == ["t1", "t2", "t3"]
    assert_tv_equal(out["t1"], tv(w=T([4.0, 0.0, 3.0, 1.0, 1.0])))
    assert_tv_equal(out["t2"], tv(w=T([0.0, 4.0, 3.0, 1.0, 0.0])))
    assert_tv_equal(out["t3"], tv(w=T([0.0, 4.0, 3.0, 1.0, 0.0])))


def test_tall_masks_lam0_every_edit_is_mtl() -> None:
    vectors = tall_vectors()
    for e in merge("tall_masks", vectors, lam=0.0).values():
        assert_tv_equal(e, tv(w=T([4.0, 4.0, 3.0, 1.0, 1.0])))


def test_consensus_hand_computed() -> None:
    vectors = tall_vectors()
    assert_tv_equal(merge("consensus", vectors, k=2, lam=0.5), tv(w=T([0.0, 4.0, 3.0, 1.0, 0.0])))
    assert_tv_equal(merge("consensus", vectors, k=3, lam=0.5), tv(w=T([0.0, 0.0, 3.0, 1.0, 0.0])))
    # k = 1: every entry here is selected by some mask -> τ_MTL
    assert_tv_equal(merge("consensus", vectors, k=1, lam=0.5), tv(w=T([4.0, 4.0, 3.0, 1.0, 1.0])))


def test_consensus_all_masks_on_equals_sum() -> None:
    vectors = random_vectors()
    for k in (1, 2, 3):
        assert_tv_equal(merge("consensus", vectors, k=k, lam=0.0), merge("sum", vectors))


def test_consensus_k_above_task_count_warns_and_is_zero() -> None:
    with pytest.warns(UserWarning, match="exceeds the number of tasks"):
        out = merge("consensus", tall_vectors(), k=4)
    assert out.nnz() == 0


# ---------------------------------------------------------------------------------------------- negation
def test_negation_edits_of_every_method() -> None:
    from talos.merges import negation_edits

    vectors = tall_vectors()
    for name in MERGES.names():
        edits = negation_edits(name, vectors)
        assert list(edits) == list(vectors)
        for t, v in vectors.items():
            if name == "tall_masks":
                want = merge("tall_masks", vectors)[t]  # the task's own edit
            elif name == "consensus":
                continue  # hand-computed below
            else:
                want = merge(name, {t: v})  # the method applied to the task's vector alone
            assert_tv_equal(edits[t], want)
    assert_tv_equal(negation_edits("sum", vectors)["t1"], vectors["t1"])
    # TIES on one vector keeps its top-k entries: k = 0.4 of 5 -> the two largest |τ| of t1
    assert_tv_equal(negation_edits("ties", vectors, k=0.4)["t1"], tv(w=T([4.0, 0.0, 0.0, -2.0, 0.0])))


def test_negation_edits_consensus_hand_computed() -> None:
    from talos.merges import negation_edits

    # consensus k=2, lam=0.5 selects entries 1, 2, 3 (see test_consensus_hand_computed); each task keeps its own τ there
    edits = negation_edits("consensus", tall_vectors(), k=2, lam=0.5)
    assert_tv_equal(edits["t1"], tv(w=T([0.0, 0.0, 1.0, -2.0, 0.0])))
    assert_tv_equal(edits["t2"], tv(w=T([0.0, 2.0, 1.0, 2.0, 0.0])))
    assert_tv_equal(edits["t3"], tv(w=T([0.0, 2.0, 1.0, 1.0, 0.0])))


def test_negation_edits_checks_like_merge() -> None:
    from talos.merges import negation_edits

    with pytest.raises(ValueError, match="valid choices"):
        negation_edits("nope", tall_vectors())
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        negation_edits("consensus", tall_vectors(), p=0.5)
    with pytest.raises(ValueError):
        negation_edits("ties", tall_vectors(), k=2.0)
