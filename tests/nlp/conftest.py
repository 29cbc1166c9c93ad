"""Shared fixtures of the NLP tests: generated tasks, their offline tokenizer, tiny T5 and GPT-2 models."""
from __future__ import annotations

import pytest
import torch

from nlp.datasets import clear_cache


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """Generated synthetic tasks (small) and the word-level tokenizer trained on them: (data dir, tokenizer dir).
    Loads their plugin (``nlp.synthetic`` registers the ``synth_*`` tasks, as ``--plugins`` does)."""
    from talos.registry import load_plugins

    (synthetic,) = load_plugins(["nlp.synthetic"])
    loc = tmp_path_factory.mktemp("nlp_data")
    synthetic.make_synthetic_tasks(loc, n_train=48, n_heldout=40)
    synthetic.build_tokenizer(synthetic.corpus(loc), loc / "tokenizer")
    return loc, loc / "tokenizer"


@pytest.fixture(scope="session")
def tok(synth):
    from nlp.models import load_tokenizer

    return load_tokenizer(str(synth[1]))


def tiny(name: str, tok, attn: str = "eager"):
    """A tiny random-init model (same θ0 every call) and its kind."""
    from nlp.models import load_model

    return load_model(name, tok, attn_implementation=attn)


@pytest.fixture(autouse=True)
def _fresh_rows():
    clear_cache()  # readers cache rows per process; tests monkeypatch the loaders
    yield
    clear_cache()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
