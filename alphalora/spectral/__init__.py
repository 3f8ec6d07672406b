"""Heavy-tailed self-regularisation analysis: ESDs, power-law alphas per matrix and per layer."""

from .analyze import AnalysisError, analyze
from .estimators import ESTIMATORS, FitOutcome, fit_spectra
from .report import LayerReport, MatrixReport, ReportFormatError, SpectralReport

__all__ = [
    "ESTIMATORS",
    "AnalysisError",
    "FitOutcome",
    "LayerReport",
    "MatrixReport",
    "ReportFormatError",
    "SpectralReport",
    "analyze",
    "fit_spectra",
]
