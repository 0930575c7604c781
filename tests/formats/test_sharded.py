"""Sharded Hugging Face checkpoints: writing, reading what the real libraries
produce, and refusing indexes that escape the directory or disagree with shards."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from tensorbridge.dtypes import canonical_name
from tensorbridge.errors import (
    ConversionError,
    FileFormatError,
    TensorBridgeError,
    UnsafeContentError,
)
from tensorbridge.formats import format_for_path
from tensorbridge.formats.base import TensorInfo
from tensorbridge.formats.sharded import FORMAT, GENERATION_KEY, parse_size, plan_shards

from .samples import read_all_with, same, write_with


def make_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**16, 300, dtype=np.uint16)
    bits[:3] = [0x8000, 0x7FC1, 0x0001]  # -0.0, NaN payload, subnormal
    return {
        "embed.weight": rng.standard_normal((10, 10)).astype(np.float32),  # 400 B
        "layer.0.w": bits.view(ml_dtypes.bfloat16).reshape(30, 10),  # 600 B
        "layer.0.b": np.arange(25, dtype=np.int64),  # 200 B
        "layer.1.w": rng.standard_normal((5, 10)).astype(np.float16),  # 100 B
        "big": np.zeros(2000, np.uint8),  # 2000 B, over the limit: alone
        "tail": np.array([True, False]),  # 2 B
    }


def write(path, arrays, metadata=None, **options) -> None:
    write_with(FORMAT, path, arrays, metadata, **options)


def read_all(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return read_all_with(FORMAT, path)


def snapshot(directory) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


# --- parse_size and planning ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("10KiB", 10240),
        ("2GiB", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("42", 42),
        (42, 42),
        (" 7 kb ", 7000),
        ("3M", 3 * 10**6),
        ("100B", 100),
        ("1TB", 10**12),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-5GB", "0", 0, "5 G B", None, 1.5, True])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(TensorBridgeError, match="the size"):
        parse_size(text)


def test_plan_is_greedy_in_order_and_big_tensors_go_alone():
    infos = [TensorInfo(k, canonical_name(v.dtype), v.shape) for k, v in make_arrays().items()]
    plan = plan_shards(infos, 1000)
    assert [[i.name for i in g] for g in plan] == [
        ["embed.weight", "layer.0.w"],
        ["layer.0.b", "layer.1.w"],
        ["big"],
        ["tail"],
    ]
    assert plan_shards([], 10) == [[]]


# --- writing -----------------------------------------------------------------------------


def test_write_makes_hf_layout_readable_by_safetensors(tmp_path):
    arrays = make_arrays()
    out = tmp_path / "ckpt"
    write(out, arrays, {"source": "test"}, max_shard_size="1KB")
    names = sorted(os.listdir(out))
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert names == sorted(shards + ["model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {
        "source": "test",
        "total_size": sum(a.nbytes for a in arrays.values()),
    }
    assert index["weight_map"]["big"] == shards[2]
    assert list(index["weight_map"]) == list(arrays)
    for shard in shards:  # each shard within the limit, unless it is one big tensor
        loaded = safetensors.torch.load_file(str(out / shard))
        total = sum(t.numel() * t.element_size() for t in loaded.values())
        assert total <= 1000 or len(loaded) == 1
        with safetensors.safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt", GENERATION_KEY: index[GENERATION_KEY]}
        for name, t in loaded.items():
            assert index["weight_map"][name] == shard
            assert t.contiguous().view(torch.uint8).numpy().tobytes() == arrays[name].tobytes()


def test_round_trip_bit_exact_via_directory_and_index(tmp_path):
    arrays = make_arrays()
    write(tmp_path / "d", arrays, max_shard_size=700)
    for path in (tmp_path / "d", tmp_path / "d" / "model.safetensors.index.json"):
        got, metadata = read_all(path)
        assert list(got) == list(arrays)
        for k in arrays:
            assert same(got[k], arrays[k]), k
        assert "total_size" not in metadata  # the index's own field, not the user's metadata
        with FORMAT.open(str(path)) as r:
            assert r.total_size == sum(a.nbytes for a in arrays.values())


def test_format_table_routes_directories_and_indexes_here(tmp_path):
    write(tmp_path / "d", {"a": np.zeros(1)})
    assert format_for_path(str(tmp_path / "d")).name == "sharded"
    assert format_for_path(str(tmp_path / "d" / "model.safetensors.index.json")).name == "sharded"


def test_custom_index_name_sets_the_shard_prefix(tmp_path):
    write(tmp_path / "x" / "adapter.safetensors.index.json", {"a": np.zeros(3)})
    assert sorted(os.listdir(tmp_path / "x")) == [
        "adapter-00001-of-00001.safetensors",
        "adapter.safetensors.index.json",
    ]


def test_bad_index_name_and_unknown_options_are_refused(tmp_path):
    with pytest.raises(FileFormatError, match="NAME.safetensors.index.json"):
        write(tmp_path / "pytorch_model.bin.index.json", {"a": np.zeros(1)})
    with pytest.raises(ConversionError, match="unknown option"):
        write(tmp_path / "d", {"a": np.zeros(1)}, shard_size=3)
    with pytest.raises(TensorBridgeError, match="the size"):
        write(tmp_path / "d", {"a": np.zeros(1)}, max_shard_size="lots")
    assert os.listdir(tmp_path) == []


def test_unsupported_dtype_is_refused_before_any_file(tmp_path):
    arrays = {"a": np.zeros(3, np.float32), "c": np.zeros(2, np.complex128)}
    with pytest.raises(ConversionError, match="safetensors cannot store"):
        write(tmp_path / "d", arrays, max_shard_size=1)
    assert not (tmp_path / "d").exists()


def test_failed_write_leaves_existing_checkpoint_byte_identical(tmp_path):
    out = tmp_path / "d"
    write(out, make_arrays(), max_shard_size=1000)
    before = snapshot(out)
    arrays = make_arrays()

    def fetch(name):
        if name == "tail":  # the last shard: earlier shards were already written
            raise RuntimeError("network down")
        return arrays[name]

    infos = [TensorInfo(k, canonical_name(v.dtype), v.shape) for k, v in arrays.items()]
    with pytest.raises(RuntimeError, match="network down"):
        FORMAT.write(str(out), infos, fetch, max_shard_size=1000)
    assert snapshot(out) == before


def test_rewrite_with_fewer_shards_removes_the_old_ones(tmp_path):
    out = tmp_path / "d"
    write(out, make_arrays(), max_shard_size=1000)
    (out / "README.md").write_text("keep me")
    write(out, {"only": np.ones(4, np.int32)})
    assert sorted(os.listdir(out)) == [
        "README.md",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    got, _ = read_all(out)
    assert same(got["only"], np.ones(4, np.int32))


# --- reading what others wrote -------------------------------------------------------------


def hf_checkpoint(
    directory,
    tensors_by_shard: dict[str, dict[str, torch.Tensor]],
    weight_map: dict[str, str] | None = None,
    index_name="model.safetensors.index.json",
):
    directory.mkdir(exist_ok=True)
    for shard, tensors in tensors_by_shard.items():
        safetensors.torch.save_file(tensors, str(directory / shard), metadata={"format": "pt"})
    if weight_map is None:
        weight_map = {n: s for s, ts in tensors_by_shard.items() for n in ts}
    (directory / index_name).write_text(
        json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map})
    )
    return directory


def test_reads_a_torch_written_hf_checkpoint(tmp_path):
    a = torch.randn(4, 4).to(torch.bfloat16)
    b = torch.arange(6, dtype=torch.int32)
    c = torch.randn(3).to(torch.float8_e4m3fn)
    d = hf_checkpoint(
        tmp_path / "hf",
        {
            "model-00001-of-00002.safetensors": {"a": a, "b": b},
            "model-00002-of-00002.safetensors": {"c": c},
        },
    )
    with FORMAT.open(str(d)) as r:
        assert r.metadata == {} and r.total_size == 123 and r.notes == []
        assert r.info("a") == TensorInfo("a", "bfloat16", (4, 4))
        assert r.shard_of("c").endswith("model-00002-of-00002.safetensors")
        for name, t in {"a": a, "b": b, "c": c}.items():
            got = r.read(name)
            assert got.tobytes() == t.view(torch.uint8).numpy().tobytes()
            assert str(t.dtype).replace("torch.", "") == got.dtype.name


def test_single_file_directory(tmp_path):
    (tmp_path / "m").mkdir()
    arrays = {"x": np.arange(3, dtype=np.float64)}
    safetensors.numpy.save_file(arrays, str(tmp_path / "m" / "model.safetensors"), {"format": "np"})
    got, metadata = read_all(tmp_path / "m")
    assert same(got["x"], arrays["x"]) and metadata == {"format": "np"}


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to count open files"
)
def test_at_most_one_shard_is_open(tmp_path):
    arrays = {f"t{i}": np.full(10, i, np.int64) for i in range(6)}
    write(tmp_path / "d", arrays, max_shard_size=80)
    assert len(os.listdir(tmp_path / "d")) == 7
    base = len(os.listdir("/proc/self/fd"))
    with FORMAT.open(str(tmp_path / "d")) as r:
        assert len(os.listdir("/proc/self/fd")) == base
        for name in r.keys():
            assert same(r.read(name), arrays[name])
            assert len(os.listdir("/proc/self/fd")) <= base + 1
    assert len(os.listdir("/proc/self/fd")) == base


# --- hostile or broken checkpoints ---------------------------------------------------------


def simple(tmp_path, weight_map=None, index_text=None):
    d = hf_checkpoint(
        tmp_path / "ck",
        {"s1.safetensors": {"a": torch.zeros(2)}, "s2.safetensors": {"b": torch.ones(2)}},
        weight_map,
    )
    if index_text is not None:
        (d / "model.safetensors.index.json").write_text(index_text)
    return d


def refused(path, error, text):
    with pytest.raises(error) as info:
        FORMAT.open(str(path))
    assert type(info.value) is error
    assert text in str(info.value)
    return info.value


@pytest.mark.parametrize(
    "shard, text",
    [
        ("../x.safetensors", "not a plain file name"),
        ("sub/s1.safetensors", "not a plain file name"),
        ("/etc/passwd", "not a plain file name"),
        ("s1.safetensors\x00", "NUL"),
        ("..", "not a file name"),
        ("", "not a file name"),
        (7, "it is a int"),
    ],
)
def test_shard_names_that_leave_the_directory_are_refused(tmp_path, shard, text):
    (tmp_path / "x.safetensors").write_bytes(b"")
    d = simple(tmp_path, {"a": "s1.safetensors", "b": shard})
    err = refused(d, UnsafeContentError, text)
    assert "model.safetensors.index.json" in str(err)


def test_symlinked_shard_escaping_the_directory_is_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    safetensors.numpy.save_file({"b": np.ones(2, np.float32)}, str(outside))
    d = simple(tmp_path)
    os.unlink(d / "s2.safetensors")
    os.symlink(outside, d / "s2.safetensors")
    refused(d, UnsafeContentError, "outside")


def _hf_snapshot(tmp_path, repo_name="models--org--name"):
    """A Hugging Face hub cache: REPO/snapshots/REV/* are relative links into REPO/blobs/."""
    src = tmp_path / "src"
    write(
        src, {"a": np.arange(4, dtype=np.float32), "b": np.ones(3, np.int64)}, max_shard_size="20B"
    )
    repo = tmp_path / repo_name
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for k, name in enumerate(sorted(os.listdir(src))):
        os.replace(src / name, repo / "blobs" / f"blob{k}")
        os.symlink(f"../../blobs/blob{k}", snap / name)
    return repo, snap


def test_hf_cache_snapshot_of_shards_reads_through_its_links(tmp_path):
    repo, snap = _hf_snapshot(tmp_path)
    assert len(os.listdir(snap)) == 3  # an index and two shards, all links
    for where in (snap, snap / "model.safetensors.index.json"):
        got, _ = read_all(where)
        assert same(got["a"], np.arange(4, dtype=np.float32)) and same(
            got["b"], np.ones(3, np.int64)
        )


@pytest.mark.parametrize("layout", ["outside-blobs", "not-a-hub-repo"])
def test_hf_like_links_elsewhere_are_still_refused(tmp_path, layout):
    repo, snap = _hf_snapshot(
        tmp_path, "models--org--name" if layout == "outside-blobs" else "my-checkpoints"
    )
    shard = next(n for n in sorted(os.listdir(snap)) if n.endswith(".safetensors"))
    if layout == "outside-blobs":  # a link to the repo's other folder, not to blobs/
        (repo / "elsewhere").mkdir()
        os.replace(os.path.realpath(snap / shard), repo / "elsewhere" / "x")
        os.unlink(snap / shard)
        os.symlink("../../elsewhere/x", snap / shard)
    refused(snap, UnsafeContentError, "outside")


def test_missing_shard_is_named(tmp_path):
    d = simple(tmp_path)
    os.unlink(d / "s2.safetensors")
    refused(d, FileFormatError, "shard 's2.safetensors' does not exist")


def test_name_listed_but_absent_is_refused(tmp_path):
    d = simple(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "ghost": "s2.safetensors"})
    refused(d, FileFormatError, "puts ['ghost'] in shard 's2.safetensors'")


def test_name_in_shard_but_not_in_map_is_refused(tmp_path):
    d = simple(tmp_path, {"a": "s1.safetensors"})
    (d / "s2.safetensors").unlink()  # no longer referenced: fine
    assert read_all(d)[0].keys() == {"a"}
    d2 = hf_checkpoint(
        tmp_path / "ck2",
        {"s1.safetensors": {"a": torch.zeros(2), "hidden": torch.ones(1)}},
        {"a": "s1.safetensors"},
    )
    refused(d2, FileFormatError, "holds ['hidden'], which the index's weight_map does not list")


def test_name_mapped_to_the_wrong_shard_is_refused(tmp_path):
    d = simple(tmp_path, {"a": "s2.safetensors", "b": "s1.safetensors"})
    refused(d, FileFormatError, "does not hold them")


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("{", FileFormatError, "the index is not valid JSON"),
        ("[1]", FileFormatError, "must be a JSON object with a 'weight_map'"),
        ('{"metadata": {}}', FileFormatError, "must be a JSON object with a 'weight_map'"),
        ('{"weight_map": []}', FileFormatError, "must be a JSON object with a 'weight_map'"),
        (
            '{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}',
            UnsafeContentError,
            "'a' more than once",
        ),
        ('{"weight_map": {"../a": "s1.safetensors"}}', UnsafeContentError, "'..'"),
        (
            '{"metadata": {"total_size": "lots"}, "weight_map": {"a": "s1.safetensors"}}',
            FileFormatError,
            "total_size 'lots'",
        ),
        (
            '{"metadata": {"x": [1]}, "weight_map": {"a": "s1.safetensors"}}',
            FileFormatError,
            "only strings and numbers",
        ),
        (
            '{"metadata": 5, "weight_map": {"a": "s1.safetensors"}}',
            FileFormatError,
            "not an object",
        ),
    ],
)
def test_broken_indexes_are_refused(tmp_path, text, error, message):
    refused(simple(tmp_path, index_text=text), error, message)


def test_bad_utf8_index_is_refused(tmp_path):
    d = simple(tmp_path)
    (d / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": "s1"}}')
    refused(d, FileFormatError, "the index is not valid UTF-8")


def test_nested_index_as_shard_is_refused(tmp_path):
    d = simple(tmp_path)
    (d / "inner.index.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "inner.index.json"}})
    )
    refused(d / "model.safetensors.index.json", UnsafeContentError, "nested indexes")


def test_directory_with_two_indexes_or_nothing(tmp_path):
    d = simple(tmp_path)
    (d / "other.safetensors.index.json").write_text("{}")
    refused(d, FileFormatError, "several indexes")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", FileFormatError, "holds no *.index.json")
    (tmp_path / "f.txt").write_text("x")
    refused(tmp_path / "f.txt", FileFormatError, "neither a directory nor a *.index.json")


def test_corrupt_shard_error_names_the_shard(tmp_path):
    d = simple(tmp_path)
    (d / "s2.safetensors").write_bytes(b"\x05" + b"\0" * 7 + b"{}")
    err = refused(d, FileFormatError, "larger than the rest of the file")
    assert "s2.safetensors" in str(err)


def test_reads_pytorch_bin_shards(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    a = torch.randn(3, 2).to(torch.bfloat16)
    b = torch.arange(4, dtype=torch.int16)
    torch.save({"a": a}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": b}, d / "pytorch_model-00002-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 20},
                "weight_map": {
                    "a": "pytorch_model-00001-of-00002.bin",
                    "b": "pytorch_model-00002-of-00002.bin",
                },
            }
        )
    )
    got, _ = read_all(d)
    assert got["a"].dtype == ml_dtypes.bfloat16
    assert got["a"].tobytes() == a.view(torch.uint8).numpy().tobytes()
    assert same(got["b"], b.numpy())


# --- crash safety of rewrites ---------------------------------------------------------


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_failed_index_write_leaves_old_checkpoint_and_no_new_shards(tmp_path, monkeypatch):
    """Same shard count as before: the new shards must not take the old shards' names."""
    import tensorbridge.formats.sharded as sharded_mod

    out = tmp_path / "d"
    old = {"a": np.zeros(100, np.float32), "b": np.zeros(100, np.float32)}
    write(out, old, max_shard_size=400)
    before = snapshot(out)
    real = sharded_mod.atomic_write

    def full_disk(path, **kw):
        if str(path).endswith(".index.json"):
            raise FileFormatError("writing failed (the disk is full)", str(path))
        return real(path, **kw)

    monkeypatch.setattr(sharded_mod, "atomic_write", full_disk)
    with pytest.raises(FileFormatError, match="disk is full"):
        write(
            out, {"x": np.ones(100, np.float32), "y": np.ones(100, np.float32)}, max_shard_size=400
        )
    assert snapshot(out) == before  # byte-identical, nothing new left behind
    got, _ = read_all(out)
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in old.items()}


def test_rewrite_with_the_same_shard_count_replaces_everything(tmp_path):
    out = tmp_path / "d"
    write(out, {"a": np.zeros(100, np.float32), "b": np.zeros(100, np.float32)}, max_shard_size=400)
    new = {"x": np.ones(100, np.float32), "y": np.full(100, 2, np.float32)}
    write(out, new, max_shard_size=400)
    names = _files(out)
    assert len(names) == 3 and "model.safetensors.index.json" in names
    got, _ = read_all(out)
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in new.items()}
    write(out, new, max_shard_size=400)  # the standard names are free again
    assert _files(out) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


_KILL_CHILD = """
import sys, time, numpy as np
from tensorbridge.formats import get_format
from tensorbridge.formats.base import TensorInfo
infos = [TensorInfo("a", "float32", (1000,)), TensorInfo("b", "float32", (1000,))]
def fetch(n):
    if n == "b":
        print("ready", flush=True)
        time.sleep(60)
    return np.zeros(1000, np.float32)
get_format("sharded").write(sys.argv[1], infos, fetch, None, max_shard_size=4000)
"""


@pytest.mark.timeout(60)
def test_sigkill_during_second_shard_leaves_nothing_after_next_save(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "d"
    write(out, {"old": np.arange(10, dtype=np.int32)})
    before = snapshot(out)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    left = [n for n in _files(out) if n not in before]
    assert any(".tb-tmp-" in n for n in left), left  # the killed shard's temporary file
    assert not any(".tb-tmp-" in n and n.count(".tb-tmp-") > 1 for n in left), left
    got, _ = read_all(out)  # the old checkpoint still reads
    assert same(got["old"], np.arange(10, dtype=np.int32))
    new = {"a": np.zeros(1000, np.float32), "b": np.ones(1000, np.float32)}
    write(out, new, max_shard_size=4000)
    assert not [n for n in _files(out) if ".tb-tmp-" in n], _files(out)
    assert len(_files(out)) == 3
    got, _ = read_all(out)
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in new.items()}


def test_hf_cache_snapshot_links_are_replaced_and_blobs_untouched(tmp_path):
    blobs, snap, first = tmp_path / "blobs", tmp_path / "snap", tmp_path / "first"
    blobs.mkdir()
    snap.mkdir()
    write(first, {"a": np.zeros(4, np.float32)})
    for name in os.listdir(first):
        os.replace(first / name, blobs / (name + ".blob"))
        os.symlink(f"../blobs/{name}.blob", snap / name)
    blob_bytes = snapshot(blobs)
    write(snap, {"b": np.ones(4, np.float32)})
    assert snapshot(blobs) == blob_bytes
    assert not any(os.path.islink(snap / n) for n in os.listdir(snap))
    got, _ = read_all(snap)
    assert list(got) == ["b"] and same(got["b"], np.ones(4, np.float32))


def test_concurrent_sharded_saves_to_one_directory_end_consistent(tmp_path):
    import contextlib
    import threading
    import time

    from tensorbridge.formats import atomic

    lock = getattr(atomic, "lock_directory", lambda d: contextlib.nullcontext())

    out = tmp_path / "d"
    # different shard counts, so that each save's cleanup could hit another's shards
    trees = [{f"t{i}.{j}": np.full(300, i, np.float32) for j in range(i + 1)} for i in range(6)]
    errors = []

    def save(tree):
        try:
            infos = [TensorInfo(k, "float32", v.shape) for k, v in tree.items()]

            def slow(name):  # as a slow device-to-host copy: the saves interleave
                time.sleep(0.003)
                return tree[name]

            for _ in range(5):
                FORMAT.write(str(out), infos, slow, max_shard_size=1200)
                with lock(str(out)):  # between saves, the checkpoint is whole
                    read_all(out)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(t,)) for t in trees]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got, _ = read_all(out)
    winner = next(t for t in trees if list(t) == list(got))
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in winner.items()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert _files(out) == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})


def test_user_total_size_metadata_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="total_size.*index's own field.*Fix: rename"):
        write(tmp_path / "d", {"a": np.zeros(2)}, {"total_size": "5"})
    assert not (tmp_path / "d").exists()


def test_reading_after_close_is_refused_and_opens_nothing(tmp_path):
    d = simple(tmp_path)
    with FORMAT.open(d) as r:
        name = r.keys()[0]
        r.read(name)
    before = len(os.listdir("/proc/self/fd"))
    for call in (lambda: r.read(name), lambda: r.raw_span(name)):
        with pytest.raises(FileFormatError, match="closed.*Fix: open it again"):
            call()
    assert len(os.listdir("/proc/self/fd")) == before


# --- layouts: variants, safetensors beside .bin, the link policy on every path ------------


def bin_checkpoint(directory, tensors_by_shard, index_name="pytorch_model.bin.index.json"):
    """A sharded .bin checkpoint in the layout transformers 4 wrote."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard, tensors in tensors_by_shard.items():
        torch.save(tensors, directory / shard)
    (directory / index_name).write_text(
        json.dumps(
            {
                "metadata": {"total_size": 1},
                "weight_map": {n: s for s, ts in tensors_by_shard.items() for n in ts},
            }
        )
    )
    return directory


def test_variant_checkpoints_read_and_are_chosen_by_name(tmp_path):
    d = tmp_path / "m"
    hf_checkpoint(d, {"model-00001-of-00001.safetensors": {"w": torch.zeros(2)}})
    hf_checkpoint(
        d,
        {
            "model.fp16-00001-of-00002.safetensors": {"w": torch.ones(2).half()},
            "model.fp16-00002-of-00002.safetensors": {"b": torch.ones(1).half()},
        },
        index_name="model.safetensors.index.fp16.json",
    )
    with FORMAT.open(str(d)) as r:  # the plain files by default, as transformers
        assert r.keys() == ["w"] and r.read("w").dtype == np.float32 and r.notes == []
    with FORMAT.open(str(d), variant="fp16") as r:
        assert r.keys() == ["w", "b"] and r.read("w").dtype == np.float16
        assert r.shard_of("b").endswith("model.fp16-00002-of-00002.safetensors")
    index = d / "model.safetensors.index.fp16.json"
    assert format_for_path(str(index)).name == "sharded"
    with FORMAT.open(str(index)) as r:
        assert r.keys() == ["w", "b"]
    with pytest.raises(FileFormatError, match=r"no variant 'bf16'.*\['fp16'\]"):
        FORMAT.open(str(d), variant="bf16")
    with pytest.raises(ConversionError, match="plain word"):
        FORMAT.open(str(d), variant="../x")
    with pytest.raises(ConversionError, match="that index is of 'fp16'"):
        FORMAT.open(str(index), variant="bf16")


def test_only_variant_present_is_read_and_said_several_refused(tmp_path):
    d = tmp_path / "m"
    hf_checkpoint(
        d,
        {"model.fp16-00001-of-00001.safetensors": {"w": torch.ones(2).half()}},
        index_name="model.safetensors.index.fp16.json",
    )
    with FORMAT.open(str(d)) as r:
        assert r.keys() == ["w"] and "only the 'fp16' variant" in r.notes[0]
    d.joinpath("model.bf16.safetensors").write_bytes(
        safetensors.torch.save({"w": torch.ones(2).bfloat16()})
    )
    refused(d, FileFormatError, "several variants ['bf16', 'fp16']")
    with FORMAT.open(str(d), variant="bf16") as r:  # a single-file variant
        assert r.read("w").dtype.name == "bfloat16"


def test_safetensors_preferred_over_bin_and_said(tmp_path):
    d = hf_checkpoint(tmp_path / "hub", {"model-00001-of-00001.safetensors": {"w": torch.ones(2)}})
    bin_checkpoint(d, {"pytorch_model-00001-of-00001.bin": {"w": torch.zeros(2)}})
    with FORMAT.open(str(d)) as r:
        assert r.read("w").tolist() == [1.0, 1.0]
        assert "prefers safetensors" in r.notes[0] and "pytorch_model.bin.index.json" in r.notes[0]
    os.unlink(d / "model.safetensors.index.json")
    os.unlink(d / "model-00001-of-00001.safetensors")
    with FORMAT.open(str(d)) as r:  # .bin alone is read
        assert r.read("w").tolist() == [0.0, 0.0] and r.notes == []


def test_write_a_variant_by_its_index_name(tmp_path):
    index = tmp_path / "v" / "model.safetensors.index.fp16.json"
    write(index, {"a": np.zeros(3, np.float16)})
    assert sorted(os.listdir(tmp_path / "v")) == [
        "model.fp16-00001-of-00001.safetensors",
        "model.safetensors.index.fp16.json",
    ]
    with FORMAT.open(str(tmp_path / "v"), variant="fp16") as r:
        assert r.keys() == ["a"]


@pytest.mark.parametrize("single", ["model.safetensors", "pytorch_model.bin"])
def test_single_file_link_outside_is_refused(tmp_path, single):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_bytes(safetensors.torch.save({"w": torch.ones(2)}))
    d = tmp_path / "ck"
    d.mkdir()
    os.symlink(outside / "x", d / single)
    refused(d, UnsafeContentError, "links may only point into a Hugging Face cache's blobs/")


def test_index_link_outside_is_refused_and_not_quoted(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET not json")
    d = tmp_path / "ck"
    d.mkdir()
    os.symlink(secret, d / "model.safetensors.index.json")
    for path in (d, d / "model.safetensors.index.json"):
        err = refused(
            path, UnsafeContentError, "the index 'model.safetensors.index.json' is a symlink"
        )
        assert "TOPSECRET" not in str(err)


def test_many_names_resolve_each_shard_once(tmp_path, monkeypatch):
    d = hf_checkpoint(
        tmp_path / "ck",
        {
            "s1.safetensors": {f"t{i}": torch.zeros(1) for i in range(300)},
            "s2.safetensors": {"u": torch.zeros(1)},
        },
    )
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    with FORMAT.open(str(d)) as r:
        assert len(r.keys()) == 301
    assert len(calls) <= 6  # the directory, the index, two shards (not one per name)


def test_cli_reads_variants_and_says_what_it_chose(tmp_path, capsys):
    from tensorbridge import cli

    d = hf_checkpoint(tmp_path / "m", {"model-00001-of-00001.safetensors": {"w": torch.zeros(2)}})
    hf_checkpoint(
        d,
        {"model.fp16-00001-of-00001.safetensors": {"h": torch.ones(2).half()}},
        index_name="model.safetensors.index.fp16.json",
    )
    bin_checkpoint(d, {"pytorch_model-00001-of-00001.bin": {"w": torch.zeros(2)}})
    assert cli.main(["inspect", "--json", "--variant", "fp16", str(d)]) == 0
    out = capsys.readouterr()
    assert [t["name"] for t in json.loads(out.out)["files"][0]["tensors"]] == ["h"]
    assert cli.main(["inspect", "--json", str(d)]) == 0
    out = capsys.readouterr()
    assert [t["name"] for t in json.loads(out.out)["files"][0]["tensors"]] == ["w"]
    assert "note:" in out.err and "prefers safetensors" in out.err
    dst = tmp_path / "h.safetensors"
    assert cli.main(["convert", "-q", "--variant", "fp16", str(d), str(dst)]) == 0
    assert list(tb_load(dst)) == ["h"]


def tb_load(path):
    import tensorbridge as tb

    return tb.load(path)


def test_generation_is_deterministic_and_differs_from_the_save_it_replaces(tmp_path):
    arrays = make_arrays()
    for d in ("a", "b"):
        write(tmp_path / d, arrays, max_shard_size=700)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")  # byte-identical saves
    index = tmp_path / "a" / "model.safetensors.index.json"
    first = json.loads(index.read_text())[GENERATION_KEY]
    write(tmp_path / "a", arrays, max_shard_size=700)  # the same tree again
    second = json.loads(index.read_text())[GENERATION_KEY]
    assert second != first
    with FORMAT.open(str(tmp_path / "a")) as r:
        for name in r.keys():
            assert same(r.read(name), arrays[name])


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_save_into_a_new_directory_leaves_no_directory(tmp_path, monkeypatch, existed):
    """The directories a failed save created are removed with its shards; a directory that
    was there before is kept (empty, as it was)."""
    import tensorbridge.formats.sharded as sharded_mod

    top = tmp_path / "runs"
    out = top / "step-1" / "ck"
    if existed:
        out.mkdir(parents=True)

    def full_disk(path, **kw):
        raise FileFormatError("writing failed (the disk is full)", str(path))

    monkeypatch.setattr(sharded_mod, "atomic_write", full_disk)
    with pytest.raises(FileFormatError, match="disk is full"):
        write(
            out, {"x": np.ones(100, np.float32), "y": np.ones(100, np.float32)}, max_shard_size=400
        )
    if existed:
        assert _files(out) == []
    else:
        assert not top.exists() and _files(tmp_path) == []


@pytest.mark.parametrize("shape", ["dotdot", "link"])
def test_a_failed_save_undoes_exactly_the_directories_it_made(tmp_path, monkeypatch, shape):
    """Directories made through ``..`` or a linked parent are removed by the same paths
    they were made through; nothing that was there before is touched."""
    import tensorbridge.formats.sharded as sharded_mod

    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "deep")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    target = tmp_path / ("newA/../ck2" if shape == "dotdot" else "link/../sib")

    def full_disk(path, **kw):
        raise FileFormatError("writing failed (the disk is full)", str(path))

    monkeypatch.setattr(sharded_mod, "atomic_write", full_disk)
    with pytest.raises(FileFormatError, match="disk is full"):
        write(target, {"x": np.ones(4, np.float32)})
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_save_waiting_for_the_lock_of_a_directory_removed_meanwhile_makes_it_again(
    tmp_path, monkeypatch
):
    """A failed save removes the directory it made while it still holds the directory's
    lock; a save that was waiting for that lock (holding a descriptor of the removed
    directory) makes the directory again and writes into it."""
    import threading

    from tensorbridge.formats import atomic

    out = tmp_path / "run" / "ck"
    out.mkdir(parents=True)
    waiting = threading.Event()
    real_flock = atomic._flock

    def flock(fd, wait=True):
        if threading.current_thread().name == "second-save":
            waiting.set()  # its descriptor of the directory is open: it waits for the lock
        return real_flock(fd, wait=wait)

    monkeypatch.setattr(atomic, "_flock", flock)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            write(out, {"b": np.full(3, 2, np.float32)})
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    with atomic.lock_directory(str(out)):  # the failing save holds the lock...
        t = threading.Thread(target=second, name="second-save")
        t.start()
        assert waiting.wait(30)
        os.rmdir(out)  # ...and removes the directory it made, under the lock
        os.rmdir(out.parent)
    t.join(60)
    assert not t.is_alive() and errors == []
    got, _ = read_all(out)
    assert got["b"].tolist() == [2.0, 2.0, 2.0]


def test_a_directory_removed_between_its_making_and_its_lock_is_made_again(tmp_path, monkeypatch):
    from tensorbridge.formats import atomic

    out = tmp_path / "run" / "ck"
    real = atomic.lock_directory
    calls: list[str] = []

    def lock_directory(directory):
        calls.append(directory)
        if len(calls) == 1:  # another save's cleanup, just before this one opens it
            os.rmdir(out)
            os.rmdir(out.parent)
        return real(directory)

    monkeypatch.setattr(atomic, "lock_directory", lock_directory)
    write(out, {"b": np.full(3, 2, np.float32)})
    assert len(calls) == 2
    got, _ = read_all(out)
    assert got["b"].tolist() == [2.0, 2.0, 2.0]


def test_a_failed_save_leaves_a_directory_made_again_by_someone_else(tmp_path, monkeypatch):
    """The directory a failing save made was removed and made again by another program
    meanwhile: the failing save does not remove the new one (it checks that the path
    still names the directory it locked)."""
    import shutil

    import tensorbridge.formats.sharded as sharded_mod

    out = tmp_path / "run" / "ck"

    def full_disk(path, **kw):
        shutil.rmtree(out)
        out.mkdir()  # (someone else's, empty for now)
        raise FileFormatError("writing failed (the disk is full)", str(path))

    monkeypatch.setattr(sharded_mod, "atomic_write", full_disk)
    with pytest.raises(FileFormatError, match="disk is full"):
        write(out, {"x": np.ones(4, np.float32)})
    assert out.is_dir()
