"""Atomic file writes: a reader never sees a half-written report, plan or adapter file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def read_json(path: str | os.PathLike, what: str, how_to_create: str, error: type[Exception]) -> Any:
    """Parses a JSON file, raising `error` with a message that says what is wrong and how to fix it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as missing:
        raise error(f"{what} {path} does not exist; create it with {how_to_create}") from missing
    except json.JSONDecodeError as bad:
        raise error(f"{what} {path} is not valid JSON: {bad}") from bad


def check_format_version(data: Any, expected: int, what: str, how_to_create: str, error: type[Exception]) -> None:
    """Raises `error` unless `data` is a dict carrying format_version == expected."""
    if not isinstance(data, dict) or "format_version" not in data:
        raise error(f"not an alphalora {what}: no format_version field")
    if data["format_version"] != expected:
        raise error(f"{what} format_version {data['format_version']} is not supported (expected {expected}); "
                    f"re-create it with {how_to_create}")
