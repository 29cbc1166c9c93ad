"""Generated datasets are plugins: the library's registries hold the paper's datasets only until one is loaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Run in a fresh interpreter (this test process has loaded the plugins already): what the library registers on
#: its own, then what ``--plugins`` adds, then the error of an unknown plugin.
PROBE = """
import json, sys
import vision.args, vision.datasets as D, nlp.args, nlp.datasets as N
from vision.args import build_parser, parse_args
out = {"vision": D.DATASETS.names(), "nlp": N.TASKS.names(), "presets": D.epoch_presets(),
       "help": build_parser().format_help(),
       "modules": sorted(m for m in sys.modules if m.startswith(("vision", "nlp")))}
argv = ["--model", "talos-tiny-vit", "--pretrained", "none", "--train-dataset", "SynthShapes", "--device", "cpu"]
try:
    parse_args(argv, need_train_dataset=True)
except SystemExit as e:
    out["without"] = e.code
args = parse_args(argv + ["--plugins", "vision.synthetic,vision.demo.tasks"], need_train_dataset=True)
out["epochs"], out["loaded"] = args.epochs, D.DATASETS.names()
try:
    parse_args(argv + ["--plugins", "vision.synthetic,vision.nope"], need_train_dataset=True)
except SystemExit as e:
    out["unknown"] = e.code
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TALOS_PLUGINS", None)
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_library_registries_hold_no_generated_datasets(probe):
    out, _ = probe
    generated = ("Synth", "Toy")
    assert not [n for n in out["vision"] if n.startswith(generated)]
    assert not [n for n in out["nlp"] if n.startswith("synth_")]
    assert "Cars" in out["vision"] and "qasc" in out["nlp"]
    assert not [n for n in out["presets"] if n.startswith(generated)] and out["presets"]["Cars"] == 35
    assert "SynthShapes" not in out["help"] and "'Cars': 35" in out["help"]  # --epochs lists the presets
    assert not [m for m in out["modules"] if m.startswith(("vision.demo", "vision.synthetic", "nlp.synthetic"))]


def test_plugins_flag_registers_datasets_and_their_presets(probe):
    out, stderr = probe
    assert out["without"] == 2  # SynthShapes is unknown without its plugin
    assert {"SynthShapes", "SynthControl", "ToyShape", "ToyPaint"} <= set(out["loaded"])
    assert out["epochs"] == 2  # the synthetic plugin's preset


def test_unknown_plugin_is_a_clear_usage_error(probe):
    out, stderr = probe
    assert out["unknown"] == 2 and "unknown plugin 'vision.nope': no module named 'vision.nope'" in stderr
