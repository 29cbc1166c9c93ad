"""Import published fine-tuned CLIP image encoders as task vectors of the ``imported`` fine-tuning mode.

    python vision/import_checkpoints.py --source fusionbench --model ViT-B-32 --tasks Cars,DTD --save runs
    python vision/import_checkpoints.py --source tall_masks --model ViT-B-32 --save runs [--from DIR]
    python vision/import_checkpoints.py --source task_vectors --model ViT-B-32 --save runs --from DIR --allow-pickle

Files come from the Hugging Face hub (through huggingface_hub and its cache, at --revision) or, with
``--from DIR``, from a folder laid out like the hub (``DIR/<repo id>/<path in the repo>``; task_vectors:
``DIR/<model>/<Task>/finetuned.pt``). Before anything is written: the files' architecture and MLP activation
must match ``--model``/``--pretrained``, the source's own pre-trained model (converted) must equal our θ0 to
``--theta0-atol`` (or, with ``--use-source-theta0``, task vectors are taken against the source's θ0, and the
config says so), and every key must be accounted for. Each task then gets a run folder
``SAVE/vision/<model>/imported/<task>/<hash>`` (the hash includes ``--import-source``) with
``task_vector.safetensors`` (θ_ft − θ0 over our eligible + dense tensors), ``finetuned.safetensors``,
``config.json`` (source, repo ids, revisions, file hashes, checks) and ``metrics.json``; every evaluation script
then reads them with ``--finetuning-mode imported --import-source <source>``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

if __package__ in (None, ""):  # `python vision/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (vision/datasets.py would shadow HF `datasets`)

import torch
from safetensors.torch import load_file
from torch import Tensor

from talos.app.flags import Config, check_config, config_from_namespace, csv_list
from talos.app.runs import resolved_settings
from talos.io import atomic_write_json, read_json, save_tensors
from talos.runinfo import run_metadata, seed_everything
from talos.task_vector import TaskVector

from vision.args import DOMAIN, build_parser
from vision.checkpoints import (SOURCES, Converted, FileSpec, Source, convert_hf_clip, convert_open_clip,
                                encoder_activation, encoder_architecture, hf_config_activation,
                                hf_config_architecture, unpickle_to_safetensors)

logger = logging.getLogger("talos")
#: open_clip keys a transformers CLIPVisionModel does not have: the fine-tuning left them at θ0 (τ = 0 there)
_HF_FILLABLE = ("visual.proj",)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The vision settings (same defaults, so the same run folders as the evaluation scripts) and the options of
    the import group."""
    p = build_parser(__doc__.splitlines()[0])
    g = p.add_argument_group("import")
    g.add_argument("--source", dest="import_source", choices=SOURCES.names(), help="alias of --import-source")
    g.add_argument("--tasks", type=csv_list, default=None, help="comma-separated tasks; none: --eval-datasets")
    g.add_argument("--from", dest="from_dir", default=None,
                   help="read files from this folder (laid out like the hub: DIR/<repo id>/<path>) instead of the hub")
    g.add_argument("--revision", default="main", help="hub revision (branch, tag or commit) of every repository read")
    g.add_argument("--hub-cache", default=None, help="huggingface_hub cache folder; none: its own")
    g.add_argument("--repo-id", default=None, help="read a single-repository source from this repository instead")
    g.add_argument("--source-model", default=None, help="the source's name of --model; none: the built-in table")
    g.add_argument("--source-name", action="append", default=[], metavar="TASK=NAME",
                   help="the source's name of one of our tasks (repeatable; others: the built-in table)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="task_vectors only: unpickle its modules (arbitrary code!) in a separate process")
    g.add_argument("--pickle-code-path", action="append", default=[],
                   help="folder put on the unpickling process's sys.path (the authors' source tree)")
    g.add_argument("--use-source-theta0", action="store_true",
                   help="when the source's pre-trained model differs from ours, take task vectors against the "
                        "source's θ0 instead of refusing (recorded in config.json)")
    g.add_argument("--theta0-atol", type=float, default=1e-6,
                   help="largest |difference| allowed between the source's θ0 and ours")
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = p.parse_args(argv)
    opts.finetuning_mode = "imported"
    cfg = config_from_namespace(DOMAIN, opts, argv)
    try:
        check_config(cfg)
        _validate_import(cfg, opts)
    except ValueError as e:
        p.error(str(e))
    return cfg.freeze(), opts


def _validate_import(cfg: Config, opts: argparse.Namespace) -> None:
    from vision.datasets import DATASETS, base_name

    source = SOURCES.get(cfg.import_source)
    if source.kind == "pickle" and not opts.allow_pickle:
        raise ValueError(f"{source.name} checkpoints are pickled modules: loading them runs arbitrary code. Pass "
                         "--allow-pickle to unpickle them in a separate process (converted once to safetensors)")
    opts.tasks = opts.tasks or list(cfg.eval_datasets)
    for t in opts.tasks:
        DATASETS.get(base_name(t))
    names = {}
    for item in opts.source_name:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours or not theirs:
            raise ValueError(f"--source-name takes TASK=NAME, got {item!r}")
        names[ours] = theirs
    opts.source_names = names
    if not (opts.theta0_atol >= 0):
        raise ValueError("--theta0-atol must be >= 0")
    if opts.from_dir is not None and not Path(opts.from_dir).is_dir():
        raise ValueError(f"--from {opts.from_dir}: no such folder")
    if opts.from_dir is None and source.repo_id is None and opts.repo_id is None and source.kind == "pickle":
        raise ValueError(f"{source.name} has no default hub repository: pass --from DIR (or --repo-id)")


# ----------------------------------------------------------------------------------------------------------
# Files: a local folder laid out like the hub, or the hub through huggingface_hub's cache
# ----------------------------------------------------------------------------------------------------------
class Files:
    """Finds and fetches a checkpoint's files; records repo id, revision and sha256 of each file used."""

    def __init__(self, from_dir: str | None, revision: str, cache_dir: str | None) -> None:
        self.from_dir = Path(from_dir) if from_dir else None
        self.revision, self.cache_dir = revision, cache_dir
        self._listing: dict[str | None, list[str]] = {}
        self._fetched: dict[tuple[str | None, str], tuple[Path, dict[str, Any]]] = {}

    def _list(self, repo_id: str | None) -> list[str]:
        if repo_id not in self._listing:
            if self.from_dir is not None:
                base = self.from_dir / repo_id if repo_id else self.from_dir
                self._listing[repo_id] = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                                                if p.is_file()) if base.is_dir() else []
            else:
                from huggingface_hub import list_repo_files

                self._listing[repo_id] = list(list_repo_files(repo_id, revision=self.revision))
        return self._listing[repo_id]

    def where(self, repo_id: str | None) -> str:
        if self.from_dir is not None:
            return str(self.from_dir / repo_id if repo_id else self.from_dir)
        return f"hub repository {repo_id} at revision {self.revision}"

    def resolve(self, spec: FileSpec) -> dict[str, str]:
        """{role: path inside the repository} for every role; raises FileNotFoundError naming the candidates."""
        listing = self._list(spec.repo_id)
        lower = {p.lower(): p for p in listing}
        out = {}
        for role, candidates in spec.files.items():
            hit = next((c for c in candidates if c in listing), None) or next(
                (lower[c.lower()] for c in candidates if c.lower() in lower), None)
            if hit is None:
                raise FileNotFoundError(f"no {role} file ({' or '.join(candidates)}) in {self.where(spec.repo_id)}")
            out[role] = hit
        return out

    def fetch(self, repo_id: str | None, path: str) -> tuple[Path, dict[str, Any]]:
        """Local path of ``path`` and its record (repo id, revision asked and resolved, sha256)."""
        if (repo_id, path) not in self._fetched:
            self._fetched[(repo_id, path)] = self._fetch(repo_id, path)
        return self._fetched[(repo_id, path)]

    def _fetch(self, repo_id: str | None, path: str) -> tuple[Path, dict[str, Any]]:
        if self.from_dir is not None:
            local = (self.from_dir / repo_id if repo_id else self.from_dir) / path
            resolved = "local"
        else:
            from huggingface_hub import hf_hub_download

            local = Path(hf_hub_download(repo_id, path, revision=self.revision, cache_dir=self.cache_dir))
            parts = local.parts  # <cache>/models--a--b/snapshots/<commit>/<path>
            resolved = parts[parts.index("snapshots") + 1] if "snapshots" in parts else self.revision
        return local, {"repo_id": repo_id, "path": path, "revision": self.revision if self.from_dir is None else None,
                       "resolved_revision": resolved, "sha256": _sha256(local),
                       "from": str(self.from_dir) if self.from_dir is not None else "hub"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Loading one checkpoint in our names
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """One checkpoint converted to open_clip names, with what it says about itself."""

    what: str
    converted: Converted
    activation: str
    architecture: dict[str, int] | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _torch_state_dict(path: Path) -> Mapping[str, Any]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled modules and other objects stop here
        raise ValueError(f"{path} is not a plain state dict (torch.load with weights_only=True refused it: "
                         f"{str(e).splitlines()[0]})") from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def load_checkpoint(source: Source, spec: FileSpec, paths: Mapping[str, str], files: Files, what: str,
                    unpickled: Mapping[Path, tuple[Path, dict[str, str]]] | None = None) -> Loaded:
    """Fetch, read and convert one checkpoint of ``source``; never unpickles in this process (pickled modules
    were converted to safetensors by :func:`convert_pickles` and are read from ``unpickled``)."""
    fetched = {role: files.fetch(spec.repo_id, p) for role, p in paths.items()}
    records = [rec for _, rec in fetched.values()]
    weights = fetched["weights"][0]
    if source.kind == "transformers":
        config = json.loads(fetched["config"][0].read_text())
        if weights.suffix == ".safetensors":
            sd = load_file(str(weights))
        else:
            sd = _torch_state_dict(weights)
        return Loaded(what, convert_hf_clip(sd), hf_config_activation(config), hf_config_architecture(config),
                      records, {"architectures": config.get("architectures")})
    if source.kind == "state_dict":
        conv = convert_open_clip(_torch_state_dict(weights))
        return Loaded(what, conv, source.activation, None, records)
    converted, meta = (unpickled or {})[weights]
    if "activation" not in meta:
        raise ValueError(f"{what}: cannot tell the activation of the unpickled {meta.get('class')}")
    return Loaded(what, convert_open_clip(load_file(str(converted))), meta["activation"], None, records,
                  {"class": meta.get("class"), "non_tensor_keys": json.loads(meta.get("non_tensor_keys", "[]"))})


def convert_pickles(specs: Sequence[tuple[FileSpec, Mapping[str, str]]], files: Files, tmp: Path,
                    code_paths: Sequence[str]) -> dict[Path, tuple[Path, dict[str, str]]]:
    """{pickle path: (its tensors as safetensors in ``tmp``, what the child recorded)}, one child process."""
    srcs = list(dict.fromkeys(files.fetch(spec.repo_id, paths["weights"])[0] for spec, paths in specs))
    pairs = [(src, tmp / f"{i}.safetensors") for i, src in enumerate(srcs)]
    metas = unpickle_to_safetensors(pairs, code_paths)
    return {src: (dst, meta) for (src, dst), meta in zip(pairs, metas)}


# ----------------------------------------------------------------------------------------------------------
# Checks against our model
# ----------------------------------------------------------------------------------------------------------
def _shown(items: Sequence[str], n: int = 6) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def check_against(loaded: Loaded, ours: Mapping[str, Tensor], our_activation: str, our_arch: Mapping[str, int],
                  model: str, fillable: Sequence[str] = ()) -> list[str]:
    """Raise ValueError unless ``loaded`` has our activation, architecture and exactly our encoder keys (those in
    ``fillable`` may be absent); returns the absent ones."""
    label = f"{loaded.what} does not match --model {model}"
    if loaded.activation != our_activation:
        raise ValueError(f"{label}: it was trained with {loaded.activation} MLP activations, our model is built "
                         f"with {our_activation} (features would differ); pick the --model/--pretrained/--activation "
                         "that builds the same activation")
    if loaded.architecture is not None:
        bad = {k: (v, our_arch[k]) for k, v in loaded.architecture.items() if our_arch.get(k) != v}
        if bad:
            raise ValueError(f"{label}: architecture differs: " +
                             ", ".join(f"{k} {a} vs ours {b}" for k, (a, b) in sorted(bad.items())))
    src = loaded.converted.tensors
    missing = [k for k in ours if k not in src and k not in fillable]
    extra = [k for k in src if k not in ours]
    shapes = [f"{k} {tuple(src[k].shape)} vs ours {tuple(ours[k].shape)}" for k in ours
              if k in src and src[k].shape != ours[k].shape]
    if missing or extra or shapes:
        parts = [f"missing keys: {_shown(missing)}" if missing else "",
                 f"unexpected keys: {_shown(extra)}" if extra else "",
                 f"shape mismatches: {_shown(shapes, 4)}" if shapes else ""]
        raise ValueError(f"{label}: " + "; ".join(p for p in parts if p))
    return [k for k in fillable if k in ours and k not in src]


def largest_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[float, str | None]:
    """(max |a - b| over the keys both have, the key where it is reached)."""
    best, where = 0.0, None
    for k in a:
        if k in b:
            d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
            if d > best or where is None:
                best, where = d, k
    return best, where


# ----------------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One task to import: its run folder, source name and files."""

    task: str
    run: Any
    spec: FileSpec
    paths: dict[str, str]


def _spec(source: Source, fn: Any, model: str, task: str, repo_id: str | None) -> FileSpec:
    spec = fn(model, task)
    return FileSpec(repo_id, spec.files) if repo_id else spec


def plan(cfg: Config, opts: argparse.Namespace, source: Source, files: Files) -> tuple[list[Job], FileSpec, dict[str, str]]:
    """Resolve every file (θ0 and per task) before any model loads; completed runs are skipped."""
    from vision.common import RUNS

    if opts.repo_id and source.kind == "transformers":
        raise ValueError(f"--repo-id applies to single-repository sources, not {source.name}")
    m = source.model_name(cfg.model, opts.source_model)
    jobs = []
    for task in opts.tasks:
        run = RUNS.finetune(cfg, task)
        if run.is_complete():
            done = read_json(run.config).get("import", {})
            if done.get("theta0") != ("source" if opts.use_source_theta0 else "ours"):
                raise ValueError(f"{run.dir} was imported with theta0={done.get('theta0')}; delete it to re-import")
            logger.info("skip: %s already imported (%s)", task, run.dir)
            continue
        spec = _spec(source, source.finetuned, m, source.task_name(task, opts.source_names), opts.repo_id)
        jobs.append(Job(task, run, spec, files.resolve(spec)))
    t0 = opts.tasks[0]
    spec0 = _spec(source, source.pretrained, m, source.task_name(t0, opts.source_names), opts.repo_id)
    return jobs, spec0, files.resolve(spec0) if jobs else {}


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Import ``--tasks`` from ``--source``; returns {task: run folder}."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg, opts = parse_args(argv)
    from vision.common import RUNS, VisionSetup

    source = SOURCES.get(cfg.import_source)
    files = Files(opts.from_dir, opts.revision, opts.hub_cache)
    jobs, spec0, paths0 = plan(cfg, opts, source, files)
    if not jobs:
        return {t: str(RUNS.finetune(cfg, t).dir) for t in opts.tasks}
    seed_everything(cfg.seed)  # same θ0 as the evaluation scripts (random init with --pretrained none)
    setup = VisionSetup(cfg)
    visual = setup.classifier.visual
    ours = {n: p.detach().cpu() for n, p in setup.classifier.named_parameters() if n.startswith("visual.")}
    names = setup.eligible + setup.dense
    our_act, our_arch = encoder_activation(visual), encoder_architecture(visual)
    fillable = _HF_FILLABLE if source.kind == "transformers" else ()
    with tempfile.TemporaryDirectory(prefix="talos-import-") as tmp:
        unpickled = None
        if source.kind == "pickle":  # once, in one child process, before any check
            unpickled = convert_pickles([(spec0, paths0)] + [(j.spec, j.paths) for j in jobs], files, Path(tmp),
                                        opts.pickle_code_path)
        loaded0 = load_checkpoint(source, spec0, paths0, files, f"{source.name} pre-trained model "
                                  f"({spec0.repo_id or files.where(None)}: {paths0.get('weights')})", unpickled)
        absent0 = check_against(loaded0, ours, our_act, our_arch, cfg.model, fillable)
        diff, where = largest_difference(loaded0.converted.tensors, ours)
        if diff > opts.theta0_atol and not opts.use_source_theta0:
            raise ValueError(f"{loaded0.what} differs from our θ0 (--model {cfg.model} --pretrained "
                             f"{cfg.pretrained}): largest |difference| {diff:.3g} at {where} (tolerance "
                             f"{opts.theta0_atol}); pass --use-source-theta0 to take task vectors against the "
                             "source's θ0 (recorded), or fix --model/--pretrained")
        base = dict(ours)
        if opts.use_source_theta0:
            base.update({k: v.to(ours[k].dtype) for k, v in loaded0.converted.tensors.items()})
        theta0 = {"theta0": "source" if opts.use_source_theta0 else "ours", "theta0_max_abs_diff": diff,
                  "theta0_largest_difference_at": where, "theta0_atol": opts.theta0_atol,
                  "pretrained_files": loaded0.files, "pretrained_absent_keys": absent0}
        del loaded0
        checked = {}
        for job in jobs:  # every check passes before anything is written; one checkpoint in memory at a time
            what = (f"{source.name} checkpoint of {job.task} ({job.spec.repo_id or files.where(None)}: "
                    f"{job.paths['weights']})")
            checked[job.task] = (what, check_against(load_checkpoint(source, job.spec, job.paths, files, what,
                                                                     unpickled),
                                                     ours, our_act, our_arch, cfg.model, fillable))
        for job in jobs:
            what, absent = checked[job.task]
            ld = load_checkpoint(source, job.spec, job.paths, files, what, unpickled)
            write_run(job, ld, absent, base, names, theta0, source, cfg, opts)
    return {t: str(RUNS.finetune(cfg, t).dir) for t in opts.tasks}


def write_run(job: Job, ld: Loaded, absent: Sequence[str], base: Mapping[str, Tensor], names: Sequence[str],
              theta0: Mapping[str, Any], source: Source, cfg: Config, opts: argparse.Namespace) -> None:
    """Write one imported run folder: weights, task vector, config, then metrics (marks it complete)."""
    ft = dict(ld.converted.tensors)
    for k in absent:  # not in the checkpoint: the source never trained it, so τ = 0 there
        ft[k] = base[k]
    ft = {n: ft[n].to(base[n].dtype) for n in names}
    tv = TaskVector.from_state_dicts({n: base[n] for n in names}, ft, keys=names)
    run = job.run
    record = {"source": source.name, "kind": source.kind, "repo_id": job.spec.repo_id,
              "revision": opts.revision if opts.from_dir is None else None, "from": opts.from_dir,
              "files": ld.files, "activation": ld.activation, "taken_from_theta0": list(absent),
              "ignored_keys": ld.converted.ignored, "dropped_keys": sorted(set(ld.converted.tensors) - set(names)),
              "source_info": ld.info, **theta0}
    save_tensors(run.finetuned, ft)
    tv.save(run.task_vector)
    run.write_config({"import": record, "settings": cfg.to_dict(),
                      "resolved": resolved_settings(cfg, job.task), **run_metadata(cfg.argv)})
    atomic_write_json(run.metrics, {"imported": True, "task_vector_density": tv.density(),
                                    "task_vector_norm": tv.norm()})
    logger.info("imported %s from %s: %s (τ norm %.4g)", job.task, source.name, run.dir, tv.norm())


if __name__ == "__main__":
    main()
