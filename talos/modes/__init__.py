"""Fine-tuning modes (``--finetuning-mode``): one file per method, registered in ``MODES``.

To add a method: subclass :class:`FinetuneMode` in a new file here (override ``masks`` for a new mask,
``prepare`` for a new parametrisation), decorate it with ``@register_mode``, and import the file below.
"""
from .base import (MODES, FinetuneMode, ModeContext, SparseSettings, TrainState, get_mode, global_lowest,
                   register_mode, run_order)

from . import standard, talos_mode, linear, lora, lota, ablations, imported  # noqa: E402,F401  (registration)

__all__ = ["MODES", "FinetuneMode", "ModeContext", "SparseSettings", "TrainState", "get_mode", "global_lowest", "register_mode",
           "run_order"]
