"""The registry and the plugin loader: plugins register when imported, by name, and unknown names fail clearly."""
from __future__ import annotations

import sys

import pytest

from talos.registry import Registry, load_plugins, plugin_names

#: A registry the plugin written by the tests registers into (a plugin registers into any library registry).
THINGS: Registry[int] = Registry("thing")

PLUGIN = f"""
from {__name__} import THINGS
THINGS.register("answer")(42)
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module ``talos_test_plugin`` on sys.path that registers ``answer`` into :data:`THINGS` when imported."""
    (tmp_path / "talos_test_plugin.py").write_text(PLUGIN)
    (tmp_path / "talos_test_broken.py").write_text("import talos_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "talos_test_plugin"
    for name in ("talos_test_plugin", "talos_test_broken"):
        sys.modules.pop(name, None)
    THINGS._items.pop("answer", None)


def test_unknown_name_lists_the_valid_ones():
    reg: Registry[int] = Registry("colour")
    reg.register("red")(1)
    reg.register("blue")(2)
    with pytest.raises(ValueError, match="unknown colour 'green'; valid choices: blue, red"):
        reg.get("green")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("red")(3)


def test_plugin_names_parse_comma_lists():
    assert plugin_names(None) == [] and plugin_names("") == []
    assert plugin_names(" a.b , c,,a.b ") == ["a.b", "c"]  # blanks dropped, duplicates once, order kept
    assert plugin_names(["x", " ", "y"]) == ["x", "y"]


def test_loading_a_plugin_registers_its_entries_once(plugin):
    assert "answer" not in THINGS
    (module,) = load_plugins(plugin)
    assert module.__name__ == plugin and THINGS.get("answer") == 42
    load_plugins([plugin, plugin])  # idempotent: a module is imported once
    assert THINGS.names() == ["answer"]


def test_unknown_plugin_fails_with_its_name(plugin):
    with pytest.raises(ValueError, match=r"unknown plugin 'talos_nope': no module named 'talos_nope'"):
        load_plugins(f"{plugin},talos_nope")
    with pytest.raises(ValueError, match=r"unknown plugin 'vision\.nope'.*e\.g\. vision\.synthetic"):
        load_plugins(["vision.nope"])


def test_a_plugins_own_missing_dependency_is_not_hidden(plugin):
    """A plugin that exists but fails to import keeps its own error (not "unknown plugin")."""
    with pytest.raises(ModuleNotFoundError, match="talos_no_such_dependency"):
        load_plugins(["talos_test_broken"])
