"""Sharded loads map the descriptor each shard was checked through at open (a reader opened
with ``hold=True``), instead of opening the shard again: the arrays are of the file that
was checked, a shard modified since is refused (``load`` reads the checkpoint again), and
every held descriptor is closed."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import CheckpointChangedError, FileFormatError
from tensorbridge.formats import file_lease, sharded
from tensorbridge.formats.mapping import FileMaps
from tensorbridge.formats.sharded import FORMAT, ShardedReader

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's")

N = file_lease.MIN_BYTES // 4  # float32 values: each shard is leased, not copied


def checkpoint(tmp_path, shards: int = 3):
    """``shards`` shards of one 1 MiB tensor each, written by tensorbridge."""
    sd = {f"w{i}": np.full(N, i + 1, np.float32) for i in range(shards)}
    d = str(tmp_path / "ck") + "/"
    tb.save(sd, d, max_shard_size=N * 4)
    names = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))
    assert len(names) == shards
    return d, sd, [os.path.join(d, n) for n in names]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def paths_opened(monkeypatch, suffix: str = ".safetensors") -> list[str]:
    """Every os.open of a path ending in ``suffix`` from now on."""
    opened: list[str] = []
    real = os.open

    def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(path, str) and path.endswith(suffix):
            opened.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return opened


@pytest.mark.parametrize("mmap", [None, True])
def test_a_mapping_load_opens_each_shard_once(tmp_path, monkeypatch, mmap):
    d, sd, shards = checkpoint(tmp_path)
    opened = paths_opened(monkeypatch)
    got = tb.load(d, mmap=mmap)
    assert sorted(opened) == sorted(map(os.path.basename, shards))  # the check's open only
    for k, v in sd.items():
        assert got[k].tobytes() == v.tobytes()
    if mmap is None:
        assert file_lease.guards() >= len(shards)


def test_a_copying_load_holds_nothing(tmp_path, monkeypatch):
    d, sd, _ = checkpoint(tmp_path)
    held: list[bool] = []
    real = ShardedReader.__init__

    def init(self, path, variant=None, *, hold=False):  # type: ignore[no-untyped-def]
        held.append(hold)
        real(self, path, variant, hold=hold)

    monkeypatch.setattr(ShardedReader, "__init__", init)
    got = tb.load(d, mmap=False)
    assert held == [False]
    assert all(got[k].tobytes() == v.tobytes() for k, v in sd.items())


@pytest.mark.parametrize("leased", [True, False])
def test_a_shard_replaced_after_open_is_refused(tmp_path, leased):
    d, sd, shards = checkpoint(tmp_path)
    with FORMAT.open(d, hold=True) as r:
        assert FileMaps(leased=leased).array(r, "w0") is not None
        # another save puts a new file (new inode, other values) under the shard's name;
        # the held descriptor is of the old file, whose change time moved as it was unlinked
        shutil.copyfile(shards[1], shards[1] + ".tmp")
        with open(shards[1] + ".tmp", "r+b") as f:
            f.seek(-N * 4, os.SEEK_END)
            f.write(np.full(N, 99, np.float32).tobytes())
        os.replace(shards[1] + ".tmp", shards[1])
        with pytest.raises(CheckpointChangedError, match="00002-of-00003.*replaced"):
            FileMaps(leased=leased).array(r, "w1")
    got = tb.load(d)  # a load reads the new one, whole
    assert got["w1"].tobytes() == np.full(N, 99, np.float32).tobytes()
    assert got["w2"].tobytes() == sd["w2"].tobytes()


@pytest.mark.parametrize("how", ["appended", "rewritten"])
def test_a_shard_modified_after_open_is_refused(tmp_path, how):
    d, _, shards = checkpoint(tmp_path)
    with FORMAT.open(d, hold=True) as r:
        assert FileMaps(leased=True).array(r, "w0") is not None
        if how == "appended":  # same inode, longer
            with open(shards[1], "ab") as f:
                f.write(b"\0" * 8)
        else:  # same inode, same size, later times
            st = os.stat(shards[1])
            with open(shards[1], "r+b") as f:
                head = f.read(8)
                f.seek(0)
                f.write(head)
            os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(CheckpointChangedError, match="00002-of-00003.* was replaced or"):
            FileMaps(leased=True).array(r, "w1")
        # taken directly (no span of it asked first), the descriptor is checked as well,
        # and closed when refused
        with open(shards[2], "ab") as f:
            f.write(b"\0")
        span = r._spans["w2"]
        assert span is not None
        before = open_fds()
        with pytest.raises(CheckpointChangedError, match="00003-of-00003.* was modified"):
            r.take_descriptor(span)
        assert len(before - open_fds()) == 1


def test_load_reads_again_when_a_shard_changes_between_open_and_mapping(tmp_path, monkeypatch):
    d, sd, shards = checkpoint(tmp_path)
    real = ShardedReader.take_descriptor
    calls = [0]

    def take(self, span, smallest=0):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 1:  # once, after the open checked every shard: shard 2 is rewritten
            st = os.stat(shards[1])
            os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return real(self, span, smallest)

    monkeypatch.setattr(ShardedReader, "take_descriptor", take)
    got = tb.load(d)
    assert calls[0] == 1 + 3  # the first attempt was refused at shard 2, the second mapped all
    assert all(got[k].tobytes() == v.tobytes() for k, v in sd.items())


def test_held_descriptors_are_closed(tmp_path, monkeypatch):
    d, sd, shards = checkpoint(tmp_path)
    before = open_fds()
    r = FORMAT.open(d, hold=True)
    assert len(open_fds() - before) == len(shards)
    r.close()
    assert open_fds() == before
    got = tb.load(d, names=["w0"])  # the other shards' descriptors are not taken
    assert got["w0"].tobytes() == sd["w0"].tobytes()
    del got
    assert open_fds() == before
    # an open refused after some shards were checked closes what it held
    os.truncate(shards[2], 100)
    with pytest.raises(FileFormatError):
        FORMAT.open(d, hold=True)
    assert open_fds() == before


def test_at_most_held_shards_are_held(tmp_path, monkeypatch):
    d, sd, shards = checkpoint(tmp_path)
    monkeypatch.setattr(sharded, "HELD_SHARDS", 1)
    before = open_fds()
    with FORMAT.open(d, hold=True) as r:
        assert len(open_fds() - before) == 1
        opened = paths_opened(monkeypatch)
        maps = FileMaps(leased=True)
        arrays = [maps.array(r, name) for name in r.keys()]
    assert sorted(opened) == sorted(map(os.path.basename, shards[1:]))  # opened again
    for a, name in zip(arrays, sd, strict=True):
        assert a is not None and a.tobytes() == sd[name].tobytes()


def test_arrays_over_held_descriptors_never_change_when_the_shards_are_rewritten(tmp_path):
    d, sd, shards = checkpoint(tmp_path)
    got = tb.load(d, to="torch")
    before = file_lease.guards()
    assert before >= len(shards)  # every shard mapped under a lease
    for shard in shards:  # rewritten in place (same inode, O_TRUNC), shorter, other values
        with open(shard, "wb") as f:
            f.write(bytes(range(256)) * 16)
        assert os.path.getsize(shard) == 4096  # the writer went on
    for k, v in sd.items():
        assert got[k].numpy().tobytes() == v.tobytes()
    assert file_lease.guards() == before - len(shards)  # the leases were given up


def test_readers_share_one_budget_of_held_descriptors(tmp_path, monkeypatch):
    """Readers in many threads hold at most HELD_SHARDS descriptors between them (each
    taking its own share would run the open-file limit out under concurrent loads); a
    descriptor handed over or closed returns to the budget."""
    d, sd, shards = checkpoint(tmp_path)
    monkeypatch.setattr(sharded, "HELD_SHARDS", 4)
    before = open_fds()
    assert sharded._held_now == 0
    a = FORMAT.open(d, hold=True)  # holds its 3
    b = FORMAT.open(d, hold=True)  # holds 1: the budget's last
    assert sharded._held_now == 4
    assert len(open_fds() - before) == 4
    c = FORMAT.open(d, hold=True)  # holds none: opens by path when it maps
    assert sharded._held_now == 4
    maps = FileMaps(leased=True)
    arrays = [maps.array(a, name) for name in a.keys()]  # a's descriptors go to the leases
    assert sharded._held_now == 1
    for r in (a, b, c):
        r.close()
    assert sharded._held_now == 0
    for arr, name in zip(arrays, sd, strict=True):
        assert arr is not None and arr.tobytes() == sd[name].tobytes()
    del arrays, arr, maps  # (the mappings keep the leases)
    import gc

    gc.collect()
    assert open_fds() == before
