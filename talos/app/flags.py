"""Command-line flags from typed settings, and the parsed :class:`Config` every script works from.

A domain declares a :class:`Domain` (its model, data and training settings classes, flag defaults that differ
from the declared ones, and its checks); :func:`parse` builds the one parser of the domain's scripts from those
classes plus the shared groups of :mod:`talos.app.settings`, parses, validates (before any model or data
loads) and returns a frozen :class:`Config`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..config import Settings, specs_of
from ..registry import PLUGINS_ENV, load_plugins
from .settings import (EvaluationSettings, FigureSettings, RunSettings, StepSettings, merge_field, merge_group,
                       method_group)

__all__ = ["csv_list", "Domain", "Config", "build_parser", "config_from_namespace", "check_config", "parse"]

#: group key -> the title of its flags in --help, in --help order.
TITLES = {"model": "model", "data": "data", "method": "method", "training": "optimisation",
          "evaluation": "evaluation", "merge": "merge hyperparameters (used by the chosen --merge only)",
          "run": "runs", "figures": "figures (fine-tuning)"}


def csv_list(s: str) -> list[str]:
    """``"a,b,,c"`` -> ``["a", "b", "c"]`` (argparse ``type=``)."""
    return [x for x in s.split(",") if x]


@dataclass
class Domain:
    """What a domain's ``args.py`` declares; ``validate(cfg, need_train_dataset)`` checks and fills presets
    (raising ValueError) and ``check_task(name)`` raises on an unknown task."""

    name: str
    description: str
    model: type[Settings]
    data: type[Settings]
    training: type[StepSettings]
    validate: Callable[["Config", bool], None]
    check_task: Callable[[str], Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)  # flag defaults by field name
    extra: Mapping[str, type[Settings]] = field(default_factory=dict)  # a command's own groups (analyze.py)
    suites: Mapping[str, Sequence[str]] = field(default_factory=dict)  # named task lists the sweeps run

    def parser(self, description: str | None = None) -> argparse.ArgumentParser:
        """The single parser of this domain's scripts (see :func:`build_parser`)."""
        return build_parser(dataclasses.replace(self, description=description or self.description))

    def parse(self, argv: Sequence[str] | None = None, *, need_train_dataset: bool = False,
              description: str | None = None) -> "Config":
        """Parse and validate this domain's flags (see :func:`parse`)."""
        return parse(self, argv, need_train_dataset=need_train_dataset, description=description)

    def suite(self, name: str) -> list[str]:
        """The tasks of suite ``name``; an unknown name raises with the valid ones."""
        if str(name) not in self.suites:
            raise ValueError(f"unknown suite {name!r}; valid: {', '.join(self.suites)}")
        return list(self.suites[str(name)])

    def groups(self) -> dict[str, type[Settings]]:
        """Group key -> settings class, the mode and merge groups built from the registries now."""
        return {"model": self.model, "data": self.data, "method": method_group(), "training": self.training,
                "evaluation": EvaluationSettings, "merge": merge_group(), "run": RunSettings,
                "figures": FigureSettings, **self.extra}


class Config:
    """A run's settings: typed groups (``cfg.group("training")`` ...), each field also readable by its name
    (``cfg.lr`` is ``cfg.group("training").lr``). Frozen once validated; :meth:`replace` gives a changed copy."""

    def __init__(self, domain: Domain, groups: Mapping[str, Settings], argv: Sequence[str] = ()) -> None:
        index: dict[str, str] = {}
        for key, g in groups.items():
            for f in dataclasses.fields(g):
                if f.name in index:
                    raise TypeError(f"setting {f.name!r} is declared by both the {index[f.name]} and {key} groups")
                index[f.name] = key
        object.__setattr__(self, "_state", {"domain": domain, "groups": dict(groups), "index": index,
                                            "argv": list(argv), "frozen": False})

    # -- access ---------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        st = object.__getattribute__(self, "_state")
        if name in st["index"]:  # a field first: ``cfg.model`` is the model name, cfg.group("model") its group
            return getattr(st["groups"][st["index"][name]], name)
        if name in st["groups"]:
            return st["groups"][name]
        raise AttributeError(f"no setting {name!r} (groups: {', '.join(st['groups'])})")

    def __setattr__(self, name: str, value: Any) -> None:
        st = self._state
        if st["frozen"]:
            raise dataclasses.FrozenInstanceError(f"Config is frozen; use cfg.replace({name}=...)")
        if name not in st["index"]:
            raise AttributeError(f"no setting {name!r}")
        setattr(st["groups"][st["index"][name]], name, value)

    def __iter__(self) -> Iterator[tuple[str, Settings]]:
        return iter(self._state["groups"].items())

    def group(self, key: str) -> Settings:
        """The settings group ``key`` (model, data, method, training, evaluation, merge, run, figures)."""
        return self._state["groups"][key]

    @property
    def domain(self) -> Domain:
        return self._state["domain"]

    @property
    def argv(self) -> list[str]:
        """The command line the script ran with (complete commands in error messages)."""
        return list(self._state["argv"])

    def freeze(self) -> "Config":
        self._state["frozen"] = True
        return self

    def replace(self, **changes: Any) -> "Config":
        """A frozen copy with fields changed by name (``cfg.replace(finetuning_mode="standard")``)."""
        groups = {k: copy.deepcopy(g) for k, g in self._state["groups"].items()}
        out = Config(self.domain, groups, self.argv)
        for k, v in changes.items():
            setattr(out, k, v)
        return out.freeze()

    # -- the chosen mode and merge ----------------------------------------------------------------------------
    def mode_settings(self, mode: str | None = None) -> Settings:
        """The settings object of ``mode`` (default ``--finetuning-mode``), built from the method flags."""
        from ..modes import MODES

        return MODES.get(mode or self.finetuning_mode).settings.from_values(self.group("method").to_dict())

    def merge_hparams(self, method: str | None = None) -> dict[str, Any]:
        """The keyword arguments of :func:`talos.merges.merge` for ``method`` (default ``--merge``):
        ``variant`` (except for ``sum``) and the hyperparameters that variant takes."""
        from ..merges import MERGES, hparams_of

        method = method or self.merge
        MERGES.get(method)  # unknown names raise with the valid list
        kw = {hp: getattr(self.group("merge"), merge_field(method, hp))
              for hp in hparams_of(method, self.merge_variant)}
        return kw if method == "sum" else {"variant": self.merge_variant, **kw}

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings, by group, for ``config.json``: the method group holds only the chosen mode's
        settings and the merge group only the chosen merge's hyperparameters."""
        out = {k: g.to_dict() for k, g in self if k not in ("method", "merge")}
        out["method"] = {"finetuning_mode": self.finetuning_mode, **self.mode_settings().to_dict()}
        out["merge"] = {"merge": self.merge, **self.merge_hparams()}
        return out


# ----------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------
def build_parser(domain: Domain) -> argparse.ArgumentParser:
    """The single parser of ``domain``'s scripts: one flag per field of every group."""
    p = argparse.ArgumentParser(description=domain.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, cls in domain.groups().items():
        g = p.add_argument_group(TITLES.get(key, key))
        for s in specs_of(cls):
            if not s.derived:
                _add_flag(g, s, domain.defaults.get(s.name, s.default))
    return p


def _csv_of(item: type) -> Callable[[str], list]:
    def parse(s: str) -> list:
        return [item(x) for x in csv_list(s)]

    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


def _add_flag(g: argparse._ArgumentGroup, s: Any, default: Any) -> None:
    name = s.flag or "--" + s.name.replace("_", "-")
    positional = not name.startswith("-")
    kw: dict[str, Any] = {"help": s.help or " "} if positional else {"dest": s.name, "default": default,
                                                                      "help": s.help or " "}
    if s.kind is bool:
        kw["action"] = argparse.BooleanOptionalAction if s.default else "store_true"
    else:
        kw["type"] = (csv_list if s.csv is True else _csv_of(s.csv)) if s.csv else s.kind
        if s.choices is not None:
            kw["choices"] = list(s.choices)
    g.add_argument(name, **kw)


def config_from_namespace(domain: Domain, ns: argparse.Namespace, argv: Sequence[str]) -> Config:
    """The unvalidated :class:`Config` of a namespace parsed by :func:`build_parser` (extra keys are ignored)."""
    groups = {}
    for key, cls in domain.groups().items():
        values = {s.name: getattr(ns, s.name) for s in specs_of(cls) if not s.derived}
        groups[key] = cls(**values)
    return Config(domain, groups, argv)


def check_config(cfg: Config, *, need_train_dataset: bool = False) -> None:
    """Every check before anything loads (ValueError): declared ranges and choices, the mode's and the domain's
    own checks and presets, the save folder, the merge hyperparameters; then the device is resolved."""
    from .checks import check_merge_flags, check_save_folder, resolve_device, validate_common

    validate_common(cfg, need_train_dataset=need_train_dataset)
    cfg.domain.validate(cfg, need_train_dataset)
    check_save_folder(cfg.save)
    check_merge_flags(cfg)
    resolve_device(cfg)


def parse(domain: Domain, argv: Sequence[str] | None = None, *, need_train_dataset: bool = False,
          description: str | None = None) -> Config:
    """Parse, validate (ValueError -> argparse-style exit with code 2 and the message, before any model or
    data loads), print the device line, and return the frozen :class:`Config`."""
    from .checks import describe_device

    parser = build_parser(dataclasses.replace(domain, description=description or domain.description))
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = config_from_namespace(domain, parser.parse_args(argv), argv)
    try:
        load_plugins(cfg.plugins if cfg.plugins is not None else os.environ.get(PLUGINS_ENV))  # before the checks
        check_config(cfg, need_train_dataset=need_train_dataset)
    except ValueError as e:
        parser.error(str(e))
    print(describe_device(cfg), flush=True)
    return cfg.freeze()


def config_for_tests(domain: Domain, argv: Sequence[str] = ()) -> Config:
    """Parsed flags without validation (unit tests of the hash and of settings)."""
    return config_from_namespace(domain, build_parser(domain).parse_args(list(argv)), argv)
