"""Shared fixtures of the vision tests: generated image-folder datasets (one copy per test module)."""
from __future__ import annotations

import pytest

from vision.synthetic import make_synthetic_datasets


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic tasks (100 train / 30 test images each) in their on-disk layout."""
    loc = tmp_path_factory.mktemp("vision_data")
    make_synthetic_datasets(loc, n_train=100, n_test=30)
    return loc
