"""Attacks on the sharded save's commit (every shard and the index written as temporary
files, flushed together, then the shards' names, then the index's name).

A Ctrl-C (or a SIGTERM handler raising SystemExit) that arrives while the directory is
fsynced *after the index's name landed* must not take the new index's shards away: the
directory must hold one complete checkpoint, old or new, whatever the save raises."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import TensorBridgeError
from tensorbridge.formats.atomic import TMP_MARKER

INDEX = "model.safetensors.index.json"


def tree(value: float, count: int) -> dict[str, np.ndarray]:
    # tensors of 400 bytes, at most 500 bytes a shard: one shard each
    return {f"w{i}": np.full(100, value + i, np.float32) for i in range(count)}


def complete_checkpoint(directory) -> dict[str, np.ndarray]:
    """The tensors of the checkpoint in ``directory``; fails if the index names a shard
    that is not there."""
    index = json.loads((directory / INDEX).read_text())
    missing = sorted(n for n in set(index["weight_map"].values()) if not (directory / n).exists())
    assert not missing, f"the index names shards that are gone: {missing}"
    return {k: np.asarray(v) for k, v in tb.load(str(directory) + "/").items()}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_last_directory_fsync_leaves_one_complete_checkpoint(
    tmp_path, monkeypatch, signum
):
    d = tmp_path / "ckpt"
    old, new = tree(0.0, 4), tree(10.0, 3)
    tb.save(old, str(d) + "/", max_shard_size=500)
    index_landed = []
    real_fsync, real_replace = os.fsync, os.replace

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        if os.fspath(dst).endswith(INDEX):
            index_landed.append(True)

    def fsync(fd):
        real_fsync(fd)
        if index_landed and os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            index_landed.clear()
            os.kill(os.getpid(), signum)  # arrives while the directory was fsynced

    def on_term(*_):
        raise SystemExit(143)  # what training scripts commonly install

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    previous = signal.signal(signal.SIGTERM, on_term)
    # (a shell that starts a job in the background makes it ignore SIGINT)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            tb.save(new, str(d) + "/", max_shard_size=500)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        monkeypatch.undo()
    got = complete_checkpoint(d)
    assert same(got, old) or same(got, new)
    assert not [n for n in os.listdir(d) if TMP_MARKER in n]


def test_failed_dup_of_the_temporary_file_leaves_nothing_behind(tmp_path, monkeypatch):
    # EMFILE is what a process at its open-file limit gets; the temporary file (and its
    # descriptor, whose lock keeps other writers' cleanup away) must not be left behind
    dest = tmp_path / "model.safetensors"
    tb.save(tree(0.0, 2), str(dest))
    before = dest.read_bytes()

    def dup(fd):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "dup", dup)
    with pytest.raises(TensorBridgeError, match="unchanged"):
        tb.save(tree(10.0, 2), str(dest))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert dest.read_bytes() == before


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import tensorbridge as tb
    directory, kill_at, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    real, calls = os.replace, [0]
    def replace(src, dst, **kw):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, **kw)
    os.replace = replace
    tb.save({f"w{i}": np.full(100, 10.0 + i, np.float32) for i in range(count)},
            directory + "/", max_shard_size=500)
    """
)


@pytest.mark.parametrize(("old_count", "new_count"), [(2, 5), (5, 2)])
def test_sigkill_before_each_rename_leaves_old_or_new_then_next_save_cleans(
    tmp_path, old_count, new_count
):
    d = tmp_path / "ckpt"
    old, new = tree(0.0, old_count), tree(10.0, new_count)
    outcomes = []
    for kill_at in range(1, new_count + 2):  # before each shard's rename and the index's
        tb.save(old, str(d) + "/", max_shard_size=500)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(d), str(kill_at), str(new_count)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        got = complete_checkpoint(d)
        outcomes.append("old" if same(got, old) else "new" if same(got, new) else "mix")
    assert outcomes == ["old"] * (new_count + 1)  # the index's rename never happened
    # the next save removes what the killed ones left (temporary files, orphan shards)
    tb.save(new, str(d) + "/", max_shard_size=500)
    index = json.loads((d / INDEX).read_text())
    assert sorted(os.listdir(d)) == sorted({INDEX, *index["weight_map"].values()})
    assert same(complete_checkpoint(d), new)


AT_EXIT = textwrap.dedent(
    """
    import atexit, sys
    import numpy as np
    import tensorbridge as tb
    def save():
        tb.save({f"w{i}": np.full(100, i, np.float32) for i in range(4)},
                sys.argv[1] + "/", max_shard_size=500)
        print("saved")
    atexit.register(save)  # "save a checkpoint on the way out"
    """
)


def test_sharded_save_from_an_atexit_handler(tmp_path):
    # the shards' flush must not need a thread pool that refuses work once the
    # interpreter shuts down (concurrent.futures: "can't register atexit after shutdown")
    d = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", AT_EXIT, str(d)], capture_output=True, text=True, timeout=120
    )
    assert "saved" in proc.stdout, proc.stderr[-2000:]
    assert same(complete_checkpoint(d), tree(0.0, 4))
