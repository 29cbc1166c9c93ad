"""results.json keeps every mode x merge result (talos.stages.export_results) and the report renders it."""
from __future__ import annotations

import json

from talos.stages import export_results
from talos.report import to_markdown

ADD = {"absolute": 0.5, "normalized": 0.625, "coef": 0.3}
NEG = {"target": 0.25, "control": 0.75, "coef": {"A": 0.4, "B": 0.6}}


def test_a_merge_of_a_non_standard_mode_is_kept_and_rendered(tmp_path):
    path = tmp_path / "results.json"
    export_results(str(path), "addition", "talos", {**ADD, "per_task": {}}, merge="ties")
    export_results(str(path), "negation", "talos", NEG, merge="ties")
    res = json.loads(path.read_text())
    assert res["merges"] == {"ties (talos)": ADD} and res["negation_merges"] == {"ties (talos)": NEG}
    assert res["addition"] == {} and res["negation"] == {}  # the talos rows of the tables are its sum merge
    md = to_markdown(res)
    assert "| ties (talos) | 50.0 | 62.5 | 0.30 |" in md and "| ties (talos) | 25.0 | 75.0 | mean 0.50 |" in md


def test_sum_rows(tmp_path):
    path = tmp_path / "results.json"
    export_results(str(path), "addition", "talos", ADD)  # a mode's own row: the addition table only
    export_results(str(path), "addition", "standard", ADD)  # the standard one also heads the merge table
    export_results(str(path), "addition", "standard", {**ADD, "coef": 0.4}, merge="dare")
    res = json.loads(path.read_text())
    assert res["addition"] == {"talos": ADD, "standard": ADD}
    assert res["merges"] == {"sum": ADD, "dare": {**ADD, "coef": 0.4}}
