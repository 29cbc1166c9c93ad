"""Command-line flags and checks shared by the domain scripts (``vision/args.py``, ``nlp/args.py``).

Each domain's ``args.py`` stays the one place its flags are declared: it calls these builders for the groups
every domain has (method, evaluation, runs) with its own defaults, and adds its model, data and schedule flags.
Validation raises ``ValueError`` (turned into an argparse error by :func:`parse_validated`) before any model
or data loads.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from .paths import EvalRun, FinetuneRun
    from .task_vector import TaskVector

__all__ = [
    "csv_list", "add_method_flags", "add_task_flags", "add_step_flags", "add_evaluation_flags", "add_run_flags",
    "validate_common", "resolve_device", "describe_device", "nvidia_gpu_present", "method_hparams", "parse_validated", "RunPaths",
    "check_finite_floats", "check_counts", "check_save_folder", "check_merge_flags", "check_pretrained_file",
    "pretrained_key", "finetune_command",
]


def csv_list(s: str) -> list[str]:
    """``"a,b,,c"`` -> ``["a", "b", "c"]`` (argparse ``type=``)."""
    return [x for x in s.split(",") if x]


def add_method_flags(p: argparse.ArgumentParser, *, fisher_target: str, fisher_target_help: str,
                     draws_help: str, calibration_batches_help: str, calibration_batch_size: int | None,
                     calibration_batch_size_help: str | None, lora_scaling: str,
                     lora_scaling_help: str, lora_init: str | None = None,
                     lora_init_help: str = "") -> argparse._ArgumentGroup:
    """The ``method`` group: mode, sparsity, calibration, Fisher target, LoRA. Returns the group."""
    from .fisher import TARGETS
    from .modes import MODES

    g = p.add_argument_group("method")
    g.add_argument("--finetuning-mode", default="talos", help=f"one of: {', '.join(MODES.names())}")
    g.add_argument("--sparsity", type=float, default=0.9, help="fraction of eligible entries frozen (sparse modes)")
    g.add_argument("--calibration-rounds", type=int, default=4, help="TaLoS calibration rounds R")
    g.add_argument("--soft-mask", type=float, default=0.1,
                   help="factor on dropped weights during later calibration rounds (0 = hard pruning)")
    g.add_argument("--fisher-target", default=fisher_target, choices=list(TARGETS), help=fisher_target_help)
    g.add_argument("--fisher-draws", type=int, default=1, help=draws_help)
    g.add_argument("--calibration-batches", type=int, default=None, help=calibration_batches_help)
    g.add_argument("--calibration-batch-size", type=int, default=calibration_batch_size,
                   help=calibration_batch_size_help)
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA / L-LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA / L-LoRA alpha")
    g.add_argument("--lora-scaling", default=lora_scaling, choices=["alpha", "alpha_over_rank"],
                   help=lora_scaling_help)
    g.add_argument("--lora-init", default=lora_init, choices=["kaiming", "xavier"],
                   help=lora_init_help or "draw of the LoRA A factor (default: each mode's own: lora kaiming as "
                                          "peft, llora the official xavier)")
    return g


def add_task_flags(g: argparse._ArgumentGroup, *, tasks: Sequence[str], control: str) -> None:
    """Task selection in the ``data`` group: the fine-tuned task, the evaluated tasks, the negation control."""
    g.add_argument("--train-dataset", default=None, help="task to fine-tune on (finetune.py)")
    g.add_argument("--eval-datasets", type=csv_list, default=list(tasks), help="comma-separated tasks to evaluate")
    g.add_argument("--control-dataset", default=control, help="control task of the negation protocol")


def add_step_flags(g: argparse._ArgumentGroup) -> None:
    """The end of the ``optimisation`` group: clipping, precision, seed, resume checkpoints."""
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (<= 0 disables)")
    g.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=500, help="optimizer steps between resume checkpoints")


def add_evaluation_flags(p: argparse.ArgumentParser, *, eval_batch_size: int,
                         merge_defaults: Mapping[str, Mapping[str, Any]]) -> None:
    """The ``evaluation`` group (coefficient grid, negation threshold, merge and its hyperparameters)."""
    from .merges import MERGES, add_merge_flags

    g = p.add_argument_group("evaluation")
    g.add_argument("--n-eval-points", type=int, default=21, help="coefficients on [0, 1] for addition/negation")
    g.add_argument("--control-threshold", type=float, default=0.95,
                   help="negation keeps control accuracy >= this x zero-shot")
    g.add_argument("--merge", default="sum", help=f"one of: {', '.join(MERGES.names())}")
    g.add_argument("--eval-batch-size", type=int, default=eval_batch_size)
    add_merge_flags(p, merge_defaults)


def add_run_flags(p: argparse.ArgumentParser, *, wandb_project: str) -> None:
    """The ``runs`` group: where artifacts go, device, wandb, progress bars, shared results, interruption."""
    g = p.add_argument_group("runs")
    g.add_argument("--save", default="runs", help="root folder of all artifacts")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (works with WANDB_MODE=offline)")
    g.add_argument("--wandb-project", default=wandb_project)
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--results-json", default=None,
                   help="evaluation scripts also merge their results into this shared results.json")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop fine-tuning after this many optimizer steps, checkpoint kept (simulates an "
                        "interruption; rerun without it to resume)")


def validate_common(args: argparse.Namespace, *, need_train_dataset: bool,
                    check_task: Callable[[str], Any]) -> Any:
    """Checks of the shared flags; ``check_task(name)`` raises on an unknown task. Returns the mode."""
    from .merges import MERGES
    from .modes import MODES

    mode = MODES.get(args.finetuning_mode)  # unknown names raise with the valid list
    MERGES.get(args.merge)
    if not (0.0 < args.sparsity < 1.0):  # also rejects NaN
        raise ValueError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.calibration_rounds < 1:
        raise ValueError("--calibration-rounds must be >= 1")
    if not (0.0 <= args.soft_mask <= 1.0):
        raise ValueError("--soft-mask must be in [0, 1]")
    if args.lora_rank < 1 or args.lora_alpha <= 0:
        raise ValueError("--lora-rank must be >= 1 and --lora-alpha > 0")
    if args.fisher_draws < 1:
        raise ValueError("--fisher-draws must be >= 1")
    if args.calibration_batches is not None and args.calibration_batches < 1:
        raise ValueError("--calibration-batches must be >= 1")
    if args.calibration_batch_size is not None and args.calibration_batch_size < 1:
        raise ValueError("--calibration-batch-size must be >= 1")
    if args.eval_batch_size < 1:
        raise ValueError("--eval-batch-size must be >= 1")
    if args.lr <= 0 or args.wd < 0:
        raise ValueError("--lr must be > 0 and --wd >= 0")
    if args.n_eval_points < 2:
        raise ValueError("--n-eval-points must be >= 2")
    if not (0.0 < args.control_threshold <= 1.0):
        raise ValueError("--control-threshold must be in (0, 1]")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError("--stop-after must be >= 1")
    if need_train_dataset and not mode.trains:
        raise ValueError(f"--finetuning-mode {mode.name} is not trained by this script: {mode.describe()}")
    if need_train_dataset and not args.train_dataset:
        raise ValueError("--train-dataset is required")
    if not args.eval_datasets:
        raise ValueError("--eval-datasets is empty")
    for name in list(args.eval_datasets) + [args.control_dataset] + ([args.train_dataset] if args.train_dataset else []):
        check_task(name)  # unknown tasks raise with the valid list
    args.mode_sparse = mode.sparse
    return mode


def nvidia_gpu_present() -> bool:
    """True when the machine shows an NVIDIA GPU to the OS (driver device nodes), whether or not torch's CUDA
    loads: a run there that finds no CUDA is broken, not a CPU machine."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def resolve_device(args: argparse.Namespace) -> None:
    """Fill ``--device`` (cuda if available) and ``--precision`` (bf16 autocast on CUDA, fp32 elsewhere).

    Never falls back silently: ``--device cuda`` without a working CUDA is an error, and so is the default on
    a machine that has an NVIDIA GPU whose CUDA fails to load (pass ``--device cpu`` to mean the CPU).
    """
    import torch

    if args.device is None:
        if torch.cuda.is_available():
            args.device = "cuda"
        elif nvidia_gpu_present():
            raise ValueError("this machine has an NVIDIA GPU but torch cannot use CUDA (torch "
                             f"{torch.__version__}, built for CUDA {torch.version.cuda}); fix the CUDA install, or "
                             "pass --device cpu to run on the CPU on purpose")
        else:
            args.device = "cpu"
    dev = str(args.device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {dev} but CUDA is not available to torch {torch.__version__} (built for "
                             f"CUDA {torch.version.cuda}); pass --device cpu to run on the CPU")
        idx = torch.device(dev).index
        if idx is not None and idx >= torch.cuda.device_count():
            raise ValueError(f"--device {dev} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("--device mps but MPS is not available")
    elif dev != "cpu" and not dev.startswith(("cuda", "mps")):
        raise ValueError(f"unknown --device {dev!r}; use cpu, cuda, cuda:N or mps")
    if args.precision is None:
        args.precision = "bf16" if dev.startswith("cuda") else "fp32"


def describe_device(args: argparse.Namespace) -> str:
    """One line naming the device (with the GPU's name) and the precision, printed first by every script."""
    import torch

    dev = str(args.device)
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else dev
    return f"device: {dev} ({name}), precision: {args.precision}"


def method_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """The method hyperparameters that define a fine-tuning run of ``--finetuning-mode`` (part of its hash)."""
    from .modes import MODES

    mode = MODES.get(args.finetuning_mode)
    h: dict[str, Any] = {}
    if mode.sparse:
        h["sparsity"] = args.sparsity
    if mode.uses_lora:
        h.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_scaling=args.lora_scaling)
        if getattr(args, "lora_init", None) is not None:  # absent = the mode's default (older runs keep their hash)
            h["lora_init"] = args.lora_init
    if mode.needs_calibration:
        h.update(rounds=args.calibration_rounds, soft_mask=args.soft_mask, fisher_target=args.fisher_target,
                 fisher_draws=args.fisher_draws, calibration_batches=args.calibration_batches,
                 calibration_batch_size=args.calibration_batch_size)
    return h


def parse_validated(parser: argparse.ArgumentParser, validate: Callable[..., argparse.Namespace],
                    argv: Sequence[str] | None, **kwargs: Any) -> argparse.Namespace:
    """Parse, then ``validate(args, **kwargs)``; argparse-style exit (code 2) with the message on a bad value."""
    args = parser.parse_args(argv)
    try:
        args = validate(args, **kwargs)  # the domain's own messages first (they read no weights)
        check_finite_floats(parser, args)
        check_counts(args)
        check_save_folder(args)
        check_merge_flags(args)
        args._cli_argv = list(sys.argv[1:] if argv is None else argv)  # for complete commands in error messages
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable
    print(describe_device(args), flush=True)
    return args


class RunPaths:
    """A domain's run folders from its parsed flags: ``finetune(args, task)`` and ``evaluation(args, protocol)``.

    ``finetune_hparams(args, task)`` is the domain's dict of the hyperparameters that define a fine-tuning run;
    evaluation folders hash the fine-tuning runs they read plus their own settings, so changing any
    fine-tuning flag gives new evaluation folders too.
    """

    def __init__(self, domain: str, finetune_hparams: Callable[[argparse.Namespace, str], Mapping[str, Any]]) -> None:
        self.domain = domain
        self.finetune_hparams = finetune_hparams

    def finetune(self, args: argparse.Namespace, task: str) -> "FinetuneRun":
        """Where the fine-tuning run of ``task`` under ``args`` lives."""
        from .modes import get_mode
        from .paths import FinetuneRun

        hparams = get_mode(args.finetuning_mode).run_hparams(self.finetune_hparams(args, task), args)
        return FinetuneRun(args.save, self.domain, args.model, args.finetuning_mode, task, hparams)

    def evaluation(self, args: argparse.Namespace, protocol: str,
                   extra: Mapping[str, Any] | None = None) -> "EvalRun":
        """Where an evaluation's results live: hashed over the task runs it reads and its own settings."""
        from .paths import EvalRun

        tasks = sorted(args.eval_datasets)
        h = {"runs": {t: self.finetune(args, t).hash for t in tasks}, "mode": args.finetuning_mode,
             "n_eval_points": args.n_eval_points, **dict(extra or {})}
        return EvalRun(args.save, self.domain, args.model, protocol, h)

    def task_vectors(self, args: argparse.Namespace, tasks: Sequence[str],
                     mode: str | None = None) -> dict[str, "TaskVector"]:
        """The task vectors of ``tasks`` for ``mode`` (default: the mode whose vectors ``args``' mode
        evaluates, e.g. ``standard`` for ``posthoc``); a missing one names the command that produces it."""
        from .modes import get_mode

        if mode is None:
            m = get_mode(args.finetuning_mode)
            mode = m.source_mode or m.name
        margs = argparse.Namespace(**{**vars(args), "finetuning_mode": mode})
        return load_checked_task_vectors(self.domain, args, margs, {t: self.finetune(margs, t) for t in tasks}, mode)


# ----------------------------------------------------------------------------------------------------------
# Reliability checks (issue 18): run by parse_validated before the domain's validate, so before any folder
# is created or any model loads.
# ----------------------------------------------------------------------------------------------------------
#: count flag -> smallest allowed value (flags a domain does not declare are skipped).
COUNT_MINIMUM = {
    "checkpoint_every": 1, "num_workers": 0, "fisher_draws": 1, "calibration_rounds": 1,
    "lora_rank": 1, "eval_batch_size": 1, "batch_size": 1, "num_grad_accumulation": 1, "num_steps": 1,
    "warmup_length": 0, "n_eval_points": 2, "eval_cache_mb": 0, "max_seq_len": 4,
}


def check_finite_floats(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """ValueError for any ``type=float`` flag given NaN or +-inf (``<= 0`` checks let NaN through)."""
    for action in parser._actions:
        if action.type is float:
            v = getattr(args, action.dest, None)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{action.option_strings[0]} must be a finite number, got {v}")


def check_counts(args: argparse.Namespace) -> None:
    """ValueError for a count flag below its minimum (``--checkpoint-every 0``, ``--num-workers -1`` ...)."""
    for dest, low in COUNT_MINIMUM.items():
        v = getattr(args, dest, None)
        if v is not None and v < low:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= {low}, got {v}")


def check_save_folder(args: argparse.Namespace) -> None:
    """ValueError when ``--save`` (or a parent of it) exists and is not a folder."""
    p = Path(args.save)
    for q in [p, *p.parents]:
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"--save {args.save}: {q} exists and is not a folder")
            break


def check_merge_flags(args: argparse.Namespace) -> None:
    """Run every merge method once on tiny vectors with its flags' values, so an out-of-range merge
    hyperparameter (``--ties-k 5``, ``--dare-p 1.5``) fails now, not after the model loads."""
    import torch

    from .merges import MERGE_HPARAMS, merge
    from .task_vector import TaskVector

    tasks = list(getattr(args, "eval_datasets", None) or ["a", "b"])
    g = torch.Generator().manual_seed(0)
    make = lambda names: {t: TaskVector({"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)})  # noqa: E731
                          for t in names}
    for method, hps in MERGE_HPARAMS.items():
        kw = {hp: getattr(args, f"merge_{method}_{hp}") for hp in hps if hasattr(args, f"merge_{method}_{hp}")}
        if not kw:
            continue
        # the chosen merge sees the real number of tasks; the others only have their ranges checked
        names = tasks if method == getattr(args, "merge", None) else [f"t{i}" for i in range(max(2, len(tasks)))]
        try:
            merge(method, make(names), **kw)
        except ValueError as e:
            flags = ", ".join(f"--{method.replace('_', '-')}-{hp} {v}" for hp, v in kw.items())
            raise ValueError(f"merge {method} ({flags}): {e}") from None


def check_pretrained_file(value: str | None, flag: str = "--pretrained") -> str | None:
    """For a ``value`` that names a file (has a path separator or a weights suffix), its content hash
    (``sha256:<hex>``, see :func:`talos.io.file_sha256`); None for a tag. ValueError when the file is missing."""
    if not value or value == "none":
        return None
    looks_like_path = os.sep in value or "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if not (looks_like_path or os.path.exists(value)):
        return None
    if not os.path.isfile(value):
        raise ValueError(f"{flag} {value}: no such file (give an existing checkpoint file or a pretrained tag)")
    from .io import file_sha256

    return "sha256:" + file_sha256(value)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_model_dir(value: str | None) -> str | None:
    """For a ``value`` that is a local model folder, the content hash of its weights and config
    (``sha256:<hex>`` over each such file's name and :func:`talos.io.file_sha256`); None otherwise (a hub id or
    a named config), so replacing the folder's weights gives a new run."""
    if not value or not os.path.isdir(value):
        return None
    import hashlib

    from .io import file_sha256

    files = sorted(f for f in os.listdir(value) if f.endswith(WEIGHT_SUFFIXES) or f == "config.json")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        raise ValueError(f"--model {value}: a folder without weights ({', '.join(WEIGHT_SUFFIXES)} files)")
    lines = "\n".join(f"{f}:{file_sha256(os.path.join(value, f))}" for f in files)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def pretrained_key(args: argparse.Namespace) -> str | None:
    """What the run hash records for ``--pretrained``: the file's content hash for a path (replacing the file
    gives a new run), else the tag itself (hashes of runs from tags are unchanged)."""
    return getattr(args, "pretrained_id", None) or args.pretrained


def finetune_command(domain: str, args: argparse.Namespace, task: str, mode: str) -> str:
    """The complete ``finetune.py`` command producing the run of ``task`` under ``mode`` with ``args``' flags:
    the script's own command line with the task and mode replaced (every script shares one parser)."""
    import shlex

    argv = list(getattr(args, "_cli_argv", []))
    out: list[str] = []
    skip = {"--train-dataset", "--finetuning-mode", "--eval-datasets", "--control-dataset", "--results-json",
            "--merge", "--stop-after"}
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in skip:
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return shlex.join(["python", f"{domain}/finetune.py", "--train-dataset", task, "--finetuning-mode", mode, *out])


def load_checked_task_vectors(domain: str, args: argparse.Namespace, margs: argparse.Namespace,
                              runs: Mapping[str, "FinetuneRun"], mode: str) -> dict[str, "TaskVector"]:
    """Load each run's task vector after checking it against the run's manifest and for NaN/inf.

    Every missing or untrusted run is listed in one error, each with the complete command that (re)builds it.
    """
    from .io import MANIFEST
    from .modes import FinetuneMode, get_mode
    from .pipeline import check_finite_task_vector
    from .task_vector import TaskVector

    m = get_mode(mode)
    own_hint = type(m).missing_hint is not FinetuneMode.missing_hint  # e.g. imported: the import command
    problems = []
    for t, run in runs.items():
        if not run.task_vector.exists():
            why = "missing"
        elif (run.dir / MANIFEST).exists() and (bad := _first_problem(run.task_vector, run.metrics)) is not None:
            why = f"not trusted ({bad})"  # damaged, or the run has not finished
        else:
            continue  # complete, or written before manifests existed (then only its content is checked)
        hint = m.missing_hint(domain, margs, t) if own_hint else f"run:\n    {finetune_command(domain, margs, t, mode)}"
        problems.append(f"  {t} ({mode}): {run.task_vector} is {why}; {hint}")
    if problems:
        raise FileNotFoundError(f"{len(problems)} fine-tuning run(s) needed first:\n" + "\n".join(problems))
    out = {}
    for t, run in runs.items():
        tv = TaskVector.load(run.task_vector)
        check_finite_task_vector(tv, run.task_vector)
        out[t] = tv
    return out


def _first_problem(*paths: Path) -> str | None:
    """``"<name>: <why>"`` for the first of ``paths`` that does not match its manifest, else None."""
    from .io import check_artifact

    for p in paths:
        if (bad := check_artifact(p)) is not None:
            return f"{p.name}: {bad}"
    return None
