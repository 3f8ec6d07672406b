"""The compiled library shares torch's C++ runtime instead of carrying one that torch's can interpose."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from alphalora import ops


def _compiled_library_path() -> str:
    if not ops.HAS_COMPILED_OPS:
        pytest.skip("the compiled library is not loaded")
    import alphalora._C

    return alphalora._C.__file__


def test_no_cxx_runtime_is_exported_from_the_extension():
    """A statically linked libstdc++ exported from _C (a custom GCC or -static-libstdc++ can do that)
    gets half its calls bound to torch's copy; formatting an integer into an error then crashed."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    exported = subprocess.run([nm, "-D", "--defined-only", _compiled_library_path()], check=True,
                              capture_output=True, text=True).stdout
    runtime = [line for line in exported.splitlines() if line.endswith(("_ZNSt6locale7classicEv",
                                                                        "_ZNSo9_M_insertIlEERSoT_"))]
    assert not runtime, f"_C exports libstdc++'s own symbols: {runtime}"


def test_errors_format_integers():
    _compiled_library_path()  # the reference ops' message is their own
    with pytest.raises(RuntimeError, match=r"expert id 7 is outside \[0, 5\)"):
        torch.ops.alphalora.moe_permute(torch.tensor([0, 7]), 5, True)
