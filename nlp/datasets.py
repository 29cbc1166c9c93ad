"""NLP tasks: one registry of readers that find, split and prompt each task's data (paper-notes §2).

Tasks (CLI names) and where their rows come from, tried in order:

* local files ``<--data-location>/<task>/<hf split>.{jsonl,json,parquet,csv}`` (offline copies, synthetic tasks);
* the Hugging Face hub through ``datasets.load_dataset``, script-free repos only: the repo's main revision
  first, then the hub's automatic parquet export (branch ``refs/convert/parquet``, files
  ``<config>/<split>/*.parquet``) for when the main revision cannot be loaded (e.g. an old loading script).

============  ======================================  ====================================================
task          hub source (config)                     our splits (train / val / test)
============  ======================================  ====================================================
qasc          allenai/qasc                            train / first 32 of shuffled validation / the rest
wiki_qa       microsoft/wiki_qa                       train / validation / test
quartz        allenai/quartz                          train / validation / test
paws          google-research-datasets/paws           train / validation / test
              (labeled_final)
story_cloze   --storycloze-dir (manual download)      validation / first 32 of shuffled test / the rest
winogrande    allenai/winogrande (winogrande_xl)      train / first 32 of shuffled validation / the rest
wsc           aps/super_glue (wsc.fixed)              train / first 32 of shuffled validation / the rest
rte           aps/super_glue (rte), negation control  train / first 32 of shuffled validation / the rest
============  ======================================  ====================================================

"Shuffled" is Python's ``random.Random(42).shuffle`` of the split in its hub order, exactly the official
reader's ``random.seed(42); random.shuffle(rows)``. Each row is prompted with its task's template 0
(:mod:`nlp.templates`) and becomes an :class:`nlp.scoring.Example`.

A task that cannot be loaded raises :class:`TaskDataError` naming every place that was tried and how to fetch
the data. Scripts call :func:`check_tasks` before loading any model, so that happens first.

Generated tasks register from outside as plugins (``--plugins nlp.synthetic`` adds the smoke tasks
``synth_*``); this registry holds the paper's tasks only.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from talos.registry import Registry

from .scoring import Example
from .templates import get_template

logger = logging.getLogger("talos")

__all__ = [
    "TASKS", "TaskSpec", "HubSource", "TaskDataError", "SPLITS", "VAL_SIZE", "SPLIT_SEED", "register_task",
    "get_examples", "get_rows", "check_tasks", "clear_cache", "split_val_test",
]

SPLITS = ("train", "val", "test")
VAL_SIZE = 32  # examples of the shuffled held-out split used as "validation"
SPLIT_SEED = 42
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
PARQUET_EXPORT = "refs%2Fconvert%2Fparquet"  # the hub's parquet-export branch, URL-quoted for hf:// paths

# split rule -> our split -> (hub split, part); part "all", "val" (first VAL_SIZE of shuffled) or "test" (rest)
SPLIT_RULES: dict[str, dict[str, tuple[str, str]]] = {
    "own": {"train": ("train", "all"), "val": ("validation", "all"), "test": ("test", "all")},
    "val32": {"train": ("train", "all"), "val": ("validation", "val"), "test": ("validation", "test")},
    "storycloze": {"train": ("validation", "all"), "val": ("test", "val"), "test": ("test", "test")},
}


class TaskDataError(FileNotFoundError):
    """A task's rows could not be loaded: the message names every place tried and how to get the data."""


@dataclass(frozen=True)
class HubSource:
    """A script-free hub dataset: the repo itself, or (``parquet_export``) its automatic parquet export."""

    repo: str
    config: str | None = None
    parquet_export: bool = False

    def describe(self, split: str) -> str:
        if self.parquet_export:
            return f"hf://datasets/{self.repo}@refs/convert/parquet/{self.config or 'default'}/{split}/*.parquet"
        return f"load_dataset({self.repo!r}{', ' + repr(self.config) if self.config else ''}, split={split!r})"


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task: its template, label, split rule and data sources."""

    name: str
    template: str  # key of nlp.templates.TEMPLATES
    label: Callable[[Mapping[str, Any]], int]  # row -> index of the correct answer choice
    split_rule: str  # key of SPLIT_RULES
    hub: tuple[HubSource, ...] = ()
    storycloze: bool = False  # rows come from --storycloze-dir
    prepare_hint: str = ""  # command that generates the data (local files only; "{data_location}" filled in)
    fetch: str = ""  # extra hint printed when the data cannot be found
    int_fields: tuple[str, ...] = ()  # integer fields (CSV copies read them as strings)

    def hub_splits(self, splits: Iterable[str] = SPLITS) -> list[str]:
        """The hub splits behind our ``splits``."""
        return list(dict.fromkeys(SPLIT_RULES[self.split_rule][s][0] for s in splits))


TASKS: Registry[TaskSpec] = Registry("nlp task")


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to the registry (names are unique); its template and split rule must exist."""
    get_template(spec.template)
    if spec.split_rule not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {spec.split_rule!r}; valid: {', '.join(SPLIT_RULES)}")
    return TASKS.register(spec.name)(spec)


def _answer_key_label(row: Mapping[str, Any]) -> int:
    return list(row["choices"]["label"]).index(row["answerKey"])


def _both(repo: str, config: str | None = None) -> tuple[HubSource, ...]:
    return (HubSource(repo, config), HubSource(repo, config, parquet_export=True))


register_task(TaskSpec("qasc", "qasc", _answer_key_label, "val32", _both("allenai/qasc")))
register_task(TaskSpec("wiki_qa", "wiki_qa", lambda r: int(r["label"]), "own", _both("microsoft/wiki_qa"),
                       int_fields=("label",)))
register_task(TaskSpec("quartz", "quartz", _answer_key_label, "own", _both("allenai/quartz")))
register_task(TaskSpec("paws", "paws", lambda r: int(r["label"]), "own",
                       _both("google-research-datasets/paws", "labeled_final"), int_fields=("id", "label")))
register_task(TaskSpec(
    "story_cloze", "story_cloze", lambda r: int(r["answer_right_ending"]) - 1, "storycloze", storycloze=True,
    fetch="StoryCloze 2016 is not redistributable: request the 'Story Cloze Test Spring 2016' val and test CSV "
          "files at https://cs.rochester.edu/nlp/rocstories/ and pass their folder as --storycloze-dir",
    int_fields=("answer_right_ending",),
))
register_task(TaskSpec("winogrande", "winogrande", lambda r: int(r["answer"]) - 1, "val32",
                       _both("allenai/winogrande", "winogrande_xl")))
register_task(TaskSpec("wsc", "wsc", lambda r: int(r["label"]), "val32",
                       (HubSource("aps/super_glue", "wsc.fixed"),
                        HubSource("aps/super_glue", "wsc.fixed", parquet_export=True)),
                       int_fields=("span1_index", "span2_index", "idx", "label")))
register_task(TaskSpec("rte", "rte", lambda r: int(r["label"]), "val32",
                       (HubSource("aps/super_glue", "rte"), HubSource("aps/super_glue", "rte", parquet_export=True)),
                       int_fields=("idx", "label")))


# ----------------------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------------------
def _load_hub_split(source: HubSource, split: str, cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Rows of one hub split, in hub order. (Tests replace this function; it is the only network access.)"""
    from datasets import load_dataset

    if source.parquet_export:
        files = f"hf://datasets/{source.repo}@{PARQUET_EXPORT}/{source.config or 'default'}/{split}/*.parquet"
        ds = load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cache_dir)
    else:
        ds = load_dataset(source.repo, source.config, split=split, cache_dir=cache_dir)
    return ds.to_list()


def _read_local(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data["rows"]
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


# Official StoryCloze 2016 CSV files and their columns -> the HF story_cloze field names
_STORYCLOZE_FILES = {
    "validation": ("cloze_test_val__spring2016 - cloze_test_ALL_val.csv", "cloze_test_val__spring2016.csv",
                   "validation.csv", "validation.jsonl", "validation.parquet"),
    "test": ("cloze_test_test__spring2016 - cloze_test_ALL_test.csv", "cloze_test_test__spring2016.csv",
             "test.csv", "test.jsonl", "test.parquet"),
}
_STORYCLOZE_COLUMNS = {
    "InputStoryid": "story_id", "InputSentence1": "input_sentence_1", "InputSentence2": "input_sentence_2",
    "InputSentence3": "input_sentence_3", "InputSentence4": "input_sentence_4",
    "RandomFifthSentenceQuiz1": "sentence_quiz1", "RandomFifthSentenceQuiz2": "sentence_quiz2",
    "AnswerRightEnding": "answer_right_ending",
}


def storycloze_files(directory: str | os.PathLike, split: str) -> list[Path]:
    """Candidate files of StoryCloze 2016 ``split`` ("validation" / "test") in ``directory``, in priority order."""
    return [Path(directory) / n for n in _STORYCLOZE_FILES[split]]


#: Sharded parquet copies of StoryCloze (a hub repo's ``data/<split>-*.parquet`` or a parquet export's
#: ``<config>/<split>/*.parquet``) under --storycloze-dir, tried after the single files above.
_STORYCLOZE_SHARDS = ("{split}-*.parquet", "data/{split}-*.parquet", "*/{split}/*.parquet")


def storycloze_shards(directory: str | os.PathLike, split: str) -> list[Path]:
    """The parquet shards of ``split`` in a hub-style copy under ``directory`` (first pattern that matches)."""
    for pattern in _STORYCLOZE_SHARDS:
        shards = sorted(Path(directory).glob(pattern.format(split=split)))
        if shards:
            return shards
    return []


def _read_storycloze(directory: str | os.PathLike | None, split: str) -> list[dict[str, Any]]:
    spec = TASKS.get("story_cloze")
    if not directory:
        raise TaskDataError(f"task story_cloze needs --storycloze-dir (or STORYCLOZE_DIR). {spec.fetch}")
    files = [p for p in storycloze_files(directory, split) if p.is_file()][:1] or storycloze_shards(directory, split)
    if files:
        rows = [r for path in files for r in _read_local(path)]
        return [{_STORYCLOZE_COLUMNS.get(k, k): v for k, v in r.items()} for r in rows]
    tried = ", ".join([p.name for p in storycloze_files(directory, split)]
                      + [pat.format(split=split) for pat in _STORYCLOZE_SHARDS])
    raise TaskDataError(f"task story_cloze: no {split} file in --storycloze-dir {directory} (looked for: {tried}). "
                        f"{spec.fetch}")


def local_path(location: str | os.PathLike | None, task: str, hub_split: str) -> Path | None:
    """The first existing ``<location>/<task>/<hub_split>.<suffix>`` file, or None."""
    if not location:
        return None
    for suf in LOCAL_SUFFIXES:
        p = Path(location).expanduser() / task / f"{hub_split}{suf}"
        if p.is_file():
            return p
    return None


def _coerce_ints(row: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Integer fields given as strings (CSV) become ints, as in the hub's typed splits."""
    out = dict(row)
    for f in fields:
        v = out.get(f)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            out[f] = int(v)
    return out


_CACHE: dict[tuple, list[dict[str, Any]]] = {}


def clear_cache() -> None:
    """Forget rows read earlier in this process (tests; data changed on disk)."""
    _CACHE.clear()


def read_hub_split(spec: TaskSpec, hub_split: str, *, data_location: str | None = None,
                   storycloze_dir: str | None = None, cache_dir: str | None = None) -> list[dict[str, Any]]:
    """All rows of one hub split of ``spec``, in source order (cached per process)."""
    key = (spec.name, hub_split, str(data_location), str(storycloze_dir), str(cache_dir))
    if key in _CACHE:
        return _CACHE[key]
    tried: list[str] = []
    rows = None
    local = local_path(data_location, spec.name, hub_split)
    if local is not None:
        rows = _read_local(local)
    elif spec.storycloze:
        rows = _read_storycloze(storycloze_dir, hub_split)
    else:
        if data_location:
            tried.append(f"{Path(data_location).expanduser() / spec.name / hub_split}"
                         f".{{{','.join(s[1:] for s in LOCAL_SUFFIXES)}}}")
        for source in spec.hub:
            try:
                rows = _load_hub_split(source, hub_split, cache_dir)
                break
            except Exception as e:  # noqa: BLE001 - every failure is reported together below
                tried.append(f"{source.describe(hub_split)} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if rows is not None and spec.int_fields:
        rows = [_coerce_ints(r, spec.int_fields) for r in rows]
    if rows is None:
        if spec.prepare_hint:
            fix = f"generate it with: {spec.prepare_hint.format(data_location=data_location or '<dir>')}"
        else:
            fix = ("fetch it once with network access (the same command caches it), or download the parquet "
                   "files and place them as <data-location>/<task>/<split>.parquet")
            if spec.hub:
                s = spec.hub[0]
                fix += (f", e.g. huggingface-cli download --repo-type dataset {s.repo} --revision "
                        f"refs/convert/parquet --include '{s.config or 'default'}/*' --local-dir <dir>")
        raise TaskDataError(f"task {spec.name}: cannot load split {hub_split!r}; tried: {'; '.join(tried) or 'nothing'}. "
                            f"To fix: {fix}")
    _CACHE[key] = rows
    return rows


def split_val_test(rows: Sequence[Any], n_val: int = VAL_SIZE, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """(val, test): ``rows`` shuffled with ``random.Random(seed)``, the first ``n_val`` and the rest.

    With fewer than ``2 * n_val`` rows the split is halved instead (as the official reader does when the
    held-out split is smaller than the validation size).
    """
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if len(rows) <= n_val:
        n_val = len(rows) // 2
    return rows[:n_val], rows[n_val:]


def get_rows(task: str, split: str, **where: Any) -> list[dict[str, Any]]:
    """Raw rows of ``task``'s ``split`` ("train", "val", "test") under the task's split rule."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    spec = TASKS.get(task)
    hub_split, part = SPLIT_RULES[spec.split_rule][split]
    rows = read_hub_split(spec, hub_split, **where)
    if part == "all":
        return list(rows)
    val, test = split_val_test(rows)
    return val if part == "val" else test


def to_example(spec: TaskSpec, row: Mapping[str, Any]) -> Example:
    """Prompt ``row`` with the task's template; the label indexes the template's answer choices."""
    prompt, target, choices = get_template(spec.template).apply(row)
    label = spec.label(row)
    if not 0 <= label < len(choices):
        raise ValueError(f"task {spec.name}: label {label} out of range for {len(choices)} choices in row {dict(row)}")
    return Example(prompt, tuple(choices), label)


def get_examples(task: str, split: str, *, data_location: str | None = None, storycloze_dir: str | None = None,
                 cache_dir: str | None = None) -> list[Example]:
    """Prompted examples of ``task``'s ``split``."""
    spec = TASKS.get(task)
    rows = get_rows(task, split, data_location=data_location, storycloze_dir=storycloze_dir, cache_dir=cache_dir)
    return [to_example(spec, r) for r in rows]


def check_tasks(tasks: Iterable[str], *, splits: Sequence[str] = SPLITS, data_location: str | None = None,
                storycloze_dir: str | None = None, cache_dir: str | None = None) -> None:
    """Load (and cache) every hub split behind ``splits`` of ``tasks`` now, before any model loads.

    Raises one :class:`TaskDataError` listing every task that failed.
    """
    errors = []
    for task in dict.fromkeys(tasks):
        spec = TASKS.get(task)
        for hs in spec.hub_splits(splits):
            try:
                read_hub_split(spec, hs, data_location=data_location, storycloze_dir=storycloze_dir,
                               cache_dir=cache_dir)
            except TaskDataError as e:
                errors.append(str(e))
                break
    if errors:
        raise TaskDataError(errors[0] if len(errors) == 1 else
                            f"{len(errors)} tasks cannot be loaded:\n" + "\n".join(f"  - {e}" for e in errors))

