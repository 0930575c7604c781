"""One load of a single tensor file gives tensors of one version of it: a file rewritten
in place while it is read by copies (within a tensor, as a concurrent ``np.save`` makes a
read come back short, or between two tensors) is read again (``load`` retries), never
returned half old, half new; and a file that looks corrupt only because it changed while
it was read (an archive whose CRC no longer matches) is read again, not called corrupt.

A file replaced by another (``os.replace``, as atomic writers do) is not a change: the
reader reads the inode it opened."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import CheckpointChangedError
from tensorbridge.formats.mapping import Arena

N = 1 << 14  # 64 KiB of float32 per tensor: under the lease threshold, so the default copies

FORMATS = ["npy", "safetensors", "pt", "npz", "gguf"]


def save_version(path: str, fmt: str, fill: float, n: int = N, shift: bool = False) -> None:
    """``shift``: a longer header, so the data lies further on than version 1's header says."""
    if fmt == "npy":
        np.save(path, np.full((1,) * 24 + (n,) if shift else (n,), fill, np.float32))
    else:
        tree = {"a": np.full(n, fill, np.float32), "b": np.full(n, fill, np.float32)}
        meta = {"padding": "x" * 256} if shift and fmt != "npz" else None
        tb.save(tree, path, metadata=meta)


def rewrite_in_place(path: str, data: bytes) -> None:
    ino = os.stat(path).st_ino
    with open(path, "r+b") as f:  # as np.save, torch.save and cp do: the same inode
        f.truncate(0)
        f.write(data)
    assert os.stat(path).st_ino == ino


def versions(tmp_path, fmt: str, n: int = N, shift: bool = False) -> tuple[str, bytes]:
    """The file at version 1, and the bytes of version 2 (every value 2; the same size,
    unless ``shift``)."""
    path = str(tmp_path / f"v.{fmt}")
    save_version(path, fmt, 1.0, n)
    other = str(tmp_path / f"other.{fmt}")
    save_version(other, fmt, 2.0, n, shift)
    with open(other, "rb") as f:
        data = f.read()
    assert shift or len(data) == os.path.getsize(path)
    return path, data


def values(got) -> set[float]:
    arrays = [got] if isinstance(got, np.ndarray) else list(got.values())
    return {float(v) for a in arrays for v in np.unique(a)}


@pytest.mark.parametrize("mmap", [False, None])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_read_cut_short_by_a_rewrite_is_read_again(tmp_path, monkeypatch, fmt, mmap):
    """A read of a tensor's bytes comes back half done and the file is rewritten before
    the rest is read, as a concurrent ``np.save`` (truncate, then write) does."""
    path, data = versions(tmp_path, fmt)
    real = os.preadv
    fired: list[int] = []

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        if not fired and len(buffers[0]) >= 4 * N:  # the first tensor's bytes
            fired.append(offset)
            n = real(fd, [memoryview(buffers[0])[: len(buffers[0]) // 2]], offset)
            rewrite_in_place(path, data)
            return n
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    got = tb.load(path, mmap=mmap)
    assert fired, "the injection did not run: the test no longer tests a copy"
    assert values(got) == {2.0}  # read again: the new version, whole


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "npz", "gguf"])
def test_a_file_rewritten_between_two_tensors_is_read_again(tmp_path, monkeypatch, fmt):
    path, data = versions(tmp_path, fmt)
    real = Arena.array
    fired: list[str] = []

    def between(self, reader, name):  # type: ignore[no-untyped-def]
        if name == "b" and not fired:
            fired.append(name)
            rewrite_in_place(path, data)
        return real(self, reader, name)

    monkeypatch.setattr(Arena, "array", between)
    got = tb.load(path, mmap=False)
    assert fired == ["b"]
    assert values(got) == {2.0}


def test_an_archive_rewritten_while_read_is_read_again_not_called_corrupt(tmp_path, monkeypatch):
    """A .npz member read while the archive is rewritten fails its CRC-32: the archive
    changed, it is not corrupt."""
    path = str(tmp_path / "v.npz")
    np.savez(path, a=np.full(N, 1, np.float32), b=np.full(N, 1, np.float32))
    other = str(tmp_path / "other.npz")
    np.savez(other, a=np.full(N, 2, np.float32), b=np.full(N, 2, np.float32))
    with open(other, "rb") as f:
        data = f.read()
    assert len(data) == os.path.getsize(path)
    import zlib

    real = zlib.crc32
    fired: list[int] = []

    def crc32(buf, value=0):  # type: ignore[no-untyped-def]
        if not fired:
            fired.append(1)
            rewrite_in_place(path, data)
            return real(buf, value) ^ 1  # the bytes read no longer match their CRC
        return real(buf, value)

    monkeypatch.setattr(zlib, "crc32", crc32)
    got = tb.load(path)
    assert fired
    assert values(got) == {2.0}


def test_a_corrupt_archive_is_still_called_corrupt(tmp_path):
    """The other side: an archive whose bytes are wrong and that nobody changes is refused as
    corrupt at once, not read three times and called changed."""
    path = str(tmp_path / "bad.npz")
    np.savez(path, a=np.arange(1000, dtype=np.float32))
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    raw[200] ^= 0xFF  # inside member a's data: its CRC no longer matches
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(tb.FileFormatError, match="CRC") as info:
        tb.load(path, mmap=False)
    assert not isinstance(info.value, CheckpointChangedError)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_replaced_while_read_is_not_a_change(tmp_path, monkeypatch, fmt):
    """An atomic save (a new file renamed over the path) does not touch the inode being
    read: the load returns the version it opened (copies read through the descriptor the
    header was checked through), with no second read."""
    path, data = versions(tmp_path, fmt)
    real = os.preadv
    calls: list[int] = []
    replace = [False]

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        if len(buffers[0]) >= 4 * N:
            if replace[0] and not calls:
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    tb.load(path, mmap=False)
    unchanged = list(calls)  # the reads of one load of a file nobody touches
    calls.clear()
    replace[0] = True
    got = tb.load(path, mmap=False)
    assert unchanged
    assert values(got) == {1.0}  # the version it opened, whole
    assert calls == unchanged  # and no second read


def test_a_reader_from_open_refuses_a_tensor_read_across_a_rewrite(tmp_path, monkeypatch):
    path, data = versions(tmp_path, "npy")
    real = os.preadv
    fired: list[int] = []

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        if not fired and len(buffers[0]) >= 4 * N:
            fired.append(offset)
            n = real(fd, [memoryview(buffers[0])[: len(buffers[0]) // 2]], offset)
            rewrite_in_place(path, data)
            return n
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    with tb.open(path) as r, pytest.raises(CheckpointChangedError, match="Fix: load it again"):
        r.read("array")


@pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's")
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_rewritten_between_its_check_and_its_mapping_is_read_again(
    tmp_path, monkeypatch, fmt
):
    """The file is rewritten in place after its header was checked and before the lease
    is taken: the mapping would hold the new bytes under the old header (a longer one
    now: the old offsets point into the new header)."""
    from tensorbridge.formats import file_lease

    n = file_lease.MIN_BYTES // 4  # large enough to be mapped under a lease
    path, data = versions(tmp_path, fmt, n, shift=True)
    real = file_lease.guarded_map
    fired: list[str] = []

    def before_mapping(fd, size=None):  # type: ignore[no-untyped-def]
        if not fired:
            fired.append("rewritten")
            rewrite_in_place(path, data)
        return real(fd, size)

    monkeypatch.setattr(file_lease, "guarded_map", before_mapping)
    got = tb.load(path)
    assert fired == ["rewritten"]
    assert values(got) == {2.0}
    assert all(a.size == n for a in ([got] if isinstance(got, np.ndarray) else got.values()))


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_file_rewritten_while_its_header_is_read_is_read_again(tmp_path, monkeypatch, fmt):
    """A save truncates the file just as the load opens it (its header reads as nothing):
    the file changed since it was opened, so it is read again, not called truncated."""
    path, data = versions(tmp_path, fmt)
    name = "pread" if fmt == "npy" else "preadv"  # (what each reads its header with)
    real = getattr(os, name)
    fired: list[int] = []

    def read(fd, *args):  # type: ignore[no-untyped-def]
        if not fired:
            fired.append(1)
            os.truncate(path, 0)  # the writer's open(path, "wb")
            got = real(fd, *args)  # reads nothing
            with open(path, "r+b") as f:  # and the writer's bytes
                f.write(data)
            return got
        return real(fd, *args)

    monkeypatch.setattr(os, name, read)
    got = tb.load(path)
    assert fired
    assert values(got) == {2.0}


def test_an_empty_file_nobody_writes_is_still_called_truncated(tmp_path):
    path = str(tmp_path / "empty.npy")
    open(path, "wb").close()
    with pytest.raises(tb.FileFormatError, match="magic string") as info:
        tb.load(path)
    assert not isinstance(info.value, CheckpointChangedError)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_reader_whose_descriptor_number_was_reused_is_not_changed(tmp_path, fmt):
    """Another thread closed the reader and the descriptor's number now names another file:
    the reader asks its path, which is unchanged, instead of calling the file changed."""
    path, _ = versions(tmp_path, fmt)
    other = str(tmp_path / "other-file.bin")
    with open(other, "wb") as f:
        f.write(b"x" * 100)
    r = tb.open(path)
    try:
        fd = r.descriptor()
        assert fd is not None
        os.close(fd)  # (as a close in another thread would, just before the check)
        new = os.open(other, os.O_RDONLY)
        try:
            assert new == fd  # the lowest free number: the same one
            assert not r.changed()
            r.verify()  # no CheckpointChangedError
        finally:
            os.close(new)
    finally:
        spare = os.open(other, os.O_RDONLY)  # (something at fd for the reader to close)
        if spare != fd:
            os.dup2(spare, fd)
            os.close(spare)
        r.close()
