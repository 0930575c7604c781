"""A sharded save flushes its files together, then lands names in an order a crash cannot
mix: every shard's bytes and the index's are fsynced (at once, from several threads)
before any name lands; the shards' names land and their directory is fsynced before the
index's name lands; the directory is fsynced again after it. A failure at any of those
steps leaves the old checkpoint byte-identical and no file of the new save behind."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import FileFormatError
from tensorbridge.formats.atomic import TMP_MARKER

INDEX = "model.safetensors.index.json"


def tree(value: float) -> dict[str, np.ndarray]:
    # 4 tensors of 400 bytes, at most 500 bytes a shard: 4 shards
    return {f"w{i}": np.full(100, value + i, np.float32) for i in range(4)}


def snapshot(directory) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def record(monkeypatch, parties: int = 0) -> list[tuple[str, ...]]:
    """Every os.fsync (("fsync", path, "dir" or "file")) and os.replace (("replace",
    source, destination)), in order. With ``parties``, each file's fsync waits until that
    many file fsyncs are under way at once (a save flushing one file after another never
    gets there: its first flush fails with BrokenBarrierError)."""
    events: list[tuple[str, ...]] = []
    lock = threading.Lock()
    real_fsync, real_replace = os.fsync, os.replace
    barrier = threading.Barrier(parties) if parties else None

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        kind = "dir" if os.path.isdir(path) else "file"
        if kind == "file" and barrier is not None:
            barrier.wait(timeout=60)
        with lock:
            events.append(("fsync", path, kind))
        real_fsync(fd)

    def replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None) -> None:
        def where(name, dir_fd):  # (a name inside a directory's descriptor, as a path)
            name = os.fspath(name)
            if dir_fd is None:
                return name
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)

        with lock:
            events.append(("replace", where(src, src_dir_fd), where(dst, dst_dir_fd)))
        real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_shards_and_index_flushed_together_then_shard_names_then_index(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    tb.save(tree(0.0), str(d) + "/", max_shard_size=500)  # an old checkpoint to replace
    events = record(monkeypatch, parties=5)  # 4 shards + the index, flushed at once
    tb.save(tree(10.0), str(d) + "/", max_shard_size=500)
    monkeypatch.undo()

    where = {e: i for i, e in enumerate(events) if e[0] == "replace" or e[2] == "file"}
    renames = [e for e in events if e[0] == "replace"]
    assert [os.path.basename(e[2]) for e in renames] == sorted(
        sorted(os.listdir(d)), key=lambda n: n == INDEX
    )  # the 4 shards (in order), then the index
    index_rename = renames[-1]
    file_syncs = [e for e in events if e[2] == "file"]
    assert len(file_syncs) == 5  # each file flushed once
    assert sorted(e[1] for e in file_syncs) == sorted(e[1] for e in renames)
    last_flush = max(where[e] for e in file_syncs)
    # every file (shards and index) is flushed before any name lands
    assert last_flush < min(where[e] for e in renames)
    # the directory is flushed after the last shard's name and before the index's name
    dir_syncs = [i for i, e in enumerate(events) if e[2] == "dir" and e[1] == str(d)]
    assert any(where[renames[-2]] < i < where[index_rename] for i in dir_syncs)
    # and after the index's name, before the save returns
    assert max(dir_syncs) > where[index_rename]
    got = tb.load(str(d) + "/")
    assert all(np.array_equal(got[k], v) for k, v in tree(10.0).items())
    assert not [n for n in os.listdir(d) if TMP_MARKER in n]


def test_a_failed_flush_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    tb.save(tree(0.0), str(d) + "/", max_shard_size=500)
    before = snapshot(d)
    real = os.fsync
    calls: list[int] = []
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(path):
            with lock:
                calls.append(fd)
                n = len(calls)
            if n == 3:
                raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(FileFormatError, match=r"writing failed \(Input/output error\)"):
        tb.save(tree(10.0), str(d) + "/", max_shard_size=500)
    monkeypatch.undo()
    assert len(calls) == 5  # every flush ran to its end before the error was raised
    assert snapshot(d) == before  # no new shard, no temporary file, old bytes
    got = tb.load(str(d) + "/")
    assert all(np.array_equal(got[k], v) for k, v in tree(0.0).items())


@pytest.mark.parametrize("fail_at", ["model-00003-of-00004.safetensors", INDEX])
def test_a_failed_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch, fail_at):
    d = tmp_path / "ckpt"
    tb.save(tree(0.0), str(d / INDEX), max_shard_size=500)
    # the new save's shards get new names (tagged), since the standard ones are taken
    before = snapshot(d)
    real = os.replace

    def replace(src, dst, **kw) -> None:
        name = os.path.basename(os.fspath(dst))
        if name == fail_at or (fail_at != INDEX and name.endswith(fail_at[5:])):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(FileFormatError, match=r"writing failed \(Input/output error\)"):
        tb.save(tree(10.0), str(d) + "/", max_shard_size=500)
    monkeypatch.undo()
    assert snapshot(d) == before
    got = tb.load(str(d) + "/")
    assert all(np.array_equal(got[k], v) for k, v in tree(0.0).items())


def test_many_shards_land_in_groups_all_before_the_index(tmp_path, monkeypatch):
    from tensorbridge.formats import sharded

    monkeypatch.setattr(sharded, "PENDING_SHARDS", 2)  # 4 shards: two groups of two
    d = tmp_path / "ckpt"
    events = record(monkeypatch)
    tb.save(tree(0.0), str(d) + "/", max_shard_size=500)
    monkeypatch.undo()
    kinds = [
        "flush" if e[0] == "fsync" and e[2] == "file" else e[0] if e[0] == "replace" else "dir"
        for e in events
    ]
    # each group: its files flushed, renamed, the directory flushed; the index last
    group = ["flush", "flush", "replace", "replace", "dir"]
    assert kinds[:10] == group + group
    assert kinds[10:] == ["flush", "replace", "dir", "dir"]  # index; after removing leftovers
    assert os.path.basename(events[-3][2]) == INDEX
    got = tb.load(str(d) + "/")
    assert all(np.array_equal(got[k], v) for k, v in tree(0.0).items())
