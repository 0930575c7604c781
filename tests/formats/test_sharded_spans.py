"""Sharded checkpoints: spans taken while the shards are checked at open, and the link
policy's one-lstat path for plain names (what loads use; see bench/formats_io.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

import tensorbridge as tb
from tensorbridge.errors import CheckpointChangedError, FileFormatError, UnsafeContentError
from tensorbridge.formats import safetensors as st_mod
from tensorbridge.formats.sharded import FORMAT


def checkpoint(tmp_path, foreign: bool = False):
    """Three shards; tensorbridge's (with generations) or huggingface-style (without)."""
    rng = np.random.default_rng(1)
    sd = {f"w{i}": torch.from_numpy(rng.standard_normal(64, dtype=np.float32)) for i in range(6)}
    d = tmp_path / "ck"
    if foreign:
        d.mkdir()
        shards = {"s1.safetensors": ["w0", "w1"], "s2.safetensors": ["w2", "w3"]}
        shards["s3.safetensors"] = ["w4", "w5"]
        for shard, names in shards.items():
            safetensors.torch.save_file({n: sd[n] for n in names}, str(d / shard))
        index = {"weight_map": {n: s for s, ns in shards.items() for n in ns}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tb.save(sd, str(d) + "/", max_shard_size=2 * 64 * 4)
    return d, sd


def count_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = st_mod.SafetensorsReader.__init__

    def init(self, path):  # type: ignore[no-untyped-def]
        opened.append(os.path.basename(path))
        real(self, path)

    monkeypatch.setattr(st_mod.SafetensorsReader, "__init__", init)
    return opened


@pytest.mark.parametrize("foreign", [False, True])
@pytest.mark.parametrize("mmap", [None, True, False])
def test_a_load_parses_each_shard_once(tmp_path, monkeypatch, foreign, mmap):
    d, sd = checkpoint(tmp_path, foreign)
    shards = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))
    assert len(shards) == 3
    opened = count_opens(monkeypatch)
    got = tb.load(d, to="torch", mmap=mmap)
    assert sorted(opened) == shards  # the open's check; spans and copies reopen none
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].numpy().tobytes() == v.numpy().tobytes()


def test_spans_are_the_shard_readers_own(tmp_path):
    d, sd = checkpoint(tmp_path)
    with FORMAT.open(d) as r:
        for name in r.keys():
            with st_mod.FORMAT.open(r.shard_of(name)) as shard:
                assert r.raw_span(name) == shard.raw_span(name)
            # and the bytes there are the tensor's
            span = r.raw_span(name)
            assert span is not None
            with open(span.path, "rb") as f:
                f.seek(span.offset)
                assert f.read(span.nbytes) == sd[name].numpy().tobytes()


@pytest.mark.parametrize("how", ["replaced", "appended", "rewritten"])
def test_a_span_of_a_shard_changed_after_open_is_refused(tmp_path, how):
    d, _ = checkpoint(tmp_path, foreign=True)  # no generations: only the identity tells
    s2 = d / "s2.safetensors"
    with FORMAT.open(d) as r:
        assert r.raw_span("w0") is not None  # s1 checked
        if how == "replaced":  # a new inode, same bytes
            shutil.copyfile(s2, d / "new")
            os.replace(d / "new", s2)
        elif how == "appended":  # same inode, longer
            with open(s2, "ab") as f:
                f.write(b"\0" * 8)
        else:  # same inode, same size, later times
            data = s2.read_bytes()
            st = os.stat(s2)
            os.utime(s2, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            s2.write_bytes(data)
        assert r.raw_span("w1") is not None  # still s1: nothing to check
        with pytest.raises(CheckpointChangedError, match="s2.safetensors' was replaced or mod"):
            r.raw_span("w2")


def test_a_span_checks_again_after_a_read_moved_to_another_shard(tmp_path):
    d, _ = checkpoint(tmp_path, foreign=True)
    with FORMAT.open(d) as r:
        assert r.raw_span("w0") is not None
        r.read("w2")  # opens s2 (s1's check is over)
        with open(d / "s1.safetensors", "ab") as f:
            f.write(b"\0")
        with pytest.raises(CheckpointChangedError, match="s1.safetensors' was replaced or mod"):
            r.raw_span("w1")


def test_spans_after_close_are_refused(tmp_path):
    d, _ = checkpoint(tmp_path)
    r = FORMAT.open(d)
    r.close()
    with pytest.raises(FileFormatError, match="closed.*Fix: open it again"):
        r.raw_span("w0")


# --- the link policy's paths -----------------------------------------------------------


def _index_to(d, target: str) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {
        n: target if s == "s2.safetensors" else s for n, s in index["weight_map"].items()
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["directory", "fifo", "link to a directory", "link to a fifo"])
def test_a_shard_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    d, _ = checkpoint(tmp_path, foreign=True)
    os.unlink(d / "s2.safetensors")
    if kind.startswith("link"):
        target = d / "inside"
        os.mkdir(target) if kind.endswith("directory") else os.mkfifo(target)
        os.symlink("inside", d / "s2.safetensors")
    elif kind == "directory":
        os.mkdir(d / "s2.safetensors")
    else:
        os.mkfifo(d / "s2.safetensors")
    with pytest.raises(FileFormatError) as info:
        FORMAT.open(str(d))
    assert type(info.value) is FileFormatError
    assert "shard 's2.safetensors' is not a regular file. Fix: replace it" in str(info.value)


def test_a_dangling_link_shard_is_missing_and_a_link_inside_reads(tmp_path):
    d, sd = checkpoint(tmp_path, foreign=True)
    os.replace(d / "s2.safetensors", d / "real.safetensors")
    os.symlink("real.safetensors", d / "s2.safetensors")
    got = tb.load(d)
    assert all(got[k].tobytes() == v.numpy().tobytes() for k, v in sd.items())
    os.unlink(d / "real.safetensors")
    with pytest.raises(FileFormatError, match="shard 's2.safetensors' does not exist"):
        FORMAT.open(str(d))


def test_a_link_out_of_the_directory_is_refused_however_named(tmp_path):
    d, _ = checkpoint(tmp_path, foreign=True)
    outside = tmp_path / "outside.safetensors"
    os.replace(d / "s2.safetensors", outside)
    os.symlink(outside, d / "s2.safetensors")
    with pytest.raises(UnsafeContentError, match="resolves to .*outside"):
        FORMAT.open(str(d))
