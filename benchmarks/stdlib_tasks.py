"""Real-text tasks built offline from the Python installation's own standard library.

`docstring_module_task`: which standard-library module does a function's or class's docstring
come from? Real English technical text, labels that need reading, nothing downloaded, and the
same data on every machine with the same Python version.
`stdlib_source_text`: lines of the standard library's own source, for causal-LM runs.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sysconfig
from pathlib import Path

DEFAULT_MODULES = ("os", "re", "json", "pathlib", "subprocess", "logging", "datetime", "collections",
                   "email.message", "http.client", "urllib.parse", "tarfile")


def _first_paragraph(doc: str, max_words: int) -> str:
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(paragraph.split()[:max_words])


def docstring_module_task(modules=DEFAULT_MODULES, test_fraction: float = 0.25, max_words: int = 48,
                          min_words: int = 4) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, test rows, label names): {"text": first docstring paragraph, "label": module}."""
    rows, seen = [], set()
    for name in modules:
        module = importlib.import_module(name)
        for attribute, member in sorted(vars(module).items()):
            if attribute.startswith("_") or not (inspect.isfunction(member) or inspect.isclass(member)):
                continue
            if getattr(member, "__module__", None) != module.__name__:
                continue  # re-exported from elsewhere
            members = [member] + [m for k, m in sorted(vars(member).items())
                                  if inspect.isclass(member) and inspect.isfunction(m) and not k.startswith("_")]
            for item in members:
                doc = inspect.getdoc(item)
                if not doc:
                    continue
                text = _first_paragraph(doc, max_words)
                if len(text.split()) < min_words or text in seen:
                    continue
                seen.add(text)
                rows.append({"text": text, "label": name})
    # A split by hash of the text: stable across runs and machines, independent of order.
    def is_test(row):
        return int(hashlib.sha256(row["text"].encode()).hexdigest(), 16) % 1000 < test_fraction * 1000
    return [r for r in rows if not is_test(r)], [r for r in rows if is_test(r)], list(modules)


def stdlib_source_text(package: str = "json", max_lines: int | None = None) -> list[str]:
    """Non-empty source lines of a standard-library package, file by file in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    lines = [line.rstrip() for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:max_lines] if max_lines else lines
