"""TaLoS core library: Fisher scoring, mask calibration, masked AdamW, task vectors, protocols, runs and IO.

Everything here is domain-agnostic and keyed by parameter name; `vision/` and `nlp/` are thin adapters.
"""
from .calibration import (
    calibrate_masks,
    check_sparsity,
    format_mask_report,
    mask_density,
    mask_report,
    round_densities,
    soft_masked,
)
from .fisher import fisher_scores, fisher_scores_reference, register_per_example_rule
from .io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    load_tensors,
    load_tensors_with_metadata,
    read_json,
    save_tensors,
    torch_load,
)
from .optim import MaskedAdamW, freeze_masked_out, masked_state_bytes
from .paths import EvalRun, FinetuneRun, hparams_hash, head_path, slug
from .coefficients import (
    accuracy,
    choose_addition_coef,
    choose_negation_coef,
    coefficient_grid,
    disentanglement_error,
    normalized_accuracy,
    summarize_addition,
    summarize_negation,
)
from .registry import Registry
from .task_vector import TaskVector

__version__ = "0.1.0"

__all__ = [
    "EvalRun",
    "FinetuneRun",
    "MaskedAdamW",
    "Registry",
    "TaskVector",
    "accuracy",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "calibrate_masks",
    "check_sparsity",
    "choose_addition_coef",
    "choose_negation_coef",
    "coefficient_grid",
    "disentanglement_error",
    "fisher_scores",
    "fisher_scores_reference",
    "format_mask_report",
    "freeze_masked_out",
    "hparams_hash",
    "head_path",
    "load_tensors",
    "load_tensors_with_metadata",
    "mask_density",
    "mask_report",
    "masked_state_bytes",
    "normalized_accuracy",
    "read_json",
    "register_per_example_rule",
    "round_densities",
    "save_tensors",
    "slug",
    "soft_masked",
    "summarize_addition",
    "summarize_negation",
    "torch_load",
]
