"""Per-stage random streams: every random draw of a run comes from a seed derived from (seed, stage, position).

Why: a run resumed from any point must draw exactly what the uninterrupted run drew. With one global RNG a
skipped stage (a mask loaded from disk instead of calibrated) or another number of DataLoader workers
(each worker reseeds its own copy) shifts every later draw. Here each stage owns its stream:

* ``stream_seed(seed, "train-augment", epoch, index)`` seeds the augmentation of one example in one epoch
  (:class:`SeededDataset` reseeds python, numpy and torch around ``__getitem__``), so the worker that loads
  an example, and how many there are, no longer matter;
* ``stream_seed(seed, "dropout", step, rank)`` seeds dropout at each optimizer step (``talos.train``);
* calibration label draws use their own generator seeded from ``--seed`` (``talos.modes``) and calibration
  augmentations a :class:`SeededDataset` of stage ``"calibration"`` whose epoch is the calibration round.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["stream_seed", "seed_all", "SeededDataset", "EpochLoader"]


def stream_seed(seed: int, stage: str, *position: int) -> int:
    """A 63-bit seed determined by ``(seed, stage, *position)`` only (sha256: streams do not overlap)."""
    key = ":".join([str(int(seed)), stage, *(str(int(p)) for p in position)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (torch: every device) with one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeededDataset(torch.utils.data.Dataset):
    """``dataset[i]`` with the global RNGs seeded by ``stream_seed(seed, stage, epoch, i)`` while it loads.

    In the main process (``num_workers=0``) python's and torch's CPU states are restored afterwards, so loading
    does not disturb other streams; numpy's is left seeded by the example (saving it would cost more than
    most augmentations), which is why ``talos.train`` seeds dropout after a micro-batch is loaded. ``epoch`` is set by the
    training loop (or :class:`EpochLoader`) before each pass; workers get a copy with the current value.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int, stage: str, epoch: int = 0) -> None:
        self.dataset, self.seed, self.stage, self.epoch = dataset, int(seed), stage, int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = stream_seed(self.seed, self.stage, self.epoch, i)
        np.random.seed(s % 2**32)  # not restored: saving numpy's state costs ~0.3 ms an example
        if torch.utils.data.get_worker_info() is not None:  # a worker process: nothing else draws from it
            random.seed(s)
            torch.random.default_generator.manual_seed(s)
            return self.dataset[i]
        saved = (random.getstate(), torch.get_rng_state())
        try:
            random.seed(s)
            torch.random.default_generator.manual_seed(s)  # CPU only: no CUDA state to touch per example
            return self.dataset[i]
        finally:
            random.setstate(saved[0])
            torch.set_rng_state(saved[1])


class EpochLoader:
    """A re-iterable loader over a :class:`SeededDataset` whose k-th iteration loads with epoch k (e.g. one
    per calibration round: each round draws fresh augmentations, the same ones in every run)."""

    def __init__(self, make_loader: Any, dataset: SeededDataset) -> None:
        self.make_loader, self.dataset, self.passes = make_loader, dataset, 0

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.passes
        self.passes += 1
        return iter(self.make_loader(self.dataset))

    def __len__(self) -> int:
        return len(self.make_loader(self.dataset))
