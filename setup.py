"""Builds alphalora._C: the C++ kernels (OpenMP) always, the CUDA kernels when torch has CUDA.

CUDA is chosen from torch.version.cuda and CUDA_HOME, never from whether a GPU is visible,
so a GPU-less build machine with a CUDA toolkit still builds the CUDA kernels.
ALPHALORA_CUDA=0 forces a CPU-only build; ALPHALORA_CUDA=1 requires CUDA and fails loudly.
Build with `pip install --no-build-isolation .`: isolation would build against another torch.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "alphalora needs PyTorch installed before it is built. Run\n"
        "    pip install torch==2.13.0   (or the torch you use)\n"
        "    pip install --no-build-isolation .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _want_cuda() -> bool:
    flag = os.environ.get("ALPHALORA_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not available:
            sys.exit(
                "ALPHALORA_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
                "Install a CUDA build of torch and set CUDA_HOME, or unset ALPHALORA_CUDA."
            )
        return True
    if torch.version.cuda is not None and CUDA_HOME is None:
        print("alphalora: building the CPU kernels only: this torch has CUDA but no CUDA toolkit (nvcc, CUDA_HOME) "
              "was found. The ops will run on the GPU as slower pure-PyTorch references; install the toolkit, set "
              "CUDA_HOME and rebuild with ALPHALORA_CUDA=1 for the CUDA kernels.", file=sys.stderr)
    return available


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


# _C must not carry a second C++ runtime that torch's can interpose: where LDFLAGS or a custom GCC
# link libstdc++ statically, its symbols in _C resolve half to torch's shared copy and half to the
# private one, and TORCH_CHECK crashes formatting its first integer (seen with a toolchain in
# /opt/gcc). Link the shared runtime first, and keep whatever static archive still comes in private.
LINK_FLAGS = ["-fopenmp", "-lstdc++", "-Wl,--exclude-libs,ALL"]


def _extension():
    cpp = [s for s in _sources("csrc/**/*.cpp") if "/tests/" not in s and not s.endswith("_dispatch.cpp")]
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources = cpp + _sources("csrc/**/*_dispatch.cpp") + _sources("csrc/**/*.cu")
        return CUDAExtension(
            "alphalora._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=LINK_FLAGS,
            py_limited_api=True,
        )
    return CppExtension(
        "alphalora._C",
        cpp,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=LINK_FLAGS,
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
