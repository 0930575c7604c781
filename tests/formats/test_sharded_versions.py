"""One load of a sharded checkpoint gives tensors of one version of each shard: a shard
rewritten in place while its tensors are read (between two of them, by copies) or between
its check and its mapping is read again (``CheckpointChangedError`` inside ``load``, which
retries), never returned half old, half new."""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import tensorbridge as tb
from tensorbridge.formats import file_lease
from tensorbridge.formats.mapping import Arena

N = file_lease.MIN_BYTES // 4  # a shard large enough to be leased


def rewrite_in_place(path: str, data: bytes) -> None:
    ino = os.stat(path).st_ino
    with open(path, "r+b") as f:  # as open(path, "wb") writers do: same inode
        f.truncate(0)
        f.write(data)
    assert os.stat(path).st_ino == ino


def one_shard(tmp_path, n: int) -> tuple[str, str, dict]:
    d = str(tmp_path / "ck") + "/"
    tb.save({"a": np.full(n, 1, np.float32), "b": np.full(n, 1, np.float32)}, d)
    shards = [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors")]
    assert len(shards) == 1
    with tb.open(shards[0]) as r:
        meta = dict(r.metadata)  # (the generation: the new bytes belong to the same save)
    return d, shards[0], meta


def new_bytes(tmp_path, meta: dict, n: int) -> bytes:
    p = str(tmp_path / "new.safetensors")
    save_file({"a": np.full(n, 2, np.float32), "b": np.full(n, 2, np.float32)}, p, metadata=meta)
    with open(p, "rb") as f:
        return f.read()


@pytest.mark.parametrize("mmap", [False, None])
def test_a_shard_rewritten_between_two_copied_tensors_is_read_again(tmp_path, monkeypatch, mmap):
    n = 1000  # (small: the default copies it too)
    d, shard, meta = one_shard(tmp_path, n)
    data = new_bytes(tmp_path, meta, n)
    real = Arena.array
    fired: list[str] = []

    def between(self, reader, name):  # type: ignore[no-untyped-def]
        if name == "b" and not fired:
            fired.append(name)
            rewrite_in_place(shard, data)
        return real(self, reader, name)

    monkeypatch.setattr(Arena, "array", between)
    got = tb.load(d, mmap=mmap)
    assert fired == ["b"]
    assert got["a"][0] == got["b"][0] == 2.0  # read again: the new version, whole


@pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's")
def test_a_shard_rewritten_between_its_check_and_its_mapping_is_read_again(tmp_path, monkeypatch):
    """The shard is rewritten in place after its spans were checked and before the lease
    is taken: the mapping would hold new bytes at the old header's offsets."""
    d = str(tmp_path / "ck") + "/"
    os.makedirs(d)

    def shard(fill: float) -> bytes:
        a = np.full(N, fill, np.float32).tobytes()
        hdr = {
            "pad0": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
            "a": {"dtype": "F32", "shape": [N], "data_offsets": [3, 3 + 4 * N]},
            "pad1": {"dtype": "U8", "shape": [1], "data_offsets": [3 + 4 * N, 4 + 4 * N]},
            "b": {"dtype": "F32", "shape": [N], "data_offsets": [4 + 4 * N, 4 + 8 * N]},
        }
        h = json.dumps(hdr).encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + b"\0\0\0" + a + b"\0" + a

    name = "model-00001-of-00001.safetensors"
    with open(d + name, "wb") as f:
        f.write(shard(1.0))
    index = {"metadata": {}, "weight_map": {k: name for k in ("pad0", "a", "pad1", "b")}}
    with open(d + "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    real = file_lease.guarded_map
    fired: list[str] = []

    def before_mapping(fd, size=None):  # type: ignore[no-untyped-def]
        if not fired:  # the span was checked against the shard's stamp: now the lease
            fired.append("rewritten")
            rewrite_in_place(d + name, shard(2.0))
        return real(fd, size)

    monkeypatch.setattr(file_lease, "guarded_map", before_mapping)
    got = tb.load(d)
    assert fired == ["rewritten"]
    assert float(got["a"][0]) == float(got["b"][0]) == 2.0


@pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's")
def test_a_shard_rewritten_after_its_mapping_keeps_the_mapped_version(tmp_path, monkeypatch):
    """Once mapped under a lease, a shard rewritten in place before the load ends is not
    read again (the lease kept the mapped bytes: one version), so a writer still at work
    cannot make the load fail."""
    n = file_lease.MIN_BYTES // 4
    d, shard, meta = one_shard(tmp_path, n)
    data = new_bytes(tmp_path, meta, n)
    from tensorbridge.formats.mapping import FileMaps

    real = FileMaps.array
    asked: list[str] = []

    def after_mapping(self, reader, name):  # type: ignore[no-untyped-def]
        asked.append(name)
        if len(asked) == 2:  # the shard was mapped for the first tensor
            rewrite_in_place(shard, data)
        return real(self, reader, name)

    monkeypatch.setattr(FileMaps, "array", after_mapping)
    got = tb.load(d)
    assert asked == ["a", "b"]  # once each: not read again
    assert float(got["a"][0]) == float(got["b"][0]) == 1.0


@pytest.mark.parametrize("change", ["chmod", "link"])
def test_a_metadata_only_change_during_a_load_costs_a_read_not_an_error(
    tmp_path, monkeypatch, change
):
    """The version includes ctime (a rewrite with its mtime restored is still seen), so a
    chmod or a new hard link while the shard is read changes it too: the load reads again
    and returns the same tensors, it does not fail."""
    n = 1000
    d, shard, _ = one_shard(tmp_path, n)
    real = Arena.array
    fired: list[str] = []
    reads: list[str] = []

    def between(self, reader, name):  # type: ignore[no-untyped-def]
        reads.append(name)
        if name == "b" and not fired:
            fired.append(name)
            before = os.stat(shard).st_ctime_ns
            if change == "chmod":
                os.chmod(shard, 0o600)
            else:
                os.link(shard, str(tmp_path / "second-name"))
            # (ctime has nanosecond resolution but coarse ticks: make sure it moved)
            while os.stat(shard).st_ctime_ns == before:
                os.chmod(shard, os.stat(shard).st_mode ^ 0o004)
        return real(self, reader, name)

    monkeypatch.setattr(Arena, "array", between)
    got = tb.load(d, mmap=False)
    assert fired == ["b"]
    assert reads == ["a", "b", "a", "b"]  # one more read of the shard, then the same tensors
    assert got["a"].tobytes() == got["b"].tobytes() == np.full(n, 1, np.float32).tobytes()
