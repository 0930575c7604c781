"""convert --workers N and --scheduler ADDRESS: byte-identical to one process, atomic, clean.

The cluster tests start a real dask.distributed LocalCluster with worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.cli import main
from tensorbridge.cli.convert_cmd import convert_file
from tensorbridge.errors import ConversionError, FileFormatError


def _digest(path):
    path = str(path)
    if os.path.isdir(path):
        return {f: _digest(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("par")
    rng = np.random.default_rng(0)
    tree = {
        f"layer.{i}.weight": rng.standard_normal((64, 48)).astype(np.float32) for i in range(10)
    }
    tree["ids"] = np.arange(7, dtype=np.int64)
    tree["mask"] = rng.integers(0, 2, (5, 5)).astype(bool)
    src = f"{d}/src/"
    tb.save(tree, src, max_shard_size="40KB")
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 3
    return d, src


def _leftovers(directory):
    return [n for n in os.listdir(directory) if ".tb-" in n]


@pytest.mark.parametrize(
    "dst", ["out.safetensors", "out.npz", "out.h5", "out.pt", "shards/", "out.zarr"]
)
def test_workers_write_the_same_bytes_as_one_process(source, dst):
    d, src = source
    outs = []
    for workers in (1, 2):
        out = f"{d}/w{workers}-{dst}"
        summary = convert_file(src, out, dtype="bfloat16", workers=workers)
        assert summary["verified"] == 12 and summary["cast"] == 10
        outs.append(out)
    assert _digest(outs[0]) == _digest(outs[1])
    back = tb.load(outs[1])
    assert back["layer.3.weight"].dtype.name == "bfloat16" and back["ids"].tolist() == list(
        range(7)
    )
    assert not _leftovers(d)


def test_a_failing_task_leaves_the_destination_untouched(tmp_path):
    src = tmp_path / "bad.safetensors"
    tb.save({"a": np.ones((4, 4), np.float32), "b": np.zeros(3, bool)}, src)
    raw = bytearray(src.read_bytes())
    raw[-1] = 7  # a bool byte that is neither 0 nor 1: reading "b" fails in its worker
    src.write_bytes(bytes(raw))
    dst = tmp_path / "out.npz"
    tb.save({"old": np.arange(3)}, dst)
    before = _digest(dst)
    with pytest.raises(FileFormatError, match="(?i)bool"):
        convert_file(str(src), str(dst), dtype="float16", workers=2)
    assert _digest(dst) == before
    assert not _leftovers(tmp_path)


def test_workers_must_be_positive(tmp_path, capsys):
    tb.save({"a": np.ones(2)}, tmp_path / "a.npz")
    with pytest.raises(ConversionError, match="positive"):
        convert_file(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), workers=0)
    assert (
        main(
            [
                "convert",
                str(tmp_path / "a.npz"),
                str(tmp_path / "c.npz"),
                "--workers",
                "2",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["workers"] == 2


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_port=0,
        silence_logs=50,
    ) as c:
        yield c


def test_a_dask_cluster_converts_byte_identically(source, cluster):
    d, src = source
    one = f"{d}/one/"
    convert_file(src, one, dtype="float16")
    on_cluster = f"{d}/cluster/"
    summary = convert_file(src, on_cluster, dtype="float16", scheduler=cluster.scheduler_address)
    assert summary["scheduler"] == cluster.scheduler_address and summary["verified"] == 12
    assert _digest(one) == _digest(on_cluster)
    assert not _leftovers(d)


def test_a_cluster_failure_leaves_nothing_half_written(tmp_path, cluster):
    src = tmp_path / "bad.safetensors"
    tb.save({"a": np.ones((4, 4), np.float32), "b": np.zeros(3, bool)}, src)
    raw = bytearray(src.read_bytes())
    raw[-1] = 9
    src.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="(?i)bool"):
        convert_file(
            str(src), f"{tmp_path}/out/", dtype="float16", scheduler=cluster.scheduler_address
        )
    assert not os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    assert not _leftovers(tmp_path)


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path):
    pytest.importorskip("distributed")
    tb.save({"a": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    with pytest.raises(ConversionError, match="no scheduler answered"):
        convert_file(
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            dtype="float16",
            scheduler="tcp://127.0.0.1:1",
        )


def test_workers_are_forked_only_where_it_is_safe():
    from tests.hostile.bounded import run_bounded

    r = run_bounded("""
        from tensorbridge.parallel import start_method
        before = start_method()
        import jax.numpy
        RESULT = [before, start_method()]
    """)
    assert r.outcome == "ok" and r.result == ["fork", "spawn"], r
