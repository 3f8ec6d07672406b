"""Atomic writes: files get the mode plain open() would give under the umask, reach the disk before they
replace the old file, and an output folder that cannot be written is a one-line CLI error."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from alphalora._io import write_text_atomic
from alphalora.adapters.io import save_adapter
from alphalora.adapters.peft_export import export_peft
from alphalora.allocation import Plan
from alphalora.cli import main
from tests.tiny_models import build, with_random_adapter


def _plan() -> Plan:
    return Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q", "v"], rank=2)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_plans_adapters_and_exports_get_the_umasks_mode(umask, tmp_path):
    """The oracle: a file created with open() under the same umask (0o666 & ~umask); mkstemp's 0o600 used to
    make every plan, adapter and export private to its owner."""
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        _plan().save(tmp_path / "plan.json")
        adapter = save_adapter(with_random_adapter(build("llama"), _plan()), tmp_path / "adapter")
        export = export_peft(adapter, tmp_path / "peft")
    finally:
        os.umask(old)
    expected = _mode(tmp_path / "plain")
    assert expected == 0o666 & ~umask
    written = [tmp_path / "plan.json", *sorted(adapter.iterdir()), *sorted(export.iterdir())]
    assert len(written) == 5  # the plan; the adapter's weights and config; the PEFT export's
    assert {str(p): _mode(p) for p in written} == {str(p): expected for p in written}
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file left behind


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd to name fsynced descriptors")
def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "plan.json"
    write_text_atomic(target, "{}\n")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    (_, synced), (_, src, dst), (_, folder) = events
    assert synced == src and dst == str(target) and folder == str(tmp_path)
    assert target.read_text() == "{}\n"


def test_an_output_path_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["allocate", "--method", "uniform", "--num-layers", "2", "--budget", "4",
                 "--out", str(blocker / "plan.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("alphalora allocate: error: ") and str(blocker) in err  # "File exists: .../file"
    adapter = save_adapter(with_random_adapter(build("llama"), _plan()), tmp_path / "adapter")
    assert main(["export", str(adapter), "--out", str(blocker / "peft")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alphalora export: error: ") and str(blocker) in err and "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_a_one_line_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["allocate", "--method", "uniform", "--num-layers", "2", "--budget", "4",
                     "--out", str(locked / "plan.json")])
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert code == 2 and "Permission denied" in err and "Traceback" not in err


def test_a_device_or_pipe_is_refused_and_left_as_it_was(tmp_path, capsys):
    """A rename over /dev/null (as root) or a pipe would replace it with a plain file."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for target in (pipe, "/dev/null"):
        code = main(["allocate", "--method", "uniform", "--num-layers", "2", "--budget", "4", "--out", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and "Not a regular file" in err and "Traceback" not in err, err
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(OSError, match="Not a regular file"):
        write_text_atomic(pipe, "x")


def test_a_symbolic_link_is_written_through(tmp_path):
    """The file the link names gets the new content; the link stays a link."""
    real = tmp_path / "real" / "plan.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    _plan().save(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert Plan.load(real) == _plan() and Plan.load(link) == _plan()


def test_export_into_an_adapter_folder_is_refused_and_the_adapter_kept(tmp_path, capsys):
    """PEFT's weights file has our adapter's name: exporting into the adapter (or another one) would replace it."""
    adapter = save_adapter(with_random_adapter(build("llama"), _plan()), tmp_path / "adapter")
    other = save_adapter(with_random_adapter(build("llama"), _plan(), seed=2), tmp_path / "other")
    before = {p: p.read_bytes() for p in (*adapter.iterdir(), *other.iterdir())}
    for out in (adapter, other):
        assert main(["export", str(adapter), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "holds an alphalora adapter" in err and "new folder" in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert main(["export", str(adapter), "--out", str(tmp_path / "peft")]) == 0
