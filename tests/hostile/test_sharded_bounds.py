"""safetensors and sharded checkpoints against hostile inputs: bounded work, no raw exceptions,
the link policy on every path, and saves that delete only their own files.

Inputs that could cost gigabytes or minutes run in a subprocess (tests/hostile/bounded.py)
under an address-space limit; each checks its outcome, its wall time and its peak RSS.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge.errors import ConversionError, FileFormatError, UnsafeContentError
from tensorbridge.files import unflatten_names
from tensorbridge.formats import safejson
from tensorbridge.formats.safetensors import FORMAT as ST

from .bounded import MIB, run_bounded

BOUNDED = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
OPEN_ALL = "import tensorbridge as tb\nwith tb.open(ARGS[0]) as r:\n    RESULT = [r.read(k).size for k in r.keys()]"


def st_file(path, header: bytes, data: bytes = b"") -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def sharded_dir(path, index_text: bytes) -> str:
    path.mkdir()
    (path / "s.safetensors").write_bytes(b"")
    tb.save({"a": np.zeros(2, np.float32)}, path / "s.safetensors")
    (path / "model.safetensors.index.json").write_bytes(index_text)
    return str(path)


# 32 MiB of JSON that is cheap to send and expensive to parse, in the two files that hold JSON
AMPLIFIERS = {
    "empty_lists": b'{"a":' + b"[" + b"[]," * ((32 * MIB) // 3) + b"[]]}",
    "deep_lists": b'{"a":' + b"[" * (16 * MIB) + b"]" * (16 * MIB) + b"}",
    "empty_objects": b'{"a":[' + b"{}," * ((32 * MIB) // 3) + b"{}]}",
}


@pytest.mark.parametrize("kind", sorted(AMPLIFIERS))
@pytest.mark.parametrize("where", ["header", "index"])
def test_json_amplifiers_are_refused_in_bounds(tmp_path, kind, where):
    raw = AMPLIFIERS[kind]
    path = (
        st_file(tmp_path / "h.safetensors", raw)
        if where == "header"
        else sharded_dir(tmp_path / "d", raw)
    )
    r = run_bounded(OPEN_ALL, [path], timeout=60, mem_limit=2 << 30)
    assert r.outcome == "refused", r.detail
    assert "JSON arrays and objects" in r.detail or "levels deep" in r.detail
    assert len(r.detail) < 1000  # the message quotes nothing of the 32 MiB
    assert r.wall < 10 and r.peak_rss < 400 * MIB, (
        r.wall,
        r.peak_rss / MIB,
    )  # before: 6-14 s, 1.7 GB


def zero_d_file(path, n: int) -> list[str]:
    """A safetensors file of ``n`` 0-d uint8 tensors (the densest valid header), built
    directly: saving 100k tensors one by one would take most of this test's time."""
    names = [f"layers.{i}.w" for i in range(n)]
    header = {
        name: {"dtype": "U8", "shape": [], "data_offsets": [i, i + 1]}
        for i, name in enumerate(names)
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    st_file(path, text + b" " * (-len(text) % 8), bytes(n))
    return names


def test_index_of_100k_names_opens_in_bounds(tmp_path):
    """100k names in one shard: the densest valid safetensors header (0-d tensors) is not
    taken for an attack, and the index resolves its one shard once, not once per name."""
    d = tmp_path / "d"
    d.mkdir()
    names = zero_d_file(d / "s1.safetensors", 100_000)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "s1.safetensors" for n in names}})
    )
    r = run_bounded(
        "import tensorbridge as tb\nwith tb.open(ARGS[0]) as r:\n    RESULT = len(r.keys())",
        [str(d)],
        timeout=120,
        mem_limit=2 << 30,
    )
    assert r.outcome == "ok" and r.result == 100_000, r.detail
    assert r.wall < 30 and r.peak_rss < 500 * MIB, (r.wall, r.peak_rss / MIB)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(tmp_path, constant):
    d = sharded_dir(
        tmp_path / "d",
        b'{"metadata": {"total_size": ' + constant + b'}, "weight_map": {"a": "s.safetensors"}}',
    )
    with pytest.raises(FileFormatError, match=f"holds {constant.decode()}, which is not JSON"):
        tb.open(d)
    header = b'{"a":{"dtype":"F32","shape":[' + constant + b'],"data_offsets":[0,4]}}'
    with pytest.raises(FileFormatError, match="which is not JSON"):
        tb.open(st_file(tmp_path / "n.safetensors", header, b"\0" * 4))


def test_huge_values_are_quoted_short(tmp_path):
    big = "x" * (8 * MIB)
    header = json.dumps({"a": {"dtype": "F32", "shape": [big], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(FileFormatError) as info:
        tb.open(st_file(tmp_path / "q.safetensors", header, b"\0" * 4))
    assert len(str(info.value)) < 1000


# --- raw exceptions ---------------------------------------------------------------------

SURROGATE = "w\ud800"


def test_lone_surrogate_names_are_refused_on_save(tmp_path):
    for fmt in ("m.safetensors", "d/"):
        with pytest.raises(UnsafeContentError, match="lone surrogate"):
            tb.save({SURROGATE: np.zeros(1)}, f"{tmp_path}/{fmt}")
        with pytest.raises(ConversionError, match="lone surrogate"):
            tb.save({"a": np.zeros(1)}, f"{tmp_path}/{fmt}", metadata={"k": SURROGATE})
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("where", ["name", "metadata", "shard"])
def test_lone_surrogates_in_files_are_read_but_never_written(tmp_path, where):
    """A file may hold a lone surrogate (a JSON \\ud800 escape; the Rust reader refuses it):
    it is read (inspect shows it escaped), a shard of that name cannot exist and is refused,
    and writing it anywhere is a clean refusal, not a UnicodeEncodeError."""
    esc = "w\\ud800"
    if where == "shard":
        d = sharded_dir(
            tmp_path / "d", ('{"weight_map": {"a": "' + esc + '.safetensors"}}').encode()
        )
        with pytest.raises(UnsafeContentError, match="lone surrogate"):
            tb.open(d)
        return
    header = (
        '{"' + esc + '":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        if where == "name"
        else '{"__metadata__":{"k":"' + esc + '"},"a":{"dtype":"F32","shape":[1],'
        '"data_offsets":[0,4]}}'
    ).encode()
    src = st_file(tmp_path / "s.safetensors", header, b"\0" * 4)
    with tb.open(src) as r:
        assert (r.keys() == [SURROGATE]) if where == "name" else (r.metadata == {"k": SURROGATE})
        tree, meta = {k: r.read(k) for k in r.keys()}, r.metadata
    dsts = ["out.safetensors", "out.h5", "out.pt", "shards/"] + (
        ["out.npz"] if where == "name" else []
    )
    for dst in dsts:  # (.npz holds no metadata)
        with pytest.raises((UnsafeContentError, ConversionError), match="lone surrogate"):
            tb.save(tree, f"{tmp_path}/{dst}", metadata=meta or None)
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]


@given(
    st.text(
        alphabet=st.sampled_from(["a", ".", "\ud800", "\udfff", "\udc80", "é", "\x00"]),
        min_size=1,
        max_size=12,
    )
)
@BOUNDED
def test_fuzzed_surrogate_names_save_or_refuse(name):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for target in ("m.safetensors", "s/"):
            try:
                tb.save({name: np.zeros(1, np.float32)}, os.path.join(d, target))
            except (UnsafeContentError, ConversionError):
                continue
            got = tb.load(os.path.join(d, target))
            assert list(got) == [name]


def test_name_of_5000_dotted_parts_nests_without_recursion_error(tmp_path):
    name = ".".join(["a"] * 5000)
    tb.save({name: np.ones(1)}, tmp_path / "deep.safetensors")
    tree = tb.load(tmp_path / "deep.safetensors", nested=True)
    depth = 0
    while isinstance(tree, dict):
        tree = tree["a"]
        depth += 1
    assert depth == 5000 and tree.tolist() == [1.0]
    assert unflatten_names({".".join(["0"] * 3000): 1})  # lists, innermost first


def test_bad_paths_are_refused_or_accepted_cleanly(tmp_path):
    with pytest.raises(ConversionError, match="NUL character"):
        tb.load(str(tmp_path / "a\x00.safetensors"))
    with pytest.raises(ConversionError, match="NUL character"):
        tb.save({"a": np.zeros(1)}, str(tmp_path / "a\x00.safetensors"))
    with pytest.raises(ConversionError, match="a path is a str, bytes or os.PathLike"):
        tb.load(42)  # type: ignore[arg-type]
    p = os.fsencode(str(tmp_path / "b.safetensors"))
    tb.save({"a": np.arange(3)}, p)  # bytes paths work, as in open()
    assert tb.load(p)["a"].tolist() == [0, 1, 2]
    with tb.open(p) as r:
        assert r.keys() == ["a"]


@pytest.mark.parametrize(
    "size",
    ["9" * 400 + ".5", "9" * 5000, 10**5000, 2**63, "x" * 10**6],
    ids=["inf-float", "5000-digits", "int-5000-digits", "2**63", "1M-text"],
)
def test_oversized_max_shard_size_is_refused(tmp_path, size):
    with pytest.raises(ConversionError, match="size"):
        tb.save({"a": np.zeros(1)}, str(tmp_path / "d") + "/", max_shard_size=size)
    assert not (tmp_path / "d").exists()


# --- what a save may delete, where it may write --------------------------------------------


def test_hostile_index_cannot_get_other_files_deleted(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    # (model.safetensors is removed by name, listed or not: the index supersedes it)
    victims = ["precious.safetensors", "model.bin", "other-00001-of-00002.safetensors"]
    for v in victims:
        (d / v).write_bytes(b"keep me")
    (tmp_path / "outside.safetensors").write_bytes(b"keep me too")
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {str(i): v for i, v in enumerate(victims + ["../outside.safetensors"])}}
        )
    )
    tb.save({"a": np.zeros(2)}, str(d) + "/")
    for v in victims:
        assert (d / v).read_bytes() == b"keep me", v
    assert (tmp_path / "outside.safetensors").read_bytes() == b"keep me too"
    assert tb.load(d)["a"].tolist() == [0.0, 0.0]


def test_previous_shards_of_our_own_are_still_removed(tmp_path):
    tb.save({f"t{i}": np.zeros(100) for i in range(4)}, str(tmp_path) + "/", max_shard_size=800)
    tb.save({"a": np.zeros(1)}, str(tmp_path) + "/")
    assert sorted(os.listdir(tmp_path)) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]


@pytest.mark.parametrize("name", ["x.npz", "m.safetensors", "w.pt", "a.h5"])
def test_directory_named_like_a_file_is_not_written_into(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(FileFormatError, match="directory named like a"):
        tb.save({"a": np.zeros(1)}, tmp_path / name)
    with pytest.raises(FileFormatError, match="directory named like a"):
        tb.save({"a": np.zeros(1)}, str(tmp_path / "new.npz") + "/")
    assert os.listdir(tmp_path / name) == [] and not (tmp_path / "new.npz").exists()


# --- locks -----------------------------------------------------------------------------------


def test_close_during_reads_never_reads_another_file(tmp_path):
    """close() from another thread waits for reads under way, so a descriptor number reused
    by another file is never read from."""
    import threading

    p = tmp_path / "m.safetensors"
    tb.save({"a": np.full(1 << 18, 7, np.int32)}, p)
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x01" * (1 << 20))
    errors: list[BaseException] = []
    for _ in range(30):
        r = ST.open(str(p))
        results = []

        def reader(r=r, results=results) -> None:
            for _ in range(20):
                try:
                    results.append(int(r.read("a")[-1]))
                except FileFormatError as exc:
                    assert "closed" in str(exc)
                    return
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        t = threading.Thread(target=reader)
        t.start()
        r.close()
        fds = [os.open(other, os.O_RDONLY) for _ in range(4)]  # take freed descriptor numbers
        t.join()
        for fd in fds:
            os.close(fd)
        assert set(results) <= {7}, results
    assert not errors, errors


def test_safejson_short_is_bounded_for_every_kind():
    assert len(safejson.short([[[[[[[[1]]]]]]]] * 10**5)) < 300
    assert len(safejson.short({str(i): "x" * 1000 for i in range(1000)})) < 300
    assert "bits" in safejson.short(10**10000)
    assert len(safejson.short(b"\xff" * 10**6)) < 300


@given(
    st.recursive(
        st.just("[]") | st.just("{}") | st.just("1") | st.just('"a"'),
        lambda kids: st.lists(kids, max_size=4).map(lambda k: "[" + ",".join(k) + "]"),
        max_leaves=60,
    ),
    st.integers(0, 40),
)
@BOUNDED
def test_fuzzed_json_nesting_parses_or_refuses_cleanly(doc, extra_depth):
    raw = ("[" * extra_depth + doc + "]" * extra_depth).encode()
    try:
        got = safejson.loads(raw, "f", "the index")
    except FileFormatError as exc:
        assert len(str(exc)) < 1000
        return
    assert json.loads(raw) == got


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for peak RSS")
def test_deep_index_directory_without_index_refuses_links_anywhere(tmp_path):
    """The fallbacks for a directory without an index follow no link out of it."""
    outside = tmp_path / "o"
    outside.mkdir()
    tb.save({"a": np.zeros(1)}, outside / "m.safetensors")
    for single in ("model.safetensors", "pytorch_model.bin"):
        d = tmp_path / single.replace(".", "_")
        d.mkdir()
        os.symlink(outside / "m.safetensors", d / single)
        with pytest.raises(UnsafeContentError, match="outside"):
            tb.load(d)
