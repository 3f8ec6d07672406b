"""AlphaLoRA: where a model needs adapter capacity, and the adapters that put it there."""

from .spectral import SpectralReport, analyze

__version__ = "0.1.0"
__all__ = ["SpectralReport", "__version__", "analyze"]
