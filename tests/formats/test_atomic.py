"""The atomic writer's temporary-file locks, stale-file cleanup and refusals."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tensorbridge.files as tbf
from tensorbridge.errors import FileFormatError
from tensorbridge.formats import atomic
from tensorbridge.formats.atomic import atomic_path, atomic_write, remove_stale, remove_stale_in


def dead_pid() -> int:
    """A PID with no process behind it here, as a writer in another container looks."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


_HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin
""")


@pytest.fixture
def holder():
    procs = []

    def hold(path) -> None:
        p = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline().strip() == "locked"
        procs.append(p)

    yield hold
    for p in procs:
        p.stdin.close()
        p.wait(timeout=10)
        p.stdout.close()


@pytest.mark.parametrize("cleaner", ["remove_stale", "remove_stale_in"])
def test_locked_temp_of_a_foreign_pid_is_kept_and_unlocked_one_removed(tmp_path, holder, cleaner):
    pid = dead_pid()
    live = tmp_path / f".out.safetensors.tb-tmp-{pid}-11111111"
    stale = tmp_path / f".out.safetensors.tb-tmp-{pid}-22222222"
    live_spool = tmp_path / f".out.safetensors.tb-spool-{pid}-abc"
    stale_spool = tmp_path / f".out.safetensors.tb-spool-{pid}-def"
    for p in (live, stale, live_spool, stale_spool):
        p.write_bytes(b"partial")
    holder(live)
    holder(live_spool)
    if cleaner == "remove_stale":
        remove_stale(str(tmp_path), "out.safetensors")
        remove_stale(str(tmp_path), "out.safetensors", atomic.SPOOL_MARKER)
    else:
        remove_stale_in(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, live_spool.name])
    assert live.read_bytes() == b"partial"


def test_writes_hold_the_lock_on_their_temporary_file(tmp_path):
    """While a write runs, a cleaner (which ignores PIDs once they look dead) cannot take it."""
    seen = []
    for ctx in (atomic_write, atomic_path):
        with ctx(tmp_path / "x.bin") as f:
            if ctx is atomic_write:
                f.write(b"new")
            tmp = next(n for n in os.listdir(tmp_path) if atomic.TMP_MARKER in n)
            atomic._remove_if_dead(str(tmp_path / tmp))  # the lock test alone, no PID filter
            seen.append(os.path.exists(tmp_path / tmp))
            if ctx is atomic_path:
                with open(f, "wb") as g:  # the library opens the path itself (as h5py does)
                    g.write(b"new2")
    assert seen == [True, True]
    assert (tmp_path / "x.bin").read_bytes() == b"new2"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_atomic_path_lock_does_not_block_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    tbf.save({"a": np.arange(3)}, tmp_path / "m.h5")
    tbf.save({"b": np.arange(4)}, tmp_path / "m.h5")  # HDF5 takes its own flock on the file
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert list(f) == ["b"]


def test_fifo_destination_is_refused_and_left_a_fifo(tmp_path):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FileFormatError, match="FIFO") as err:
        tbf.save({"a": np.ones(2)}, fifo)
    assert "Fix:" in str(err.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_symlink_to_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    os.symlink("pipe", tmp_path / "link.npz")
    with pytest.raises(FileFormatError, match="FIFO"):
        tbf.save({"a": np.ones(2)}, tmp_path / "link.npz")
    assert stat.S_ISFIFO(os.stat(tmp_path / "link.npz").st_mode)


def test_follow_symlinks_false_replaces_the_link_not_its_target(tmp_path):
    (tmp_path / "blob").write_bytes(b"content-addressed")
    os.symlink("blob", tmp_path / "link")
    with atomic_write(tmp_path / "link", follow_symlinks=False) as f:
        f.write(b"new")
    assert (tmp_path / "blob").read_bytes() == b"content-addressed"
    assert not os.path.islink(tmp_path / "link")
    assert (tmp_path / "link").read_bytes() == b"new"
    with atomic_write(tmp_path / "link2") as f:  # the default still follows (see SECURITY.md)
        f.write(b"x")
    os.symlink("blob", tmp_path / "link3")
    with atomic_write(tmp_path / "link3") as f:
        f.write(b"followed")
    assert (tmp_path / "blob").read_bytes() == b"followed" and os.path.islink(tmp_path / "link3")


def test_non_space_errors_do_not_blame_free_space(tmp_path):
    with pytest.raises(FileFormatError) as err:
        with atomic_write(tmp_path / "x.bin") as f:
            f.write(b"a")
            raise FileNotFoundError(2, "No such file or directory")
    assert "free space" not in str(err.value) and "No such file" in str(err.value)
    with pytest.raises(FileFormatError, match="disk is full.*free space"):
        with atomic_write(tmp_path / "x.bin") as f:
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []


def _open_descriptors() -> int:
    atomic.wait_released()  # (a replaced file is held until its release thread ends)
    return len(os.listdir("/proc/self/fd"))


def _save(dest, value: float, fmt: str) -> None:
    if fmt == "writer":
        from tensorbridge import Writer

        with Writer(str(dest)) as w:
            w.append(w=np.full(4, value, np.float32))
    else:
        tbf.save({"w": np.full(4, value, np.float32)}, str(dest), format=fmt)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize(
    "fmt,where",
    [
        (fmt, where)
        for fmt in ("safetensors", "sharded", "h5", "writer")
        for where in ("open", "lock_new_file", "dup")
        if (fmt, where) != ("writer", "dup")  # (spool files are not duplicated)
    ],
)
def test_an_interrupt_just_after_the_temporary_file_is_made_leaves_nothing(
    tmp_path, monkeypatch, where, fmt
):
    """A Ctrl-C (or a signal handler's exception) arriving as the temporary file is made,
    or between then and the write, leaves no file and the destination as it was (before,
    the file stayed, and no later save of this process removed it: its PID is alive).
    Only when it comes as the open returns can its descriptor not be closed (Python
    drops the result): the interrupt is simulated so, and the test closes it."""
    dest = tmp_path / {"sharded": "ck", "h5": "one.h5"}.get(fmt, "one.safetensors")
    _save(dest, 0.0, fmt)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    descriptors = _open_descriptors()
    if where == "open":
        real_open, dropped = os.open, []

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            fd = real_open(path, flags, mode, dir_fd=dir_fd)
            if ".tb-tmp-" in os.fspath(path) or ".tb-spool-" in os.fspath(path):
                dropped.append(fd)  # (closed below: the interpreter would leave it open)
                raise KeyboardInterrupt  # as a handler run when the call returns would
            return fd

        monkeypatch.setattr(os, "open", open_)
    elif where == "lock_new_file":
        real_lock = atomic.lock_new_file

        def lock_new_file(*args, **kwargs):
            real_lock(*args, **kwargs)
            raise KeyboardInterrupt  # as a SIGINT handler would, once the lock is taken

        monkeypatch.setattr(atomic, "lock_new_file", lock_new_file)
        if fmt == "writer":
            import tensorbridge.writer as writer_mod

            monkeypatch.setattr(writer_mod, "lock_new_file", lock_new_file)
    else:
        real_dup = os.dup

        def dup(fd):
            monkeypatch.setattr(os, "dup", real_dup)  # (once)
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "dup", dup)
    with pytest.raises(KeyboardInterrupt):
        _save(dest, 1.0, fmt)
    monkeypatch.undo()
    if where == "open":
        assert len(dropped) == 1
        os.close(dropped[0])
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert {p: p.read_bytes() for p in files} == before
    assert _open_descriptors() == descriptors


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_an_interrupt_as_a_zip_member_opens_comes_out_as_itself(tmp_path, monkeypatch, fmt):
    """A Ctrl-C as ``zf.open(member, "w")`` returns loses the member's handle; closing
    the archive then raises ValueError, which hid the interrupt. The interrupt comes out,
    the destination is as it was, and no temporary file is left."""
    import gc
    import zipfile

    dest = tmp_path / f"one.{fmt}"
    _save(dest, 0.0, fmt)
    before = dest.read_bytes()
    real_open, lost = zipfile.ZipFile.open, []

    def open_(self, name, mode="r", *args, **kwargs):
        handle = real_open(self, name, mode, *args, **kwargs)
        if mode == "w":
            lost.append(handle)  # (alive, as in an interrupted frame the traceback keeps)
            del handle
            raise KeyboardInterrupt  # as a handler run when the call returns would
        return handle

    monkeypatch.setattr(zipfile.ZipFile, "open", open_)
    with pytest.raises(KeyboardInterrupt):
        _save(dest, 1.0, fmt)
    monkeypatch.undo()
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    lost.clear()  # the handle and the archive are freed: neither says anything
    gc.collect()
    monkeypatch.undo()
    assert unraisable == []
    assert dest.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [dest.name]
