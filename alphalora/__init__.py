"""AlphaLoRA: where a model needs adapter capacity, and the adapters that put it there."""

from .allocation import Plan, allocate
from .spectral import SpectralReport, analyze

__version__ = "0.1.0"
__all__ = ["Plan", "SpectralReport", "__version__", "allocate", "analyze"]
