"""Durable writes hand their data to the kernel's writeback as they go (atomic.start_writeback).

What must hold: the bytes are exactly what the reference writers produce (read back by the
reference readers), the file and its directory are still fsynced with the file's fsync before
the rename, writeback is started in page-aligned, growing ranges while the file is written,
and everything works the same where ``sync_file_range`` is missing or refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import tensorbridge.files as tbf
from tensorbridge.formats import atomic
from tensorbridge.formats.atomic import WRITEBACK_CHUNK, atomic_write, start_writeback

#: a bit over two writeback chunks, and not a whole number of pages
N = (2 * WRITEBACK_CHUNK + 12345) // 4


@pytest.fixture
def calls(monkeypatch):
    """Record every sync_file_range call, passing each on to the real one where it exists."""
    real = atomic._lookup_sync_file_range()
    seen: list[tuple[int, int, int, int]] = []

    def fake(fd, offset, nbytes, flags):
        seen.append((fd, offset, nbytes, flags))
        return real(fd, offset, nbytes, flags) if real is not None else 0

    monkeypatch.setattr(atomic, "_sync_file_range", fake)
    return seen


@pytest.fixture
def no_sync_file_range(monkeypatch):
    """The lookup finds nothing (not Linux, or a libc without the symbol)."""
    monkeypatch.setattr(atomic, "_lookup_sync_file_range", lambda: None)
    monkeypatch.setattr(atomic, "_sync_file_range", atomic._UNSET)


def _tree(n=N):
    rng = np.random.default_rng(7)
    return {
        "a": rng.standard_normal(n, dtype=np.float32),
        "b": rng.integers(-100, 100, size=(n // 3, 3), dtype=np.int16),
    }


def _read_with_reference(path, fmt):
    if fmt == "npy":
        return {"a": np.load(path)}
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if fmt == "pt":
        torch = pytest.importorskip("torch")
        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


FORMATS = ["npy", "safetensors", "pt", "h5"]


def _save_and_check(tmp_path, fmt):
    tree = _tree()
    if fmt == "npy":
        tree = {"a": tree["a"]}
    path = tmp_path / f"out.{fmt}"
    tbf.save(tree["a"] if fmt == "npy" else tree, path)
    back = _read_with_reference(path, fmt)
    assert sorted(back) == sorted(tree)
    for k, v in tree.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].tobytes() == v.tobytes()
    if fmt == "npy":  # byte for byte what np.save writes
        np.save(tmp_path / "ref.npy", tree["a"])
        assert path.read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["out." + fmt] + (["ref.npy"] if fmt == "npy" else [])
    )
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_writeback_is_started_while_writing_and_the_bytes_are_the_references(tmp_path, calls, fmt):
    path = _save_and_check(tmp_path, fmt)
    size = path.stat().st_size
    assert calls, "a file of several writeback chunks started no writeback"
    assert {flags for _, _, _, flags in calls} == {2}  # SYNC_FILE_RANGE_WRITE only: no waiting
    assert all(offset == 0 for _, offset, _, _ in calls)
    ends = [n for _, _, n, _ in calls]
    assert all(n % 4096 == 0 for n in ends)  # whole pages: no page is written twice
    assert all(0 <= n <= size for n in ends)
    nonzero = [n for n in ends if n]
    assert nonzero == sorted(nonzero)  # growing ranges (0 means "the whole file")


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_sync_file_range_writes_are_the_same(tmp_path, no_sync_file_range, fmt):
    _save_and_check(tmp_path, fmt)
    fd = os.open(tmp_path / f"out.{fmt}", os.O_RDONLY)
    try:
        assert start_writeback(fd) is False
    finally:
        os.close(fd)
    assert atomic._sync_file_range is None  # looked up once, remembered as missing


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EINVAL, errno.EIO])
def test_a_refused_sync_file_range_is_ignored_and_fsync_still_runs(tmp_path, monkeypatch, err):
    """ENOSYS (old kernel) stops further calls; any other error leaves the decision to
    fsync, which is still called on the file before the rename, and on the directory."""
    tried = []

    def refuse(fd, offset, nbytes, flags):
        tried.append(nbytes)
        ctypes.set_errno(err)
        return -1

    monkeypatch.setattr(atomic, "_sync_file_range", refuse)
    synced = _record_fsyncs(monkeypatch)
    path = _save_and_check(tmp_path, "safetensors")
    if err == errno.ENOSYS:
        assert len(tried) == 1 and atomic._sync_file_range is None
    else:
        assert len(tried) >= 2 and atomic._sync_file_range is refuse
    _check_fsyncs(synced, path)


def _record_fsyncs(monkeypatch):
    """os.fsync, recording for each call whether it is a directory, and the inode and
    size it had then; the real fsync still runs."""
    real = os.fsync
    synced: list[tuple[str, int, bool]] = []

    def spy(fd):
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        synced.append((kind, st.st_ino, st.st_size))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def _check_fsyncs(synced, path):
    """The new file was fsynced whole (its final inode and size), then the directory."""
    st = path.stat()
    files = [(ino, size) for kind, ino, size in synced if kind == "file"]
    dirs = [ino for kind, ino, _ in synced if kind == "dir"]
    assert (st.st_ino, st.st_size) in files
    assert path.parent.stat().st_ino in dirs
    last_file = max(i for i, s in enumerate(synced) if s[:2] == ("file", st.st_ino))
    first_dir = min(i for i, s in enumerate(synced) if s[0] == "dir")
    assert last_file < first_dir  # data durable before the rename is made durable


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_and_directory_are_still_fsynced(tmp_path, monkeypatch, calls, fmt):
    synced = _record_fsyncs(monkeypatch)
    path = _save_and_check(tmp_path, fmt)
    _check_fsyncs(synced, path)
    assert calls  # with writeback started as well


def test_large_single_write_is_split_and_short_files_start_none(tmp_path, calls):
    data = np.arange(N, dtype=np.float32)
    with atomic_write(tmp_path / "big.bin") as f:
        f.write(memoryview(data))  # one call, several chunks: writeback after each
    assert (tmp_path / "big.bin").read_bytes() == data.tobytes()
    assert [n for _, _, n, _ in calls] == [WRITEBACK_CHUNK, 2 * WRITEBACK_CHUNK]
    calls.clear()
    with atomic_write(tmp_path / "small.bin") as f:
        f.write(b"x" * 1000)
    assert calls == []  # under a chunk: the final fsync alone
    assert (tmp_path / "small.bin").read_bytes() == b"x" * 1000


def test_seeking_back_never_shrinks_the_started_range(tmp_path, calls):
    """Writers that rewrite a header (zip records) seek back; the range only grows."""
    with atomic_write(tmp_path / "x.bin") as f:
        f.write(b"\0" * (WRITEBACK_CHUNK + 10))
        f.seek(0)
        f.write(b"\1" * WRITEBACK_CHUNK)
    ends = [n for _, _, n, _ in calls]
    assert ends == [WRITEBACK_CHUNK, WRITEBACK_CHUNK]
    raw = (tmp_path / "x.bin").read_bytes()
    assert raw == b"\1" * WRITEBACK_CHUNK + b"\0" * 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_linux_libc_has_sync_file_range(tmp_path):
    fn = atomic._lookup_sync_file_range()
    assert fn is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"y" * 3 * 4096)
        assert start_writeback(fd, 100) is False  # under one page: nothing to ask
        got = fn(fd, 0, 0, 2)
        assert got == 0 or ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
    finally:
        os.close(fd)


def test_not_linux_looks_up_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert atomic._lookup_sync_file_range() is None


@pytest.fixture
def gated_release(monkeypatch):
    """The release thread waits for the test before it closes the replaced file, and
    records that file's inode: the order of events is the test's, not the scheduler's."""
    gate = threading.Event()
    freed: list[int] = []
    real = atomic._close_quietly

    def close(fd):
        if threading.current_thread().name == "tensorbridge-release":
            assert gate.wait(30)
            freed.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(atomic, "_close_quietly", close)
    yield gate, freed
    gate.set()
    atomic.wait_released(30)


@pytest.mark.skipif(not hasattr(os, "O_PATH"), reason="O_PATH is Linux's")
def test_a_large_replaced_file_is_freed_after_the_write_returns(tmp_path, gated_release):
    gate, freed = gated_release
    path = tmp_path / "big.bin"
    old = b"o" * atomic.RELEASE_LATER_BYTES
    with atomic_write(path) as f:
        f.write(old)
    old_ino = path.stat().st_ino
    with atomic_write(path) as f:
        f.write(b"n" * 10)
    assert path.read_bytes() == b"n" * 10  # replaced and durable before the release
    assert freed == []
    gate.set()
    atomic.wait_released(30)
    assert freed == [old_ino]
    assert os.listdir(tmp_path) == ["big.bin"]


def test_small_or_failed_replacements_are_freed_at_once(tmp_path, gated_release, monkeypatch):
    gate, freed = gated_release
    path = tmp_path / "x.bin"
    for _ in range(2):
        with atomic_write(path) as f:
            f.write(b"s" * (atomic.RELEASE_LATER_BYTES - 1))
    assert not atomic._releasing or not any(t.is_alive() for t in atomic._releasing)
    with atomic_write(path) as f:
        f.write(b"b" * atomic.RELEASE_LATER_BYTES)
    gate.set()
    atomic.wait_released(30)
    freed.clear()
    gate.clear()
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    def fail(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(atomic.FileFormatError, match="Input/output error"):
        with atomic_write(path) as f:
            f.write(b"c" * 10)
    assert path.read_bytes() == b"b" * atomic.RELEASE_LATER_BYTES
    assert freed == [] and not any(t.is_alive() for t in atomic._releasing)
    if fds is not None:  # the held descriptor was closed on the spot
        assert len(os.listdir("/proc/self/fd")) == fds


def test_any_buffer_is_written_as_plain_files_write_it(tmp_path, calls):
    import array

    block = np.arange(WRITEBACK_CHUNK // 4 + 3, dtype=np.float32).reshape(-1, 1)
    with atomic_write(tmp_path / "x.bin") as f:
        f.write(array.array("d", [1.5, 2.5]))
        f.write(block)  # a 2-D float buffer: its bytes, in C order
    assert (tmp_path / "x.bin").read_bytes() == array.array("d", [1.5, 2.5]).tobytes() + (
        block.tobytes()
    )
    strided = np.arange(12, dtype=np.float32).reshape(3, 4).T
    with open(os.devnull, "wb", buffering=0) as plain:
        with pytest.raises(Exception) as expected:
            plain.write(strided)
    with pytest.raises(type(expected.value)):
        with atomic_write(tmp_path / "x.bin") as f:
            f.write(strided)
    assert (tmp_path / "x.bin").read_bytes()[:16] == array.array("d", [1.5, 2.5]).tobytes()


def test_h5_datasets_of_many_dtypes_in_one_file_read_back_by_h5py(tmp_path):
    """The writer makes its property lists and HDF5 types once per file: every dataset
    still gets its own dtype, shape and bytes, as h5py's create_dataset would store them."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(3)
    tree = {
        "f32": rng.standard_normal((3, 5), dtype=np.float32),
        "f32b": rng.standard_normal(7, dtype=np.float32),
        "f64_big_endian": rng.standard_normal(4).astype(">f8"),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "u16": np.arange(6, dtype=np.uint16).reshape(2, 3),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 3), np.int32),
        "bool": np.array([True, False, True]),
    }
    tbf.save(tree, tmp_path / "m.h5")
    with h5py.File(tmp_path / "ref.h5", "w") as f:
        for k, v in tree.items():
            f.create_dataset(k, data=v)
    with h5py.File(tmp_path / "m.h5", "r") as ours, h5py.File(tmp_path / "ref.h5", "r") as ref:
        assert sorted(ours) == sorted(ref) == sorted(tree)
        for k, v in tree.items():
            got = ours[k][()]
            assert got.shape == v.shape and got.dtype == v.dtype.newbyteorder("=")
            assert ours[k].dtype == ref[k].dtype.newbyteorder("=")
            assert np.asarray(got).tobytes() == v.astype(v.dtype.newbyteorder("=")).tobytes()


_FORK_CHILD = textwrap.dedent("""
    import os, sys, threading, warnings
    warnings.simplefilter("ignore")  # fork() with a thread running (the held release)
    from tensorbridge.formats import atomic
    gate = threading.Event()
    real = atomic._release
    def release(fd):  # the release thread waits until the fork is done
        gate.wait(30)
        real(fd)
    atomic._release = release
    path = sys.argv[1]
    with atomic.atomic_write(path) as f:
        f.write(b"o" * atomic.RELEASE_LATER_BYTES)
    old = os.stat(path).st_ino
    with atomic.atomic_write(path) as f:
        f.write(b"n")
    assert len(atomic._held) == 1  # the release thread waits: the old file is held

    def holders():
        found = []
        for n in os.listdir("/proc/self/fd"):
            try:
                if os.stat(f"/proc/self/fd/{n}").st_ino == old:
                    found.append(n)
            except OSError:
                pass
        return found

    assert holders(), "the parent should still hold the old file here"
    pid = os.fork()
    if pid == 0:
        os._exit(3 if holders() else 0)
    _, status = os.waitpid(pid, 0)
    gate.set()
    atomic.wait_released(30)
    print("child", os.waitstatus_to_exitcode(status), "parent", len(holders()), flush=True)
""")


@pytest.mark.skipif(
    not hasattr(os, "O_PATH") or not hasattr(os, "fork"), reason="O_PATH and fork are Linux's"
)
def test_a_child_forked_before_the_release_does_not_keep_the_old_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_CHILD, str(tmp_path / "big.bin")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["child", "0", "parent", "0"]


@pytest.mark.skipif(not hasattr(os, "O_PATH"), reason="O_PATH is Linux's")
def test_old_shards_lose_their_names_at_once_and_are_freed_after_the_save(tmp_path, gated_release):
    """A sharded save that supersedes large shards removes their names before it returns
    (nothing can load them any more) and frees them on the release thread, as a replaced
    file is."""
    import numpy as np

    import tensorbridge as tb

    gate, freed = gated_release
    out = tmp_path / "ck"
    big = np.zeros(atomic.RELEASE_LATER_BYTES // 4, np.float32)
    tb.save({"a": big, "b": big + 1}, str(out) + "/", max_shard_size=big.nbytes + 4096)
    old = {n: (out / n).stat().st_ino for n in os.listdir(out) if n.endswith(".safetensors")}
    assert len(old) == 2
    tb.save({"x": np.full(5, 2, np.float32)}, str(out) + "/")
    assert not set(old) & set(os.listdir(out))  # no old shard is reachable by name
    assert freed == []  # both still held, to be freed later
    gate.set()
    atomic.wait_released(30)
    assert sorted(freed) == sorted(old.values())
    got = tb.load(str(out) + "/")
    assert got["x"].tolist() == [2.0] * 5
