"""What a wheel holds: every Python module of the source tree, at its import path.

`pip install .` (not editable) installs only the packages pyproject.toml lists; a subpackage missing
from the list is missing from every installed copy, while editable installs (the tests' own) still find
it. setuptools' build_py, which fills the wheel, is the oracle, run on a clean copy of the sources: in a
checkout with an egg-info folder left by an editable install, setuptools also picks up unlisted
subpackages as package data, which a clean build does not.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {"alphalora": "alphalora", "serving": "alphalora/serving"}  # folder -> where it installs


def test_every_source_module_is_in_the_wheel(tmp_path):
    source, built = tmp_path / "source", tmp_path / "built"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.egg-info")
    for folder in ("alphalora", "serving", "csrc"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(built)], cwd=source,
                   check=True, capture_output=True, timeout=300)
    found = {str(p.relative_to(built)) for p in built.rglob("*.py")}
    expected = {str(Path(installed) / p.relative_to(ROOT / folder))
                for folder, installed in SOURCE_ROOTS.items() for p in (ROOT / folder).rglob("*.py")}
    assert expected - found == set(), "modules a non-editable install would lack: list their packages in pyproject.toml"
    assert "alphalora/allocation/hetero/search.py" in found
