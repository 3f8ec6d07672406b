"""Benchmark scripts that other benchmark scripts build on, imported by file: `serving.py` shares its
name with the project's `serving` package, so a plain `import serving` could find the wrong one."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module named NAME_bench."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
