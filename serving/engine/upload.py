"""Many small host arrays moved to the device as one copy.

A step reads a few dozen small index and gate arrays (token ids, KV slots, routing layouts). Copied
one by one, each is a transfer, and on a GPU a transfer from pageable memory blocks the host until
it lands. Here they are packed into one byte buffer (each array at an 8-byte aligned offset, so any
dtype can be viewed in place) and copied once; on CUDA from pinned memory without blocking, so the
host goes on queueing the step's kernels. On the CPU the "device" tensors are views of the buffer.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 8


def upload(arrays: dict[str, np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Each array as a tensor on `device` with its own dtype and shape, all views of one copy."""
    device = torch.device(device)
    offsets, end = [], 0
    for array in arrays.values():
        offsets.append(end)
        end += -(-array.nbytes // _ALIGN) * _ALIGN
    packed = np.empty(max(end, _ALIGN), dtype=np.uint8)
    for offset, array in zip(offsets, arrays.values(), strict=True):
        packed[offset:offset + array.nbytes] = np.ascontiguousarray(array).view(np.uint8).ravel()
    flat = torch.from_numpy(packed)
    if device.type == "cuda":
        # The caching host allocator keeps the pinned buffer until the copy has run.
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    typed: dict[np.dtype, torch.Tensor] = {}  # the whole buffer seen as each dtype in use (one view each)
    tensors = {}
    for offset, (name, array) in zip(offsets, arrays.items(), strict=True):
        if array.dtype not in typed:
            typed[array.dtype] = flat.view(_TORCH_DTYPES[array.dtype.type])
        start = offset // array.itemsize
        tensor = typed[array.dtype][start:start + array.size]
        tensors[name] = tensor if array.ndim == 1 else tensor.view(array.shape)
    return tensors


_TORCH_DTYPES = {np.int64: torch.int64, np.int32: torch.int32, np.float32: torch.float32,
                 np.float64: torch.float64, np.bool_: torch.bool}
