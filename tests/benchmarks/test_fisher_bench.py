"""benchmarks/fisher.py: the median-of-runs rows, and a bad --runs refused before anything is measured."""
from __future__ import annotations

import pytest

from benchmarks import fisher as fb


def test_median_rows_reports_the_median_run_with_every_runs_ratios():
    runs = [[{"model": "T5", "fast_over_plain": r, "anchor_over_fast": 10 + r}] for r in (1.8, 1.6, 1.7)]
    (row,) = fb.median_rows(runs)
    assert row["fast_over_plain"] == 1.7 and row["anchor_over_fast"] == 11.7  # the middle run's whole row
    assert row["runs"] == 3 and row["runs_fast_over_plain"] == [1.8, 1.6, 1.7]
    assert row["runs_anchor_over_fast"] == [11.8, 11.6, 11.7]


def test_runs_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        fb.main(["--runs", "0", "--batch-sizes", "--models", "T5", "--out", ""])
    assert "--runs must be at least 1" in capsys.readouterr().err
