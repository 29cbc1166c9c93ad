"""The cost table's claims and its markdown: targets checked on a result of ``benchmarks/efficiency.py``, and the
tables (per backbone, calibration, targets, and the trade against a baseline run) that ``--out`` writes."""
from __future__ import annotations

#: the cost claims the table is checked against: (name, mode, reference, measure, op, limit)
TARGETS = [("talos step <= 1.05x standard", "talos", "standard", "step_s", "<=", 1.05),
           ("talos optimizer state <= 0.25x standard", "talos", "standard", "optimizer_state_mb", "<=", 0.25),
           ("talos peak memory <= 0.9x standard", "talos", "standard", "peak_mem_mb", "<=", 0.9),
           ("linear step >= 1.5x standard", "linear", "standard", "step_s", ">=", 1.5),
           ("talos step <= 0.7x linear", "talos", "linear", "step_s", "<=", 0.7)]
CAL_TARGETS = [("calibration <= 1.0x plain fwd+bwd per example", "per_example_s", "plain_per_example_s", "<=", 1.0),
               ("anchor >= 15x calibration per example", "anchor_per_example_s", "per_example_s", ">=", 15.0)]


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def check_targets(res: dict) -> list[dict]:
    """Every target per domain: its value and whether it passes (None: not measured)."""
    out = []
    for d in res["backbones"]:
        rows, cal = res[d], res["calibration"][d]
        values = [_ratio(rows.get(a, {}).get(k), rows.get(b, {}).get(k)) for _, a, b, k, *_ in TARGETS]
        values += [_ratio(cal[a], cal[b]) for _, a, b, *_ in CAL_TARGETS]
        out += [{"domain": d, "target": t, "value": v,
                 "pass": None if v is None else (v <= lim if op == "<=" else v >= lim)}
                for v, (t, *_, op, lim) in zip(values, TARGETS + CAL_TARGETS)]
    return out


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table under a ``###`` title (first column left-aligned, the others right-aligned)."""
    return ["", f"### {title}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1),
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(res: dict, baseline: dict | None = None, baseline_name: str = "") -> str:
    """The tables of one result (and its trade against ``baseline``, e.g. without activation checkpointing)."""
    s, cal = res["settings"], res["calibration"]
    lines = [f"## Efficiency: preset `{res['preset']}` on {res['device']}, {res['date']}", "",
             f"Median of {s['steps']} steps after {s['warmup']} warm-up, precision {s['precision']}, "
             f"{s['threads'] or 'default'} thread(s){', activation checkpointing' * s['grad_checkpointing']}; "
             f"wall time {res['wall_s']:.0f} s."]
    for d, name in res["backbones"].items():
        std = res[d].get("standard", {}).get("step_s")
        rows = [[m, f"= {r['trained_by']}" if "trained_by" in r else f"n/a ({r['unsupported']})"] + [""] * 6
                if "step_s" not in r else
                [m, f"{r['step_s'] * 1e3:.1f}", _f(_ratio(r["step_s"], std), ".2f"), f"{r['peak_mem_mb']:.0f}",
                 f"{r['train_mem_mb']:.0f}", f"{r['trainable']:,}", f"{r['frozen_tensors']} / {r['eligible_tensors']}",
                 f"{r['optimizer_state_mb']:.2f}"] for m, r in res[d].items()]
        lines += _table(f"{d} (`{name}`)", ["mode", "step (ms)", "x standard", "peak mem (MB)", "train mem (MB)",
                                            "trainable", "frozen tensors", "optimizer state (MB)"], rows)
    ms = lambda c, k: f"{c[k] * 1e3:.2f}"  # noqa: E731
    lines += _table("Calibration cost per example", [
        "domain", "TaLoS calibration (ms / example / round)", "plain fwd+bwd (ms / example)", "anchor (ms / example)",
        "calibration / plain", "anchor / calibration", "rounds x examples", "peak mem (MB)"],
        [[d, ms(c, "per_example_s"), ms(c, "plain_per_example_s"), ms(c, "anchor_per_example_s"),
          f"{c['per_example_s'] / c['plain_per_example_s']:.2f}x",
          f"{c['anchor_per_example_s'] / c['per_example_s']:.1f}x", f"{c['rounds']} x {c['examples']}",
          f"{c['peak_mem_mb']:.0f}"] for d, c in cal.items()])
    lines += _table("Targets", ["domain", "target", "value", "result"], [
        [t["domain"], t["target"], _f(t["value"], ".3f"), {None: "n/a", True: "PASS", False: "FAIL"}[t["pass"]]]
        for t in res["targets"]])
    if baseline is not None:  # e.g. activation checkpointing's trade: time and memory against a run without it
        pairs = [(d, m, r, baseline.get(d, {}).get(m, {})) for d in res["backbones"] for m, r in res[d].items()]
        lines += _table(f"Trade versus `{baseline_name}`", ["domain", "mode", "step (ms): baseline -> this", "time x",
                                                             "peak mem (MB): baseline -> this", "train mem x"],
                        [[d, m, f"{b['step_s'] * 1e3:.1f} -> {r['step_s'] * 1e3:.1f}",
                          f"{r['step_s'] / b['step_s']:.2f}",
                          f"{b['peak_mem_mb']:.0f} -> {r['peak_mem_mb']:.0f}",
                          _f(_ratio(r["train_mem_mb"], b["train_mem_mb"]), ".2f")]
                         for d, m, r, b in pairs if "step_s" in r and "step_s" in b])
    return "\n".join(lines) + "\n"
