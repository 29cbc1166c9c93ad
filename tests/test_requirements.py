"""requirements.txt lists what the code imports, with lower bounds that cover the APIs it calls."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: distribution name -> the module it provides, where they differ
MODULE = {"open_clip_torch": "open_clip", "pytest": "pytest"}
#: needed at run time by a library we call, without an import of ours
INDIRECT = {"sentencepiece": "transformers' T5 tokenizer (slow tokenizer and conversion)"}


def _requirements() -> dict[str, str | None]:
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.match(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9.]+))?", line)
            out[m.group(1)] = m.group(2)
    return out


def _sources() -> str:
    files = [p for d in ("talos", "vision", "nlp", "benchmarks", "tests") for p in (REPO / d).rglob("*.py")]
    return "\n".join(p.read_text() for p in files)


def test_every_requirement_is_imported():
    src = _sources()
    for dist in set(_requirements()) - set(INDIRECT):
        mod = MODULE.get(dist, dist.replace("-", "_"))
        assert re.search(rf"^\s*(from|import)\s+{re.escape(mod)}\b", src, re.M), f"{dist} is listed but never imported"


def test_torch_lower_bound_covers_rmsnorm():
    src = _sources()
    bound = tuple(int(x) for x in _requirements()["torch"].split("."))
    if "nn.RMSNorm" in src:
        assert bound >= (2, 4), "nn.RMSNorm needs torch >= 2.4"


def test_pyproject_matches_requirements():
    deps = (REPO / "pyproject.toml").read_text()
    for dist, bound in _requirements().items():
        if dist != "pytest":
            assert f'"{dist}{">=" + bound if bound else ""}"' in deps, dist


def test_constraints_pin_every_requirement():
    pins = {line.split("==")[0].lower().replace("_", "-") for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line}
    for dist in _requirements():
        assert dist.lower().replace("_", "-") in pins, f"constraints.txt does not pin {dist}"
