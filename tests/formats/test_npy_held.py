"""A ``.npy`` load maps the descriptor the header was checked through (the reader hands it
to the mapping, ``NpyReader.take_descriptor``) instead of opening the file again: the
array is of the file that was checked, a load that cannot lease still copies, and no
descriptor is left open."""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.formats import file_lease
from tensorbridge.formats.npy import NpyReader

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's")

A = np.arange(file_lease.MIN_BYTES // 4, dtype=np.float32)  # leased, not copied


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def paths_opened(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = os.open

    def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(path, str) and path.endswith(".npy"):
            opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return opened


@pytest.mark.parametrize("mmap", [None, True])
def test_a_mapping_load_opens_the_file_once(tmp_path, monkeypatch, mmap):
    p = str(tmp_path / "a.npy")
    np.save(p, A)
    before = open_fds()
    opened = paths_opened(monkeypatch)
    got = tb.load(p, mmap=mmap)
    assert opened == [p]
    assert got.tobytes() == A.tobytes()
    if mmap is None:
        assert file_lease.guards() >= 1
        assert len(open_fds() - before) == 2  # the lease's and the mapping's, while it lives
    del got
    gc.collect()
    assert open_fds() == before


def test_a_load_that_cannot_lease_copies_after_the_descriptor_went(tmp_path):
    """A writer holds the file open: the lease is refused, the handed descriptor is closed,
    and the copy opens the file by path (checked to be the same file)."""
    p = str(tmp_path / "a.npy")
    np.save(p, A)
    writer = os.open(p, os.O_WRONLY)
    try:
        before = open_fds()
        leased = file_lease.guards()
        got = tb.load(p)
        assert got.tobytes() == A.tobytes()
        assert file_lease.guards() == leased
        assert open_fds() == before  # a copy: nothing held
        os.pwrite(writer, b"\xff" * 16, 128)  # the copy does not see later writes
        assert got.tobytes() == A.tobytes()
    finally:
        os.close(writer)


def test_a_rewrite_after_the_load_does_not_show(tmp_path):
    p = str(tmp_path / "a.npy")
    np.save(p, A)
    got = tb.load(p)
    np.save(p, A[::-1].copy())  # np.save rewrites the same inode
    assert got.tobytes() == A.tobytes()
    assert tb.load(p).tobytes() == A[::-1].tobytes()


def test_the_reader_hands_its_descriptor_once_and_keeps_its_span(tmp_path):
    p = str(tmp_path / "a.npy")
    np.save(p, A)
    with NpyReader(p) as r:
        span = r.raw_span("array")
        assert span is not None
        held = r.take_descriptor(span)
        assert held is not None
        fd, size = held
        try:
            assert size == os.path.getsize(p)
            assert os.fstat(fd).st_ino == os.stat(p).st_ino
        finally:
            os.close(fd)
        assert r.take_descriptor(span) is None  # handed once
        assert r.raw_span("array") == span  # a copy by path still knows where the bytes are
        with pytest.raises(tb.FileFormatError, match="closed"):
            r.read("array")
    r2 = NpyReader(p)
    r2.close()
    assert r2.take_descriptor(span) is None and r2.raw_span("array") is None


def test_a_file_emptied_before_mmap_true_maps_it_is_refused(tmp_path, monkeypatch):
    """mmap=True maps without a lease: a file truncated to nothing between its check and
    the mapping is refused as a truncated file (not a bare ValueError from mmap): the load
    reads it again (it changed), and finds it empty."""
    from tensorbridge.formats.mapping import FileMaps

    p = str(tmp_path / "a.npy")
    np.save(p, A)
    real = FileMaps.array

    def emptied(self, reader, name):  # type: ignore[no-untyped-def]
        os.truncate(p, 0)  # as another process might
        return real(self, reader, name)

    monkeypatch.setattr(FileMaps, "array", emptied)
    before = open_fds()
    with pytest.raises(tb.FileFormatError, match="truncated"):
        tb.load(p, mmap=True)
    assert open_fds() == before


def test_a_mapping_refused_by_the_system_says_how_to_fix_it(tmp_path, monkeypatch):
    import errno

    from tensorbridge.formats import mapping

    p = str(tmp_path / "a.npy")
    np.save(p, A)

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(mapping.mmap, "mmap", refuse)
    before = open_fds()
    with pytest.raises(tb.FileFormatError, match=r"cannot be mapped .*ulimit -n"):
        tb.load(p, mmap=True)
    assert open_fds() == before
    monkeypatch.undo()
    assert tb.load(p, mmap=True).tobytes() == A.tobytes()


@pytest.mark.parametrize("mmap", [None, True])
def test_a_file_rewritten_between_its_check_and_its_mapping_is_read_again(
    tmp_path, monkeypatch, mmap
):
    """The header says float32 when checked; before the mapping another writer rewrites the
    file in place as int32: the load is of the new file whole, never the new bytes under
    the old header."""
    from tensorbridge.formats.mapping import FileMaps

    p = str(tmp_path / "a.npy")
    np.save(p, A)
    new = np.arange(A.size, dtype=np.int32) * 3
    real = FileMaps.array
    fired: list[bool] = []

    def rewritten(self, reader, name):  # type: ignore[no-untyped-def]
        if not fired:
            fired.append(True)
            ino = os.stat(p).st_ino
            with open(p, "r+b") as f:  # in place: np.save's own header for int32
                np.save(f, new)
            assert os.stat(p).st_ino == ino
        return real(self, reader, name)

    monkeypatch.setattr(FileMaps, "array", rewritten)
    got = tb.load(p, mmap=mmap)
    assert fired == [True]
    assert got.dtype == np.int32 and got.tobytes() == new.tobytes()
