"""Running the CUDA code paths on a machine without a GPU: fake tensors that say they live on `cuda:0`.

`FakeTensorMode` computes every op's output device, dtype and shape without computing values, and
refuses ops that mix devices; so a step of the engine, a layer's forward and backward or a spectral
batch run here on "GPU" tensors show every tensor that would land on the wrong device or in the
wrong dtype on a real GPU. Four things a CPU-only build of torch lacks are filled in for the
duration of `fake_cuda()`:

- a CUDA device guard (Python indexing of a CUDA tensor opens one): the no-op guard of the meta
  device is lent to CUDA; a device named without an index ("cuda") resolves to `meta` through it,
  so the tests name `cuda:0`, and anything the code moves to a bare "cuda" fails loudly;
- pinned memory: `Tensor.pin_memory` returns the tensor itself, remembered as pinned;
- the GPU's generation (`torch.cuda.get_device_capability`): an A100's (8, 0);
- values: a data-dependent read (`.item()`, `bool()`, `.tolist()`, `nonzero`, `bincount`) gets a
  placeholder of the right type, shape and device (zeros; True for a bool), so the host-side logic
  goes on, with meaningless values: these tests check where tensors are, never what they hold.

`DeviceAudit` adds what fake tensors do not check: a custom op's fake kernel takes inputs on any
device, and a computation that never meets a CUDA tensor runs on the CPU without complaint. It also
lists every read of GPU values by the host (`host_reads`: the placeholders above, one per `.tolist()`,
and each blocking copy to the host), since on a GPU each one makes the host wait for the device.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_CUDA_SLOT, _META_SLOT = 1, 14  # c10::DeviceType::CUDA and ::Meta, indices of the device guard registry
_GUARD_REGISTRY = "_ZN3c104impl26device_guard_impl_registryE"
# Ops that only move data between host and device, or make a host tensor from numpy: not CPU compute
# (nor are views).
_TRANSFERS = {"aten.lift_fresh.default", "aten._to_copy.default", "aten.to.dtype_layout", "aten.to.device",
              "aten.to.dtype", "aten.to.other", "aten.copy_.default", "prim.device.default"}


class DeviceAudit(TorchDispatchMode):
    """Fails an op that mixes CUDA tensors with (non-scalar) CPU ones, and records CPU compute, copies
    with `non_blocking=True` from unpinned host memory, device-to-host copies that do not wait, and reads
    of device values by the host."""

    def __init__(self, pinned: dict[int, torch.Tensor]):
        super().__init__()
        self.pinned = pinned  # by id (tensors compare elementwise), the tensors kept so that ids stay theirs
        self.cpu_compute: list[str] = []
        self.unsafe_copies: list[str] = []
        self.host_to_device: list[str] = []  # every copy from host memory to the GPU, safe or not
        self.host_reads: list[str] = []  # every read of GPU values by the host: each waits for the GPU

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        placeholder = _placeholder(func, args, kwargs)
        if placeholder is not None:
            self.host_reads.append(name)
            return placeholder
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if t.dim() > 0}
        if "cuda" in devices and len(devices) > 1 and name not in _TRANSFERS:  # (a copy between them is no mix)
            shapes = [(t.device.type, tuple(t.shape), t.dtype) for t in tensors]
            raise AssertionError(f"{name} mixes devices: {shapes}")
        if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True and name.startswith("aten.copy_")):
            source = args[1] if name.startswith("aten.copy_") else args[0]
            target = kwargs.get("device") or (args[0].device if name.startswith("aten.copy_") else None)
            if source.device.type == "cpu" and id(source) not in self.pinned:
                self.unsafe_copies.append(f"{name}: non_blocking host-to-device copy from unpinned memory")
            if source.device.type == "cuda" and target is not None and torch.device(target).type == "cpu":
                self.unsafe_copies.append(f"{name}: non_blocking device-to-host copy (read before a synchronize?)")
        out = func(*args, **kwargs)
        if name in _TRANSFERS and _copies_to_the_gpu(name, args, kwargs, out):
            self.host_to_device.append(name)
        if name in _TRANSFERS and _copies_to_the_host(name, args, out):
            self.host_reads.append(name)
        if devices == {"cpu"} and name not in _TRANSFERS and not getattr(func, "is_view", False):
            self.cpu_compute.append(name)
        return out


def _copies_to_the_gpu(name: str, args, kwargs, out) -> bool:
    """Whether a transfer op moved host memory to the GPU (its source on the CPU, its result on CUDA)."""
    source = args[1] if name.startswith("aten.copy_") else (args[0] if args else None)
    target = args[0] if name.startswith("aten.copy_") else out
    return isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor) and source.dim() > 0 \
        and source.device.type == "cpu" and target.device.type == "cuda"


def _copies_to_the_host(name: str, args, out) -> bool:
    """Whether a transfer op moved GPU memory to the host (the host then waits for the GPU to reach it)."""
    source = args[1] if name.startswith("aten.copy_") else (args[0] if args else None)
    target = args[0] if name.startswith("aten.copy_") else out
    return isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor) \
        and source.device.type == "cuda" and target.device.type == "cpu"


def _placeholder(func, args, kwargs):
    """A stand-in result for an op whose output depends on values (None for every other op)."""
    if func is torch.ops.aten._local_scalar_dense.default:
        return {torch.bool: True}.get(args[0].dtype, 0 if not args[0].is_floating_point() else 0.0)
    if func is torch.ops.aten.nonzero.default:
        return torch.empty(0, args[0].dim(), dtype=torch.long, device=args[0].device)
    if func is torch.ops.aten.bincount.default:
        minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
        return torch.zeros(minlength, dtype=torch.long, device=args[0].device)
    return None


def _fake_tolist(tensor: torch.Tensor):
    """`tolist` of a fake tensor: zeros (True for a bool tensor) in its shape."""
    value = True if tensor.dtype == torch.bool else (0.0 if tensor.is_floating_point() else 0)
    nested = value
    for size in reversed(tensor.shape):
        nested = [nested] * size if not isinstance(nested, list) else [list(nested) for _ in range(size)]
    return nested


@contextlib.contextmanager
def _cuda_device_guard() -> Iterator[None]:
    """Lends the meta device's no-op guard to CUDA where this torch has none (a CPU-only build)."""
    if torch.cuda.is_available():
        yield
        return
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
        registry = (ctypes.c_void_p * (_META_SLOT + 1)).in_dll(library, _GUARD_REGISTRY)
    except (OSError, ValueError) as error:
        pytest.skip(f"this torch's device guard registry cannot be reached ({error})")
    if registry[_META_SLOT] is None:
        pytest.skip("this torch registers no meta device guard to lend to CUDA")
    previous = registry[_CUDA_SLOT]
    if previous is None:
        registry[_CUDA_SLOT] = registry[_META_SLOT]
    try:
        yield
    finally:
        registry[_CUDA_SLOT] = previous


@contextlib.contextmanager
def fake_cuda(monkeypatch) -> Iterator[DeviceAudit]:
    """Fake tensors on `cuda:0` (see the module's docstring); yields the audit, active inside.

    Modules built before entering are real CPU tensors: moving them to `CUDA` inside makes them fake.
    Safetensors files are read for real (fake tensors have no storage to read into)."""
    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
    pinned: dict[int, torch.Tensor] = {}

    def pin_memory(tensor, *args, **kwargs):
        pinned[id(tensor)] = tensor
        return tensor

    import safetensors.torch

    import alphalora.adapters.io as adapter_io

    real_load_file = safetensors.torch.load_file

    def load_file(*args, **kwargs):
        with _disable_current_modes():  # the audit's and the fake mode: a real read on the CPU
            return real_load_file(*args, **kwargs)

    def tolist(tensor):  # (one transfer to the host, as on a GPU; FakeTensor's own reads element by element)
        audit.host_reads.append("Tensor.tolist")
        return _fake_tolist(tensor)

    # One-element host tensors would be kept as constants and copied to the (absent) device for real.
    monkeypatch.setattr(fake_tensor, "CONSTANT_NUMEL_LIMIT", 0)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    # Libraries choose kernels by the GPU's generation (transformers' grouped experts): an A100's.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(fake_tensor.FakeTensor, "tolist", tolist)
    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    monkeypatch.setattr(adapter_io, "load_file", load_file)
    audit = DeviceAudit(pinned)
    with _cuda_device_guard(), fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        _probe()
        with audit:
            yield audit


def _probe() -> None:
    """Skips the test where this torch cannot index a fake CUDA tensor."""
    try:
        probe = torch.zeros(4, device=CUDA)
        probe[1:3] = probe[torch.tensor([0], device=CUDA)]
    except Exception as error:  # noqa: BLE001 - whatever this torch version raises, the test cannot run
        pytest.skip(f"FakeTensorMode cannot run CUDA tensors with this torch ({type(error).__name__}: {error})")


def assert_on_device(tensors, device: torch.device = CUDA, dtype: torch.dtype | None = None) -> None:
    """Every tensor in a (nested) structure is on `device` (and in `dtype` where given)."""

    def check(tensor):
        if isinstance(tensor, torch.Tensor):
            assert tensor.device == device, f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, not {device}"
            assert dtype is None or tensor.dtype == dtype, f"{tuple(tensor.shape)} is {tensor.dtype}, not {dtype}"
        return tensor

    tree_map(check, tensors)
