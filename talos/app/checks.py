"""Checks of a parsed :class:`~talos.app.flags.Config` that run before any folder is created or model loads,
and the device choice (never a silent fallback from CUDA to the CPU)."""
from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .flags import Config

__all__ = ["validate_common", "check_save_folder", "check_merge_flags", "check_pretrained_file", "check_model_dir",
           "resolve_device", "describe_device", "nvidia_gpu_present"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def validate_common(cfg: "Config", *, need_train_dataset: bool) -> None:
    """The declared ranges and choices of every group, the chosen mode's own checks, and the task names."""
    from ..merges import MERGES
    from ..modes import MODES

    mode = MODES.get(cfg.finetuning_mode)  # unknown names raise with the valid list
    MERGES.get(cfg.merge)
    for _, group in cfg:
        group.check()
    cfg.mode_settings().check()
    if need_train_dataset and not mode.trains:
        raise ValueError(f"--finetuning-mode {mode.name} is not trained by this script: {mode.describe()}")
    if need_train_dataset and not cfg.train_dataset:
        raise ValueError("--train-dataset is required")
    if not cfg.eval_datasets:
        raise ValueError("--eval-datasets is empty")
    for name in list(cfg.eval_datasets) + [cfg.control_dataset] + ([cfg.train_dataset] if cfg.train_dataset else []):
        cfg.domain.check_task(name)  # unknown tasks raise with the valid list


def check_save_folder(save: str) -> None:
    """ValueError when ``--save`` (or a parent of it) exists and is not a folder."""
    p = Path(save)
    for q in [p, *p.parents]:
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"--save {save}: {q} exists and is not a folder")
            break


def check_merge_flags(cfg: "Config") -> None:
    """Run every merge method once on tiny vectors with its flags' values, so an out-of-range merge
    hyperparameter (``--ties-k 5``, ``--dare-p 1.5``) fails now, not after the model loads."""
    import torch

    from ..merges import MERGES, merge
    from ..task_vector import TaskVector

    tasks = list(cfg.eval_datasets or ["a", "b"])
    g = torch.Generator().manual_seed(0)

    def make(names: list[str]) -> dict[str, TaskVector]:
        return {t: TaskVector({"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}) for t in names}

    for method in MERGES.names():
        kw = cfg.merge_hparams(method)
        if not {k for k in kw if k != "variant"}:
            continue
        # the chosen merge sees the real number of tasks; the others only have their ranges checked
        names = tasks if method == cfg.merge else [f"t{i}" for i in range(max(2, len(tasks)))]
        try:
            merge(method, make(names), **kw)
        except ValueError as e:
            flags = ", ".join(f"--{method.replace('_', '-')}-{hp.replace('_', '-')} {v}" for hp, v in kw.items()
                              if hp != "variant")
            raise ValueError(f"merge {method} ({flags}): {e}") from None


def check_pretrained_file(value: str | None, flag: str = "--pretrained") -> str | None:
    """For a ``value`` that names a file (has a path separator or a weights suffix), its content hash
    (``sha256:<hex>``, see :func:`talos.io.file_sha256`); None for a tag. ValueError when the file is missing."""
    if not value or value == "none":
        return None
    looks_like_path = os.sep in value or "/" in value or value.endswith(WEIGHT_SUFFIXES)
    if not (looks_like_path or os.path.exists(value)):
        return None
    if not os.path.isfile(value):
        raise ValueError(f"{flag} {value}: no such file (give an existing checkpoint file or a pretrained tag)")
    from ..io import file_sha256

    return "sha256:" + file_sha256(value)


def check_model_dir(value: str | None) -> str | None:
    """For a ``value`` that is a local model folder, the content hash of its weights and config
    (``sha256:<hex>`` over each such file's name and :func:`talos.io.file_sha256`); None otherwise (a hub id or
    a named config), so replacing the folder's weights gives a new run."""
    if not value or not os.path.isdir(value):
        return None
    from ..io import file_sha256

    files = sorted(f for f in os.listdir(value) if f.endswith(WEIGHT_SUFFIXES) or f == "config.json")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        raise ValueError(f"--model {value}: a folder without weights ({', '.join(WEIGHT_SUFFIXES)} files)")
    lines = "\n".join(f"{f}:{file_sha256(os.path.join(value, f))}" for f in files)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def nvidia_gpu_present() -> bool:
    """True when the machine shows an NVIDIA GPU to the OS (driver device nodes), whether or not torch's CUDA
    loads: a run there that finds no CUDA is broken, not a CPU machine."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def resolve_device(cfg: "Config") -> None:
    """Fill ``--device`` (cuda if available) and ``--precision`` (bf16 autocast on CUDA, fp32 elsewhere).

    Never falls back silently: ``--device cuda`` without a working CUDA is an error, and so is the default on
    a machine that has an NVIDIA GPU whose CUDA fails to load (pass ``--device cpu`` to mean the CPU).
    """
    import torch

    if cfg.device is None:
        if torch.cuda.is_available():
            cfg.device = "cuda"
        elif nvidia_gpu_present():
            raise ValueError("this machine has an NVIDIA GPU but torch cannot use CUDA (torch "
                             f"{torch.__version__}, built for CUDA {torch.version.cuda}); fix the CUDA install, or "
                             "pass --device cpu to run on the CPU on purpose")
        else:
            cfg.device = "cpu"
    dev = str(cfg.device)
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
    if cfg.precision is None:
        cfg.precision = "bf16" if dev.startswith("cuda") else "fp32"


def describe_device(cfg: "Config") -> str:
    """One line naming the device (with the GPU's name) and the precision, printed first by every script."""
    import torch

    dev = str(cfg.device)
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else dev
    return f"device: {dev} ({name}), precision: {cfg.precision}"
