"""Bounded memory: converting a file several times larger than the budget stays within it.

Peak RSS is measured in a fresh subprocess as VmHWM from /proc/self/status (ru_maxrss
is inherited from the parent across fork+exec on Linux, so it would report pytest's
own peak). The number is the whole process: interpreter, numpy and tensorbridge.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tensorbridge as tb

MIB = 1 << 20
N, EACH = 32, 8 * MIB  # a 256 MiB checkpoint of 8 MiB tensors
BUDGET = 128 * MIB  # half the file size, everything included


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    rng = np.random.default_rng(0)
    block = rng.integers(0, 2**32, EACH // 4, dtype=np.uint32).view(np.float32)
    tree = {f"layer.{i}.weight": block for i in range(N)}
    path = d / "model.pt"
    tb.save(tree, path)
    assert path.stat().st_size > N * EACH
    return path


def _peak_rss_of(args: list[str]) -> int:
    code = textwrap.dedent(f"""
        import sys
        from tensorbridge.cli import main
        code = main({args!r})
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print(int(hwm.split()[1]) * 1024)
        sys.exit(code)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dst", ["model.safetensors", "model.npz", "sharded/"])
def test_convert_peak_memory_is_under_half_the_file(checkpoint, dst):
    out = checkpoint.parent / dst
    args = ["convert", str(checkpoint), str(out), "--quiet"]
    if dst.endswith("/"):
        args += ["--max-shard-size", "64MB"]
    peak = _peak_rss_of(args)
    size = checkpoint.stat().st_size
    assert peak < BUDGET, f"peak RSS {peak / MIB:.0f} MiB for a {size / MIB:.0f} MiB file"
    with tb.open(str(out)) as f:
        assert len(f.keys()) == N
        assert (
            f["layer.31.weight"].tobytes() == tb.load(str(checkpoint))["layer.31.weight"].tobytes()
        )


@pytest.mark.parametrize("dst", ["joined.safetensors", "joined.npz"])
def test_a_sharded_source_is_read_one_shard_at_a_time(checkpoint, dst):
    shards = checkpoint.parent / "source-shards"
    assert (
        _peak_rss_of(
            ["convert", str(checkpoint), str(shards) + "/", "--quiet", "--max-shard-size", "32MB"]
        )
        < BUDGET
    )
    assert len(list(shards.glob("*.safetensors"))) >= 8  # the source spans many shards
    out = checkpoint.parent / dst
    peak = _peak_rss_of(["convert", str(shards), str(out), "--quiet"])
    assert peak < BUDGET, f"peak RSS {peak / MIB:.0f} MiB for a {N * EACH / MIB:.0f} MiB checkpoint"
    with tb.open(str(out)) as f:
        assert len(f.keys()) == N
        assert f["layer.7.weight"].tobytes() == tb.load(str(checkpoint))["layer.7.weight"].tobytes()
