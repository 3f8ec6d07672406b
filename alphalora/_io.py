"""Atomic file writes: a reader never sees a half-written report, plan or adapter file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; if the block succeeds, the file is flushed to disk and
    renamed over `path`, and the rename itself flushed (the folder fsynced).

    The file gets the mode open() would give `path` (0o666 less the umask), even where the writer
    replaced the temporary file with one of its own (safetensors writes 0o600 files); tempfile.mkstemp's
    0o600 used to leave every plan, report and adapter readable by its owner only.

    A symbolic link is written through (the file it names is replaced, the link stays); a path that holds
    something other than a regular file (a device such as /dev/null, a pipe) is refused: the rename would
    replace it with a file.
    """
    target = _regular_file_target(Path(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    with _naming(target):
        tmp = _create_beside(target)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the kernel made of 0o666 and the umask
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        with _naming(target):
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(target.parent)


def _regular_file_target(path: Path) -> Path:
    """The file a write to `path` replaces: a link's target; OSError where that is no regular file."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.exists() and not target.is_file() and not target.is_dir():
        raise OSError(errno.EINVAL, "Not a regular file (a device or pipe): give the path of a file to write",
                      str(path))
    return target


@contextlib.contextmanager
def _naming(target: Path) -> Iterator[None]:
    """An OSError about the hidden temporary file is reported as one about `target`, the path the user gave."""
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise
        raise type(error)(error.errno, error.strerror, str(target)) from error


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """Raises OSError (naming `path`) now, before long work, where a file (or, with `folder`, a folder) could
    not be written there later: the path is a folder where a file is wanted (or the other way round), or its
    nearest existing parent folder is not writable."""
    target = Path(path)
    if not folder:
        target = _regular_file_target(target)
    if target.exists() and target.is_dir() != folder:
        errno_, reason = (errno.ENOTDIR, "Not a directory") if folder else (errno.EISDIR, "Is a directory")
        raise OSError(errno_, reason, str(target))
    parent = target if folder and target.exists() else target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OSError(errno.ENOTDIR, "Not a directory", str(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, "Permission denied", str(target))


def _create_beside(target: Path) -> Path:
    """A new empty file next to `target`, created (O_EXCL) with mode 0o666 & ~umask."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {target}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name where it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_json(path: str | os.PathLike, what: str, how_to_create: str, error: type[Exception]) -> Any:
    """Parses a JSON file, raising `error` with a message that says what is wrong and how to fix it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))  # (a byte-order mark, as editors write)
    except FileNotFoundError as missing:
        raise error(f"{what} {path} does not exist; create it with {how_to_create}") from missing
    except UnicodeDecodeError as bad:
        raise error(f"{what} {path} is not UTF-8 text (byte {bad.start} cannot be decoded): save it as UTF-8, or "
                    f"create it again with {how_to_create}") from bad
    except json.JSONDecodeError as bad:
        raise error(f"{what} {path} is not valid JSON: {bad}") from bad


def check_format_version(data: Any, expected: int, what: str, how_to_create: str, error: type[Exception]) -> None:
    """Raises `error` unless `data` is a dict carrying format_version == expected."""
    if not isinstance(data, dict) or "format_version" not in data:
        raise error(f"not an alphalora {what}: no format_version field")
    if data["format_version"] != expected:
        raise error(f"{what} format_version {data['format_version']} is not supported (expected {expected}); "
                    f"re-create it with {how_to_create}")
