"""The device work runs on: the default one, or a named one checked before anything loads."""

from __future__ import annotations

DEVICE_TYPES = ("cpu", "cuda")
DEVICE_CHOICES = "cpu, cuda or cuda:N"


def default_device() -> str:
    """The GPU where torch sees one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device, error: type[Exception] = ValueError) -> str:
    """`device` (a name or torch.device; None: the default one) checked to be a CPU or a CUDA GPU torch sees;
    anything else raises `error` naming the problem and the fix."""
    import torch

    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise error(f"unknown device {str(device)!r}; choose {DEVICE_CHOICES}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"device {str(device)!r} was asked for but torch sees no CUDA GPU; use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise error(f"device {str(device)!r} does not exist: torch sees {count} CUDA GPU(s), cuda:0 to "
                        f"cuda:{count - 1}")
    return str(parsed)
