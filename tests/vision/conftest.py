"""Shared fixtures of the vision tests: generated image-folder datasets (one copy per test module)."""
from __future__ import annotations

import pytest

from talos.registry import load_plugins


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic tasks (100 train / 30 test images each) in their on-disk layout, their plugin loaded (the
    library's registry has no SynthShapes: ``vision.synthetic`` registers it, as ``--plugins`` does)."""
    (synthetic,) = load_plugins(["vision.synthetic"])
    loc = tmp_path_factory.mktemp("vision_data")
    synthetic.make_synthetic_datasets(loc, n_train=100, n_test=30)
    return loc
