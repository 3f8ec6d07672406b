"""The project's CUDA kernels and their torch bindings, compiled for the CPU against an emulated CUDA.

`csrc/tests/cuda_emulation/` implements the device API the kernels use (threads as fibers, block and
warp barriers, warp shuffles, bfloat16/float16) and stands in for the toolkit's and c10's CUDA
headers. This module copies the sources with the two things a C++ compiler cannot read rewritten
(`kernel<<<grid, block, shared, stream>>>(args)` launches, `extern __shared__` arrays), renames the
op library to `alphalora_cuda_emulated` and registers the CUDA bindings (`*_cuda_dispatch.cpp`)
there for CPU tensors, then builds one shared library with g++. So every CUDA op runs, binding and
kernel, on CPU tensors beside its CPU kernel: `ops().grouped_lora_shrink(...)` against
`torch.ops.alphalora.grouped_lora_shrink(...)`. cuSOLVER's solve (`eigvalsh_batched`) is not
emulated. The library is cached under `build/cuda_emulation/` by a hash of its inputs.

Two variants: built with AddressSanitizer, every read or write of a kernel outside its tensors is an error
(`sanitized_environment`); built in place, the CUDA bindings register as the CPU kernels of the `alphalora`
ops themselves, so that the layers, the engine and the analysis compute with them (`use_in_place`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
EMULATION = CSRC / "tests" / "cuda_emulation"
NAMESPACE = "alphalora_cuda_emulated"
# Bindings that call a CUDA library rather than the project's kernels: not emulated.
NOT_EMULATED = {"eigvalsh_cuda_dispatch.cpp"}
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-ffp-contract=off", "-w",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]

SANITIZE = ["-fsanitize=address", "-fno-omit-frame-pointer"]

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<")


def compiler() -> str | None:
    """The C++ compiler that builds the emulation ($CXX, else g++), or None where there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def unavailable() -> str | None:
    """Why the emulation cannot be built and compared here, or None."""
    from alphalora import ops as alphalora_ops

    if not alphalora_ops.HAS_COMPILED_OPS:
        return "the emulated CUDA kernels are checked against (or replace) the compiled CPU kernels, not loaded"
    if compiler() is None:
        return "the CUDA emulation needs a C++ compiler: install g++ or set CXX"
    return None


requires_emulation = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


def _matching_paren(text: str, open_index: int) -> int:
    depth = 0
    for index in range(open_index, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced parentheses from offset {open_index}")


def rewrite_launches(source: str) -> str:
    """`kernel<T><<<grid, block[, shared[, stream]]>>>(args)` -> `::cuda_emulation::launch(dim3(grid),
    dim3(block), shared, stream, [&] { kernel<T>(args); })`."""
    out, position = [], 0
    for match in _LAUNCH.finditer(source):
        if match.start() < position:
            continue
        config_end = source.index(">>>", match.end())
        config = [part.strip() for part in _split_top_level(source[match.end():config_end])]
        if not 2 <= len(config) <= 4:
            raise ValueError(f"launch of {match.group(1)} with {len(config)} configuration values")
        config += ["0", "nullptr"][len(config) - 2:]
        open_index = source.index("(", config_end)
        close_index = _matching_paren(source, open_index)
        call = f"{match.group(1)}{source[open_index:close_index + 1]}"
        out.append(source[position:match.start()])
        out.append(f"::cuda_emulation::launch(dim3({config[0]}), dim3({config[1]}), {config[2]}, {config[3]}, "
                   f"[&] {{ {call}; }})")
        position = close_index + 1
    out.append(source[position:])
    return "".join(out)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        depth += {"(": 1, ")": -1, "<": 1, ">": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def rewrite_dynamic_shared(source: str) -> str:
    """`extern __shared__ T name[];` -> a pointer to the block's dynamic shared memory."""
    return re.sub(r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\s*\[\s*\]\s*;",
                  r"\1* \2 = static_cast<\1*>(::cuda_emulation::dynamic_shared());", source)


def emulated_sources(in_place: bool = False) -> dict[str, str]:
    """Relative path in the build -> source text, rewritten for the emulation. in_place: the CUDA bindings
    take the place of the CPU kernels of the `alphalora` ops themselves (see `use_in_place`)."""
    sources: dict[str, str] = {}
    if not in_place:
        ops = (CSRC / "ops.cpp").read_text()
        sources["ops.cpp"] = ops.replace("TORCH_LIBRARY(alphalora,", f"TORCH_LIBRARY({NAMESPACE},")
    registration = "TORCH_LIBRARY_IMPL(alphalora, CPU," if in_place else f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,"
    for path in sorted(CSRC.glob("*/*.cu")):
        text = rewrite_dynamic_shared(rewrite_launches(path.read_text()))
        sources[f"{path.parent.name}/{path.stem}_cu.cpp"] = text
    for path in sorted(CSRC.glob("*/*_cuda_dispatch.cpp")):
        if path.name in NOT_EMULATED:
            continue
        text = path.read_text().replace("TORCH_LIBRARY_IMPL(alphalora, CUDA,", registration)
        sources[f"{path.parent.name}/{path.name}"] = text
    sources["emulated_cuda.cpp"] = (EMULATION / "emulated_cuda.cpp").read_text()
    sources["emulation_ops.cpp"] = rewrite_dynamic_shared((EMULATION / "emulation_ops.cpp").read_text())
    return sources


def _fingerprint(sources: dict[str, str], flags: list[str]) -> str:
    digest = hashlib.sha256()
    headers = sorted([*CSRC.glob("**/*.h"), *CSRC.glob("**/*.cuh")])
    for name, text in [*sorted(sources.items()), *((str(h.relative_to(REPO)), h.read_text()) for h in headers)]:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    digest.update(" ".join(flags + [torch.__version__, sys.version]).encode())
    return digest.hexdigest()[:16]


def _include_flags() -> list[str]:
    # The stand-in headers first, so that they shadow the toolkit's and c10's CUDA headers.
    flags = [f"-I{EMULATION / 'include'}", f"-I{EMULATION}", f"-I{CSRC}"]
    flags += [f"-I{directory}" for directory in sorted({p.parent for p in CSRC.glob("*/*.h")})]
    flags += [f"-isystem{path}" for path in cpp_extension.include_paths()]
    return flags + [f"-isystem{sysconfig.get_paths()['include']}"]


def build(sanitize: bool = False, in_place: bool = False) -> Path:
    """The shared library's path, compiled on first use (about a minute on two cores). sanitize: with
    AddressSanitizer, for a process that preloads its runtime (`asan_runtime()`); in_place: see
    `emulated_sources`."""
    sources = emulated_sources(in_place)
    flags = FLAGS + (SANITIZE if sanitize else [])
    name = f"lib{NAMESPACE}{'_in_place' if in_place else ''}.so"
    target = REPO / "build" / "cuda_emulation" / _fingerprint(sources, flags) / name
    if target.exists():
        return target
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    cxx, include_flags = compiler(), _include_flags()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        objects = []
        for relative, text in sources.items():
            source = Path(work) / relative
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_text(text)
            objects.append(source.with_suffix(".o"))

        def compile_one(obj: Path) -> None:
            command = [cxx, *flags, *include_flags, "-c", str(obj.with_suffix(".cpp")), "-o", str(obj)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling {obj.with_suffix('.cpp').name} for the CUDA emulation failed:\n"
                                   f"{result.stderr[-4000:]}")

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(compile_one, objects))
        torch_lib = Path(torch.__file__).parent / "lib"
        partial = Path(work) / target.name
        link = [cxx, "-shared", *flags, *map(str, objects), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10",
                "-ltorch_cpu", "-o", str(partial)]
        result = subprocess.run(link, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"linking the CUDA emulation failed:\n{result.stderr[-4000:]}")
        os.replace(partial, target)  # whole or not at all, for a run that reads the cache next
    return target


SANITIZE_VARIABLE = "ALPHALORA_EMULATION_ASAN"  # "1": load the AddressSanitizer build (runtime preloaded)
IN_PLACE_VARIABLE = "ALPHALORA_CUDA_KERNELS_ON_CPU"  # "1": tests/conftest.py calls use_in_place()
_loaded: Path | None = None


def ops():
    """`torch.ops.alphalora_cuda_emulated`, its library built and loaded (the AddressSanitizer build where
    ALPHALORA_EMULATION_ASAN=1, in a process that preloads the runtime: see `sanitized_environment`)."""
    global _loaded
    if _loaded is None:
        _loaded = build(sanitize=os.environ.get(SANITIZE_VARIABLE) == "1")
        torch.ops.load_library(str(_loaded))
    return getattr(torch.ops, NAMESPACE)


def _compiler_library(name: str) -> Path | None:
    cxx = compiler()
    if cxx is None:
        return None
    found = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return Path(found).resolve() if os.path.isabs(found) and Path(found).exists() else None


def asan_runtime() -> Path | None:
    """The compiler's AddressSanitizer runtime library, or None where it has none."""
    return _compiler_library("libasan.so")


def sanitized_environment(runtime: Path) -> dict[str, str]:
    """The environment of a process whose emulated kernels run under AddressSanitizer: its runtime preloaded
    (it must come first in a process that Python starts), then the C++ runtime, whose exception handling
    AddressSanitizer wraps when it starts (loaded later with torch, the first C++ exception ends the
    process); leaks are not reported (Python's are not the kernels')."""
    preload = [str(runtime)] + [str(p) for p in [_compiler_library("libstdc++.so")] if p is not None]
    return {**os.environ, "LD_PRELOAD": " ".join(preload), SANITIZE_VARIABLE: "1",
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1"}


def use_in_place() -> None:
    """Makes the CUDA kernels (emulated) the CPU kernels of the `alphalora` ops in this process: the layers,
    training and the serving engine then run on them with their CPU tensors, values and all. Torch warns that
    kernels were overridden. For a child process (IN_PLACE_VARIABLE=1), never in the test run itself: there is
    no way back."""
    torch.ops.load_library(str(build(in_place=True)))  # (build refuses where there are no compiled CPU kernels)
    # In place or not at all: the CPU kernels refuse ids out of range even unvalidated and a slot outside the KV
    # cache, where the CUDA kernels list the ids and give a NaN row.
    q, cache, length = torch.zeros(1, 1, 4), torch.zeros(2, 1, 4), torch.tensor([1])
    try:
        torch.ops.alphalora.moe_permute(torch.tensor([0, 7]), 5, False)
        torch.ops.alphalora.paged_decode_attention(q, cache, cache, torch.tensor([[5]]), length, length * 0, 1.0)
    except RuntimeError as error:
        raise RuntimeError("the emulated CUDA kernels did not replace the CPU kernels") from error
