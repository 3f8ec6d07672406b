"""Numbers as callers pass them: numpy scalars read as the Python numbers they hold, and the checks of what a
numeric option may be (finite, not a bool, positive)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def python_scalar(value: Any) -> Any:
    """A numpy scalar (np.int64, np.float32, np.bool_, ...) as the Python int, float or bool it holds; anything
    else as it is. (np.float64 is a float already; np.float32 and the numpy integers are not ints or floats, and
    would otherwise be refused by type checks or written into JSON as strings.)"""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


def takes_numpy_scalars(function: F) -> F:
    """`function` called with every numpy scalar argument as the Python number it holds (arrays, lists and
    everything else as given): researchers pass np.int64 and np.float32 values all the time."""

    @functools.wraps(function)
    def with_python_numbers(*args, **kwargs):
        return function(*map(python_scalar, args), **{name: python_scalar(value) for name, value in kwargs.items()})

    return with_python_numbers  # type: ignore[return-value]


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_positive_number(value: Any) -> bool:
    return is_number(value) and value > 0
