"""Sharded saves into a directory while others read it: every read sees one version or
raises CheckpointChangedError, never a mix (eager loads and lazy readers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np

import tensorbridge as tb
from tensorbridge.errors import CheckpointChangedError

TENSORS = 6
#: each save: version v in every element; tensor "s" has v % 3 + 1 rows (shapes change too)
WRITER = textwrap.dedent("""
    import sys, time, numpy as np, tensorbridge as tb
    d, first, step, until = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    v = first
    while time.time() < until:
        tree = {f"t{i}": np.full(64, v, np.int64) for i in range(TENSORS)}
        tree["s"] = np.full((v % 3 + 1, 8), v, np.int64)
        tb.save(tree, d + "/", max_shard_size=1100)
        v += step
""").replace("TENSORS", str(TENSORS))


def versions(tree: dict) -> set[int]:
    assert tree["s"].shape == (int(tree["s"].flat[0]) % 3 + 1, 8)
    return {int(a.flat[0]) for a in tree.values()} | {int(x) for a in tree.values() for x in a.flat}


def test_reads_during_concurrent_sharded_saves_never_mix_versions(tmp_path):
    d = str(tmp_path / "ck")
    tb.save(
        {
            **{f"t{i}": np.full(64, 0, np.int64) for i in range(TENSORS)},
            "s": np.zeros((1, 8), np.int64),
        },
        d + "/",
        max_shard_size=1100,
    )
    until = time.time() + 4.0
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, d, str(first), "2", str(until)], env=dict(os.environ)
        )
        for first in (1, 2)
    ]  # two writers
    loads = changed = lazy_ok = lazy_changed = 0
    try:
        while time.time() < until:
            try:
                got = tb.load(d)
            except CheckpointChangedError:
                changed += 1
            else:
                assert len(versions(got)) == 1, versions(got)
                loads += 1
            try:  # a lazy reader: opened now, read after the next saves
                with tb.open(d) as r:
                    said = {k: r.info(k).shape for k in r}
                    time.sleep(0.02)
                    got = {k: r.read(k) for k in r}
            except CheckpointChangedError:
                lazy_changed += 1
            else:
                assert {k: a.shape for k, a in got.items()} == said
                assert len(versions(got)) == 1, versions(got)
                lazy_ok += 1
    finally:
        for w in writers:
            w.wait(timeout=60)
    assert all(w.returncode == 0 for w in writers)
    assert loads > 0 and lazy_ok + lazy_changed > 0, (loads, changed, lazy_ok, lazy_changed)
    final = tb.load(d)
    assert len(versions(final)) == 1
    assert max(os.listdir(d)) == "model.safetensors.index.json"


def test_lazy_reader_refuses_a_shard_of_a_later_save(tmp_path):
    """The case of the report: opened on v1, read after two re-saves (v3 reuses v1's shard
    names): a typed error, not v3's data under v1's shapes."""
    d = str(tmp_path / "ck") + "/"
    tb.save({"a": np.zeros(4), "b": np.zeros(4)}, d, max_shard_size=40)
    with tb.open(d) as r:
        assert r.info("a").shape == (4,)
        tb.save({"a": np.ones(4), "b": np.ones(4)}, d, max_shard_size=40)
        tb.save({"a": np.full(9, 3.0), "b": np.full(9, 3.0)}, d, max_shard_size=80)
        try:
            got = r.read("a")
        except CheckpointChangedError as exc:
            assert "changed while it was being read" in str(exc) and "open or load it again" in str(
                exc
            )
        else:
            raise AssertionError(f"read v3 data {got} through a v1 reader")
    assert tb.load(d)["a"].tolist() == [3.0] * 9
