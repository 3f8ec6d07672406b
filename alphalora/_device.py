"""The device work runs on when the user names none."""

from __future__ import annotations


def default_device() -> str:
    """The GPU where torch sees one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
