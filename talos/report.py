"""The shared results.json schema (vision, nlp, demo) and its markdown rendering.

Schema::
    {"single_task": {mode: {task: acc}},
     "addition": {mode: {"absolute", "normalized", "coef"}},
     "negation": {mode: {"target", "control", "coef"}},
     "merges": {merge_key: {"absolute", "normalized", "coef"}},
     "negation_merges": {merge_key: {"target", "control", "coef"}},
     "task_vector_density": {mode: {task: fraction of nonzero entries over the fine-tuned tensors}}}

Every mode x merge result has its row: ``addition`` / ``negation`` hold each mode's own (``sum``) row; the merge
sections hold every other merge of every mode, keyed ``merge`` for the standard task vectors and
``"merge (mode)"`` for another mode's (``"ties (talos)"``), plus ``sum`` of the standard (and imported) vectors
as the baseline row of the merge tables.

Evaluation scripts given ``--results-json PATH`` merge their section into that file (atomically).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .io import ArtifactError, atomic_write_json, locked_dir, read_json, remove_stale_temps

SECTIONS = ("single_task", "addition", "negation", "merges", "negation_merges", "task_vector_density")


def update_results(path: str | os.PathLike, section: str, key: str, value: Any) -> dict[str, Any]:
    """Set ``results[section][key] = value`` in the JSON file at ``path`` (created if missing)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown results section {section!r}; valid: {', '.join(SECTIONS)}")
    p = Path(path)
    with locked_dir(p.parent):  # concurrent scripts: no update is lost
        remove_stale_temps(p.parent, p.name)  # a writer killed mid-write (we hold the lock: none is running)
        try:
            results = read_json(p) if p.exists() else {}
        except ArtifactError as e:
            raise ArtifactError(p, e.problem, "restore it, or delete it and rerun the evaluation "
                                "scripts with --results-json: they re-add their rows from their own results "
                                "folders without recomputing") from None
        for s in SECTIONS:
            results.setdefault(s, {})
        results[section][key] = value
        atomic_write_json(p, results)
    return results


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) else "-"


def to_markdown(results: Mapping[str, Any]) -> str:
    """Readable tables of a results dict."""
    lines: list[str] = []
    st = results.get("single_task", {})
    if st:
        tasks = sorted({t for v in st.values() for t in v})
        lines += ["## Single-task accuracy (%)", "", "| mode | " + " | ".join(tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        for mode, accs in st.items():
            lines.append(f"| {mode} | " + " | ".join(_pct(accs.get(t)) for t in tasks) + " |")
        lines.append("")
    for section, title, cols in (("addition", "Task addition", ("absolute", "normalized", "coef")),
                                 ("merges", "Merges (addition; standard task vectors unless the row names a mode)",
                                  ("absolute", "normalized", "coef")),
                                 ("negation", "Task negation", ("target", "control", "coef")),
                                 ("negation_merges", "Merges (negation; standard task vectors unless the row names a "
                                  "mode)", ("target", "control", "coef"))):
        rows = results.get(section, {})
        if not rows:
            continue
        lines += [f"## {title}", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for name, r in rows.items():
            cells = []
            for c in cols:
                v = r.get(c)
                if c == "coef":
                    cells.append(f"{v:.2f}" if isinstance(v, (int, float)) else
                                 ("mean " + f"{sum(v.values()) / len(v):.2f}" if isinstance(v, dict) and v else "-"))
                else:
                    cells.append(_pct(v))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    dens = results.get("task_vector_density", {})
    if dens:
        lines += ["## Task-vector density (fraction of nonzero entries)", "", "| mode | task | density |",
                  "|---|---|---:|"]
        for mode, per in dens.items():
            for t, d in per.items():
                lines.append(f"| {mode} | {t} | {d:.4f} |")
        lines.append("")
    return "\n".join(lines)
