"""Numbers as callers pass them: numpy scalars read as the Python numbers they hold."""

from __future__ import annotations

from typing import Any


def python_scalar(value: Any) -> Any:
    """A numpy scalar (np.int64, np.float32, np.bool_, ...) as the Python int, float or bool it holds; anything
    else as it is. (np.float64 is a float already; np.float32 and the numpy integers are not ints or floats, and
    would otherwise be refused by type checks or written into JSON as strings.)"""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value
