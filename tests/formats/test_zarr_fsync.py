"""zarr writes are durable: every file and directory of the new store is flushed before
it is swapped in (files from several threads at once, then directories); a flush that
fails leaves the old store as it was."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import FileFormatError

pytest.importorskip("zarr")


def record_fsyncs(monkeypatch) -> list[tuple[str, bool, str]]:
    """(path, is a directory, thread name) of every os.fsync, in order."""
    seen: list[tuple[str, bool, str]] = []
    real = os.fsync
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        with lock:
            seen.append((path, os.path.isdir(path), threading.current_thread().name))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_every_file_then_every_directory_is_flushed_before_the_swap(tmp_path, monkeypatch):
    p = tmp_path / "m.zarr"
    tree = {f"w{i}": np.full((3, 2), i + 1, np.float32) for i in range(12)}
    renamed: list[str] = []
    real_rename = os.rename

    def rename(a, b):  # type: ignore[no-untyped-def]
        renamed.append(str(b))
        real_rename(a, b)

    seen = record_fsyncs(monkeypatch)
    monkeypatch.setattr(os, "rename", rename)
    tb.save(tree, p)
    assert renamed == [str(p)]
    tmp = os.path.dirname(seen[0][0])  # files live in the temporary store
    while os.path.basename(os.path.dirname(tmp)) != tmp_path.name:
        tmp = os.path.dirname(tmp)
    # what the store holds now is what was flushed under the temporary name
    files = {os.path.relpath(os.path.join(d, f), p) for d, _, fs in os.walk(p) for f in fs}
    dirs = {os.path.relpath(d, p) for d, _, _ in os.walk(p)}
    flushed_files = [
        os.path.relpath(s, tmp) for s, is_dir, _ in seen if not is_dir and s.startswith(tmp + "/")
    ]
    flushed_dirs = [
        os.path.relpath(s, tmp) for s, is_dir, _ in seen if is_dir and s.startswith(tmp)
    ]
    assert sorted(flushed_files) == sorted(files) and len(files) >= 25  # zarr.json + chunks
    assert sorted(flushed_dirs) == sorted(dirs)
    kinds = [is_dir for s, is_dir, _ in seen if s.startswith(tmp)]
    assert kinds == sorted(kinds)  # no directory before the last file
    assert len({t for _, is_dir, t in seen if not is_dir}) > 1  # files from several threads
    assert seen[-1] == (str(tmp_path), True, threading.current_thread().name)  # then the parent
    got = tb.load(p)
    assert all(got[k].tobytes() == v.tobytes() for k, v in tree.items())


def test_a_failed_flush_leaves_the_old_store(tmp_path, monkeypatch):
    p = tmp_path / "m.zarr"
    tb.save({"a": np.ones(3)}, p)
    real = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(FileFormatError, match="writing failed .Input/output error.*unchanged"):
        tb.save({f"w{i}": np.zeros(4) for i in range(8)}, p)
    monkeypatch.undo()
    assert tb.load(p)["a"].tolist() == [1, 1, 1]
    assert os.listdir(tmp_path) == ["m.zarr"]  # the temporary store is gone


def test_a_store_of_two_files_is_flushed_without_threads(tmp_path, monkeypatch):
    seen = record_fsyncs(monkeypatch)
    started = threading.active_count()
    tb.save({"a": np.zeros((0, 3))}, tmp_path / "one.zarr")  # no chunk: two zarr.json
    me = threading.current_thread().name
    assert {t for _, _, t in seen} == {me} and threading.active_count() == started
    assert sum(not d for _, d, _ in seen) == 2
    assert tb.load(tmp_path / "one.zarr")["a"].shape == (0, 3)


def test_each_array_starts_its_writeback_before_the_next_is_encoded(tmp_path, monkeypatch):
    """Every chunk file of an array is handed to the disk (sync_file_range) once the array
    is written, before the next array is written, so the final flush waits only for the
    rest; the flush still covers every file."""
    import tensorbridge.formats.zarr as zmod

    started: list[str] = []
    arrays_then: list[set[str]] = []  # the arrays the store held at each request
    real_start = zmod.start_writeback

    def start(fd: int, end: int = 0) -> bool:
        path = os.readlink(f"/proc/self/fd/{fd}")
        started.append(path)
        store = path.split(".zarr", 1)[0] + ".zarr" + path.split(".zarr", 1)[1].split("/")[0]
        arrays_then.append({n for n in os.listdir(store) if n != "zarr.json"})
        return real_start(fd, end)

    monkeypatch.setattr(zmod, "start_writeback", start)
    seen = record_fsyncs(monkeypatch)
    p = tmp_path / "m.zarr"
    tree = {f"w{i}": np.full((300, 2), i + 1, np.float32) for i in range(3)}
    tb.save(tree, str(p))
    for i, name in enumerate(tree):  # each array's chunk files and its zarr.json
        mine = [k for k, s in enumerate(started) if f"/{name}/" in s]
        assert any("/c/" in started[k] for k in mine)
        assert any(started[k].endswith("/zarr.json") for k in mine)
        # requested before the next array was created
        assert all(arrays_then[k] == {f"w{j}" for j in range(i + 1)} for k in mine)
    flushed = {os.path.relpath(path, str(p)) for path, is_dir, _ in seen if not is_dir}
    for s in started:
        rel = s.split(".zarr", 1)[1]  # (the temporary store's name differs from p's)
        assert any(f.endswith(rel.split("/", 1)[1]) for f in flushed), s
    assert {k: v.tobytes() for k, v in tb.load(str(p)).items()} == {
        k: v.tobytes() for k, v in tree.items()
    }
