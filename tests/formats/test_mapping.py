"""load(..., mmap=...): mapped arrays are the file's bytes (proven by changing the file in
place), copies never change, replaced files never show through, writes stay private."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge.formats import mapping
from tensorbridge.formats.safetensors import WHOLE_FILE_BYTES

A = np.arange(1024, dtype=np.float32)
B = np.arange(12, dtype=np.int64).reshape(3, 4)


def write(kind: str, d) -> str:
    tree = {"a": A, "b": B, "flag": np.array([True, False]), "empty": np.zeros((0, 3), np.float32)}
    if kind == "safetensors":
        p = str(d / "m.safetensors")
        tb.save(tree, p)
    elif kind == "sharded":
        p = str(d / "ck") + "/"
        tb.save(tree, p, max_shard_size=2048)
    elif kind == "pt":
        p = str(d / "m.pt")
        torch.save({k: torch.from_numpy(v) for k, v in tree.items()}, p)
    else:
        p = str(d / "a.npy")
        np.save(p, A)
    return p


def locate(path: str, values: np.ndarray) -> tuple[str, int]:
    """The file (a shard, for a directory) and offset where ``values``' bytes lie."""
    files = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        at = data.find(values.tobytes())
        if at >= 0:
            return f, at
    raise AssertionError("bytes not found")


def poke(path: str, values: np.ndarray, new: bytes) -> None:
    """Overwrite the first bytes of ``values`` in the file, in place (same inode)."""
    f, at = locate(path, values)
    with open(f, "r+b") as fh:
        fh.seek(at)
        fh.write(new)


KINDS = ["safetensors", "sharded", "pt", "npy"]


@pytest.mark.parametrize("kind", KINDS)
def test_mmap_true_maps_the_file(tmp_path, kind):
    p = write(kind, tmp_path)
    got = tb.load(p, mmap=True)
    a = got if kind == "npy" else got["a"]
    assert a.tobytes() == A.tobytes() and a.flags.writeable
    poke(p, A, np.float32(-7).tobytes())  # an in-place rewrite shows through: it is the file
    assert a[0] == -7
    a[1] = 42  # copy-on-write: the file does not change
    assert tb.load(p, mmap=False)["a" if kind != "npy" else ...][1] == 1
    if kind != "npy":
        assert got["b"].tobytes() == B.tobytes()
        assert got["flag"].tolist() == [True, False] and got["empty"].shape == (0, 3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", [False, None])
def test_copies_never_change_with_the_file(tmp_path, kind, mode, monkeypatch):
    monkeypatch.setattr(mapping.os, "statvfs", lambda p: SimpleNamespace(f_flag=0))
    p = write(kind, tmp_path)
    got = tb.load(p, mmap=mode)
    a = got if kind == "npy" else got["a"]
    poke(p, A, np.float32(-7).tobytes())
    assert a.tobytes() == A.tobytes()


def test_read_only_file_systems_are_mapped_by_default(tmp_path, monkeypatch):
    p = str(tmp_path / "m.safetensors")
    big = np.ones(WHOLE_FILE_BYTES // 4, np.float32)  # (a smaller file is read whole)
    tb.save({"a": A, "big": big}, p)
    monkeypatch.setattr(mapping.os, "statvfs", lambda p: SimpleNamespace(f_flag=os.ST_RDONLY))
    a = tb.load(p)["a"]
    poke(p, A, np.float32(-7).tobytes())  # (a test can still write it; no one else could)
    assert a[0] == -7


def test_small_files_are_read_whole_even_on_read_only_file_systems(tmp_path, monkeypatch):
    p = write("safetensors", tmp_path)
    assert os.path.getsize(p) <= WHOLE_FILE_BYTES
    monkeypatch.setattr(mapping.os, "statvfs", lambda p: SimpleNamespace(f_flag=os.ST_RDONLY))
    got = tb.load(p)
    poke(p, A, np.float32(-7).tobytes())
    assert got["a"].tobytes() == A.tobytes()  # a copy: one read costs less than a mapping
    assert got["b"].tobytes() == B.tobytes() and got["a"].flags.writeable


def test_replaced_file_leaves_mapped_arrays_unchanged(tmp_path):
    p = write("safetensors", tmp_path)
    a = tb.load(p, mmap=True)["a"]
    tb.save({"a": -A, "b": B}, p)  # atomic replace: a new inode
    assert a.tobytes() == A.tobytes()


def test_torch_tensors_share_the_mapping(tmp_path):
    p = write("safetensors", tmp_path)
    t = tb.load(p, to="torch", mmap=True)["a"]
    poke(p, A, np.float32(-7).tobytes())
    assert t[0].item() == -7.0
    copied = tb.load(p, to="torch")["a"]
    poke(p, np.array([-7], np.float32), np.float32(5).tobytes())
    assert copied[0].item() == -7.0 and t[0].item() == 5.0


def test_file_truncated_after_open_is_refused_not_mapped(tmp_path):
    p = write("safetensors", tmp_path)
    with tb.open(p) as r:
        os.truncate(p, 100)
        with pytest.raises(tb.FileFormatError, match="truncated"):
            mapping.FileMaps().array(r, "a")


@pytest.mark.parametrize("kind", KINDS)
def test_copies_share_one_allocation_and_hold_the_right_bytes(tmp_path, kind):
    p = write(kind, tmp_path)
    if kind == "npy":
        assert tb.load(p, mmap=False).tobytes() == A.tobytes()
        return
    got = tb.load(p, mmap=False)
    assert got["a"].tobytes() == A.tobytes() and got["b"].tobytes() == B.tobytes()
    assert got["flag"].tolist() == [True, False] and got["empty"].shape == (0, 3)
    assert got["a"].base is not None and got["a"].base is got["b"].base  # one arena
    if kind == "safetensors" and os.path.getsize(p) <= WHOLE_FILE_BYTES:
        # read whole: views of the file's bytes, each aligned for its dtype
        assert got["a"].flags.aligned and got["b"].flags.aligned
    else:
        assert got["a"].ctypes.data % 64 == 0 and got["b"].ctypes.data % 64 == 0
    only = tb.load(p, mmap=False, names=["b"])
    assert list(only) == ["b"] and only["b"].tobytes() == B.tobytes()
    assert only["b"].base.nbytes < A.nbytes  # the arena holds only what was asked for
