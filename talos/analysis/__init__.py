"""The paper's figures from run folders: computations (:mod:`.compute`), drawings (:mod:`.plots`), the
gradient-drift recorder (:mod:`.drift`) and the figure registry + driver of ``<domain>/analyze.py``
(:mod:`.figures`). Domain-agnostic: a domain supplies an :class:`AnalysisDomain` adapter."""
from .compute import (SPARSITIES, XI_ALPHAS, accuracy_ratios, combination, disentanglement, kind_of, layer_of,
                      linearized_behaviour, mask_stats, prune_edit, sensitivity_transfer)
from .drift import DRIFT_FILE, GradientDrift, drift_path
from .figures import (FIGURES, AnalysisDomain, EditPredictor, FigureContext, FigureSpec, LoadedModel, figure_run,
                      run_figure)

__all__ = ["SPARSITIES", "XI_ALPHAS", "accuracy_ratios", "combination", "disentanglement", "kind_of", "layer_of",
           "linearized_behaviour", "mask_stats", "prune_edit", "sensitivity_transfer", "DRIFT_FILE", "GradientDrift",
           "drift_path", "FIGURES", "AnalysisDomain", "EditPredictor", "FigureContext",
           "FigureSpec", "LoadedModel", "figure_run", "run_figure"]
