"""zarr v3 stores: against zarr-python itself (both directions, bytes compared), Dask, xarray,
the CLI, the Writer, atomic replacement, and hostile stores (typed errors within bounds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import ConversionError, FileFormatError, TensorBridgeError

from ..hostile.bounded import MIB, run_bounded

zarr = pytest.importorskip("zarr")

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
]


def _array(dtype, shape=(5, 3), seed=0):
    rng = np.random.default_rng(seed)
    npdt = getattr(ml_dtypes, dtype, None) or np.dtype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if np.dtype(npdt).kind in "iu":
        info = np.iinfo(npdt)
        return rng.integers(info.min, info.max, shape, dtype=npdt, endpoint=True)
    raw = rng.integers(0, 256, int(np.prod(shape)) * np.dtype(npdt).itemsize, dtype=np.uint8)
    return raw.view(npdt).reshape(shape)  # every bit pattern, NaNs included


def _bytes(a):
    return np.array(a, order="C").tobytes()


def test_every_dtype_round_trips_and_zarr_python_reads_the_same_bytes(tmp_path):
    tree = {f"t.{d}": _array(d, seed=i) for i, d in enumerate(DTYPES)}
    tree["scalar"] = np.float32(1.5).reshape(())
    tree["empty"] = np.zeros((0, 4), np.int32)
    p = tmp_path / "all.zarr"
    tb.save(tree, p, metadata={"format": "test", "note": "ünïcode"})
    back = tb.load(p)
    assert list(back) == list(tree)
    for name, arr in tree.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        assert _bytes(back[name]) == _bytes(arr), name
    z = zarr.open_group(p, mode="r")
    for name, arr in tree.items():
        stored = z[name][...]
        raw = (
            arr.view(np.uint16 if arr.dtype == ml_dtypes.bfloat16 else np.uint8)
            if arr.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
            else arr
        )
        assert _bytes(stored) == _bytes(raw), name
    assert z.attrs["note"] == "ünïcode"
    with tb.open(p) as f:
        assert f.metadata == {"format": "test", "note": "ünïcode"}


def test_stores_written_by_zarr_python_are_read_exactly(tmp_path):
    p = tmp_path / "ref.zarr"
    g = zarr.open_group(p, mode="w")
    g.attrs["source"] = "zarr"
    want = {}
    for i, (dtype, chunks, comp) in enumerate(
        [
            ("float32", (4, 7), "auto"),
            ("int64", (3, 3), None),
            ("float64", (10, 10), "auto"),
            ("uint8", (1, 5), None),
            ("complex64", (2, 2), "auto"),
        ]
    ):
        arr = _array(dtype, (9, 7), seed=i)
        a = g.create_array(
            f"x{i}", shape=arr.shape, dtype=arr.dtype, chunks=chunks, compressors=comp
        )
        a[...] = arr
        want[f"x{i}"] = arr
    sub = g.create_group("enc")
    sub.create_array("k", shape=(3,), dtype="int16")[...] = np.array([1, -2, 3], np.int16)
    want["enc.k"] = np.array([1, -2, 3], np.int16)
    back = tb.load(p)
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert _bytes(back[k]) == _bytes(v) and back[k].dtype == v.dtype, k
    with tb.open(p) as f:
        assert f.metadata == {"source": "zarr"}
        assert f.native_chunks("x0") == (4, 7)
        (_,) = [d for d in [tb.to_dask(p)["x0"]]]
        assert f.array("x0")[2:8:3, ::-2].tobytes() == want["x0"][2:8:3, ::-2].tobytes()


def test_dask_and_xarray_read_what_tensorbridge_writes(tmp_path):
    da = pytest.importorskip("dask.array")
    xr = pytest.importorskip("xarray")
    tree = {"w": _array("float32", (40, 6)), "b": _array("int32", (6,))}
    p = tmp_path / "m.zarr"
    tb.save(tree, p)
    assert _bytes(da.from_zarr(str(p), component="w").compute()) == _bytes(tree["w"])
    ds = xr.open_zarr(p, consolidated=False)
    assert _bytes(ds["w"].values) == _bytes(tree["w"]) and _bytes(ds["b"].values) == _bytes(
        tree["b"]
    )
    chunks = tb.to_dask(p)["w"].chunks
    assert chunks[0] == (40,)


def test_writer_appends_along_axis_0(tmp_path):
    p = tmp_path / "stream.zarr"
    with tb.Writer(p) as w:
        for i in range(4):
            w.append(x=np.full((3, 2), i, np.float32), y=np.arange(2, dtype=np.int64) + i)
    back = tb.load(p)
    assert back["x"].shape == (12, 2) and back["x"][::3, 0].tolist() == [0, 1, 2, 3]
    assert back["y"].tolist() == [0, 1, 1, 2, 2, 3, 3, 4]


def test_replacing_a_store_is_atomic_and_keeps_the_old_one_on_failure(tmp_path):
    p = tmp_path / "m.zarr"
    tb.save({"a": np.ones(3)}, p)

    class Boom:
        shape, dtype = (3,), np.float64

    def bad_tree():  # the second tensor fails while it is fetched
        return {"a": np.zeros(3), "b": np.zeros(2)}

    from tensorbridge.formats.base import TensorInfo
    from tensorbridge.formats.zarr import FORMAT

    def fetch(name):
        if name == "b":
            raise RuntimeError("disk gone")
        return np.zeros(3)

    with pytest.raises(RuntimeError, match="disk gone"):
        FORMAT.write(
            str(p), [TensorInfo("a", "float64", (3,)), TensorInfo("b", "float64", (2,))], fetch
        )
    assert tb.load(p)["a"].tolist() == [1, 1, 1]
    assert os.listdir(tmp_path) == ["m.zarr"]  # no temporary store left behind
    tb.save(bad_tree(), p)
    assert sorted(tb.load(p)) == ["a", "b"] and os.listdir(tmp_path) == ["m.zarr"]


def test_a_destination_that_is_not_a_store_is_not_replaced(tmp_path):
    p = tmp_path / "keep.zarr"
    p.mkdir()
    (p / "precious.txt").write_text("mine")
    with pytest.raises(FileFormatError, match="not a zarr store"):
        tb.save({"a": np.ones(1)}, p)
    assert (p / "precious.txt").read_text() == "mine"
    with pytest.raises(ConversionError, match="zarr array name"):
        tb.save({"a/b": np.ones(1)}, tmp_path / "x.zarr")


def test_cli_inspect_convert_diff(tmp_path):
    src = tmp_path / "m.safetensors"
    tb.save({"w": _array("bfloat16", (4, 4)), "b": _array("float32", (4,))}, src)
    z = tmp_path / "m.zarr"

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "tensorbridge", *map(str, a)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = run("convert", src, z)
    assert r.returncode == 0, r.stderr
    r = run("diff", src, z)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("inspect", z, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    entry = doc["files"][0] if "files" in doc else doc
    assert sorted(t["name"] for t in entry["tensors"]) == ["b", "w"]
    with tb.open(src) as f, tb.open(z) as g:
        assert g.keys() == f.keys()  # the source's order kept
    back = tmp_path / "back.npz"
    assert run("convert", z, back).returncode == 0
    assert _bytes(tb.load(back)["w"]) == _bytes(tb.load(src)["w"])


# --- hostile stores -----------------------------------------------------------------


def _store(tmp_path, name="h.zarr", arr=None):
    p = tmp_path / name
    tb.save({"w": np.arange(12, dtype=np.float32).reshape(3, 4) if arr is None else arr}, p)
    return p


def _edit_meta(p, node, fn):
    f = p / node / "zarr.json"
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


def test_links_anywhere_in_the_store_are_refused(tmp_path):
    p = _store(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x00" * 48)
    chunk = next(q for q in (p / "w").rglob("*") if q.is_file() and q.name != "zarr.json")
    chunk.unlink()
    chunk.symlink_to(secret)
    with pytest.raises(FileFormatError, match="symbolic link"):
        tb.open(p)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["codecs"].append({"name": "numcodecs.pickle"}), "does not decode"),
        (lambda m: m.update(data_type="variable_length_utf8"), None),
        (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[1 << 20, 1 << 20]), "cap"),
        (lambda m: m.update(shape=[-1, 4]), "non-negative"),
        (lambda m: m.update(shape=[3]), "matching the shape"),
        (lambda m: m["attributes"].update(tensorbridge_dtype="bfloat16"), "does not match"),
    ],
)
def test_bad_array_metadata_is_refused_or_skipped(tmp_path, edit, match):
    p = _store(tmp_path)
    _edit_meta(p, "w", lambda m: (m.setdefault("attributes", {}), edit(m)))
    if match is None:  # a non-numeric array is skipped, and the reader says why
        with tb.open(p) as f:
            assert f.keys() == [] and "not a numeric tensor dtype" in f.skipped["w"]
        return
    with pytest.raises(FileFormatError, match=match):
        tb.load(p)


def test_v2_stores_deep_and_huge_metadata_are_refused(tmp_path):
    v2 = tmp_path / "v2.zarr"
    zarr.open_group(v2, mode="w", zarr_format=2).create_array("a", shape=(2,), dtype="f4")
    with pytest.raises(FileFormatError, match="zarr v2"):
        tb.open(v2)
    for name, text, refusal in [  # dense: 100k nested lists; deep: 40 levels, spaced out
        ("dense.zarr", "[" * 100_000 + "]" * 100_000, "JSON arrays and objects in"),
        ("deep.zarr", "[" * 40 + " " * 4000 + "]" * 40, "over the limit of 32"),
    ]:
        p = _store(tmp_path, name)
        (p / "zarr.json").write_text(
            '{"zarr_format": 3, "node_type": "group", "attributes": {"x": ' + text + "}}"
        )
        r = run_bounded("import tensorbridge as tb; tb.open(ARGS[0])", [str(p)], timeout=60)
        assert r.outcome == "refused" and refusal in r.detail, r
        assert r.peak_rss < 300 * MIB
    p = _store(tmp_path, "huge.zarr")
    with open(p / "zarr.json", "r+b") as f:
        f.seek(32 << 20)
        f.write(b" ")
    with pytest.raises(FileFormatError, match="cap"):
        tb.open(p)


def test_metadata_zarr_python_writes_is_read(tmp_path):
    """zarr metadata goes through the same JSON budget as safetensors headers, with its own
    depth (32, not 16) and NaN/Infinity allowed: zarr-python writes NaN in attributes."""
    p = tmp_path / "attrs.zarr"
    g = zarr.open_group(p, mode="w")
    deep: list = [1]
    for _ in range(20):
        deep = [deep]
    g.attrs.update(fill=float("nan"), top=float("inf"), deep=deep)
    g.create_array("a", shape=(3,), dtype="float32")[:] = [1, 2, 3]
    assert b"NaN" in (p / "zarr.json").read_bytes()
    with tb.open(p) as f:
        assert f.read("a").tolist() == [1, 2, 3]
    (p / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "node_type": "x"}')
    with pytest.raises(FileFormatError, match="more than once"):
        tb.open(p)


def test_a_mostly_fill_value_array_is_refused_whole_but_indexable(tmp_path):
    p = tmp_path / "sparse.zarr"
    g = zarr.open_group(p, mode="w")
    a = g.create_array("big", shape=(1 << 20, 1 << 12), dtype="float32", chunks=(64, 1 << 12))
    a[5, :3] = [1, 2, 3]  # one chunk written; 16 GiB declared
    r = run_bounded(
        """
        import tensorbridge as tb
        from tensorbridge.errors import FileFormatError
        try:
            tb.load(ARGS[0])
        except FileFormatError as e:
            refused = "mostly fill value" in str(e)
        with tb.open(ARGS[0]) as f:
            RESULT = [refused, f.array("big")[5, :4].tolist()]
    """,
        [str(p)],
        timeout=60,
        mem_limit=2 << 30,
    )
    assert r.outcome == "ok", r.detail
    assert r.result == [True, [1.0, 2.0, 3.0, 0.0]]
    assert r.peak_rss < 400 * MIB


def test_corrupt_chunks_are_typed_errors(tmp_path):
    p = _store(tmp_path)
    chunk = next(q for q in (p / "w").rglob("*") if q.is_file() and q.name != "zarr.json")
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(40))
    with pytest.raises(FileFormatError, match="corrupt or incomplete"):
        tb.load(p)


def test_zarr_is_imported_only_for_zarr_stores():
    r = run_bounded("""
        import sys, tempfile, os, numpy as np, tensorbridge as tb
        p = os.path.join(tempfile.mkdtemp(), "a.npz")
        tb.save({"a": np.ones(2)}, p); tb.load(p)
        RESULT = "zarr" in sys.modules
    """)
    assert r.outcome == "ok" and r.result is False


# --- fuzz: array metadata values and chunk bytes -----------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ..hostile.test_fuzz import _JSON_VALUE, FUZZ, MUTATIONS, mutate  # noqa: E402

_FUZZ_ROOT = None


def _fuzz_store():
    global _FUZZ_ROOT
    if _FUZZ_ROOT is None:
        import tempfile

        _FUZZ_ROOT = tempfile.mkdtemp(prefix="tb-zarr-fuzz-")
        p = os.path.join(_FUZZ_ROOT, "seed.zarr")
        tb.save(
            {
                "w": np.arange(24, dtype=np.float32).reshape(6, 4),
                "h": np.ones((3, 2), ml_dtypes.bfloat16),
                "b": np.array([True, False]),
            },
            p,
        )
    return os.path.join(_FUZZ_ROOT, "seed.zarr")


def _read_all(p):
    try:
        with tb.open(p) as f:
            for name in f.keys():
                f.read(name)
                f.array(name)[..., :1]
    except TensorBridgeError:
        pass


@FUZZ
@given(
    node=st.sampled_from(["", "w", "h", "b"]),
    key=st.sampled_from(
        [
            "shape",
            "data_type",
            "chunk_grid",
            "codecs",
            "fill_value",
            "attributes",
            "chunk_key_encoding",
            "zarr_format",
            "node_type",
            "dimension_names",
        ]
    ),
    value=_JSON_VALUE,
    ops=MUTATIONS,
    structural=st.booleans(),
)
def test_fuzz_zarr_metadata_and_chunks(tmp_path, node, key, value, ops, structural):
    import shutil

    p = tmp_path / "f.zarr"
    if p.exists():
        shutil.rmtree(p)
    shutil.copytree(_fuzz_store(), p)
    if structural:
        f = p / node / "zarr.json"
        meta = json.loads(f.read_text())
        meta[key] = value
        f.write_text(json.dumps(meta))
    else:
        chunks = sorted(q for q in p.rglob("*") if q.is_file() and q.name != "zarr.json")
        target = chunks[len(ops) % len(chunks)]
        target.write_bytes(mutate(target.read_bytes(), ops))
    _read_all(p)  # only a TensorBridgeError may escape


@pytest.mark.parametrize("used_before", [False, True])
def test_zarr_at_interpreter_exit_is_refused_with_a_fix(tmp_path, used_before):
    """zarr-python cannot start its threads once Python is shutting down (an atexit
    handler): the save and the load raise FileFormatError saying so, not a bare
    RuntimeError, and leave nothing behind."""
    p = str(tmp_path / "x.zarr")
    code = f"""
        import atexit, os, numpy as np, tensorbridge as tb
        from tensorbridge.errors import FileFormatError
        if {used_before}:
            tb.save({{"a": np.zeros(3, np.float32)}}, {p!r} + ".first.zarr")
        def late():
            for call in (lambda: tb.save({{"a": np.ones(3, np.float32)}}, {p!r}),
                         lambda: tb.load({p!r} + ".first.zarr" if {used_before} else {p!r})):
                try:
                    call()
                    print("done")
                except FileFormatError as exc:
                    print("refused:", "shutting down" in str(exc) and "Fix:" in str(exc))
            print(sorted(n for n in os.listdir({str(tmp_path)!r}) if not n.endswith(".first.zarr")))
        atexit.register(late)
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["refused: True", "refused: True", "[]"], done.stdout


def test_zarr_from_a_thread_left_running_at_exit_says_to_join_it(tmp_path):
    """A thread that saves after the main thread has returned gets the same refusal, and
    its fix names that case."""
    p = str(tmp_path / "t.zarr")
    code = f"""
        import threading, time, numpy as np, tensorbridge as tb
        from tensorbridge.errors import FileFormatError
        def late():
            time.sleep(0.5)  # the main thread has returned by now
            try:
                tb.save({{"a": np.ones(3, np.float32)}}, {p!r})
                print("done")
            except FileFormatError as exc:
                print("refused:", "join that thread" in str(exc))
        threading.Thread(target=late).start()
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["refused: True"], done.stdout
    assert not os.path.exists(p)


@pytest.mark.parametrize("dtype", [">f4", ">i8", ">c8", ">u2", ">f2"])
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_byte_swapped_arrays_are_saved_as_their_values(tmp_path, dtype, shape):
    """A big-endian array is stored (little-endian) with its values, as every other
    format does; before, the save refused it as a bug in the caller."""
    a = (np.arange(int(np.prod(shape))) + 1).astype(dtype).reshape(shape)
    native = a.astype(a.dtype.newbyteorder("="))
    path = tmp_path / "s.zarr"
    tb.save({"a": a}, str(path))
    got = tb.load(str(path))["a"]
    assert got.dtype == native.dtype and got.shape == shape
    assert got.tobytes() == native.tobytes()
    theirs = zarr.open_group(str(path), mode="r")["a"][...]
    assert np.asarray(theirs).tobytes() == native.tobytes()


def test_zarr_load_from_a_del_at_teardown_says_python_is_shutting_down(tmp_path):
    """A ``__del__`` run while Python tears its modules down can import nothing: the load
    says that Python is shutting down, with a fix, not that zarr-python is missing."""
    p = str(tmp_path / "x.zarr")
    code = f"""
        import numpy as np, tensorbridge as tb
        from tensorbridge.errors import FileFormatError
        tb.save({{"a": np.zeros(3, np.float32)}}, {p!r})
        class Late:
            def __del__(self, tb=tb, FileFormatError=FileFormatError, print=print):
                try:
                    tb.load({p!r})
                    print("done", flush=True)
                except FileFormatError as exc:
                    text = str(exc)
                    print("refused:", "shutting down" in text and "Fix:" in text
                          and "not installed" not in text, flush=True)
                except BaseException as exc:
                    print("other:", type(exc).__name__, exc, flush=True)
        late = Late()  # a module global: collected as __main__ is torn down
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["refused: True"], done.stdout


def _temporaries(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tb-tmp-" in n)


def _interrupted_then_saved(tmp_path, monkeypatch, dest, fetch) -> None:
    """A save whose ``fetch`` raises KeyboardInterrupt (with the test's patches) leaves one
    temporary store; once the patches are undone, the next save leaves none."""
    import tensorbridge.formats.zarr as zarr_mod
    from tensorbridge.formats.base import TensorInfo

    with pytest.raises(KeyboardInterrupt):
        zarr_mod.FORMAT.write(str(dest), [TensorInfo("a", "float32", (3,))], fetch)
    monkeypatch.undo()
    assert len(_temporaries(tmp_path)) == 1
    tb.save({"a": np.ones(3, np.float32)}, str(dest))
    assert _temporaries(tmp_path) == []


def test_a_store_left_by_a_killed_writer_is_removed_by_the_next_save(tmp_path):
    """A killed writer's temporary store (no one holds its lock; its PID is gone) is
    removed by the next save of the same store; one whose lock is held is kept."""
    from tensorbridge.formats import atomic

    dest = tmp_path / "x.zarr"
    tb.save({"a": np.zeros(3, np.float32)}, str(dest))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    left = tmp_path / f".x.zarr{atomic.TMP_MARKER}{pid}-0badf00d"
    held = tmp_path / f".x.zarr{atomic.TMP_MARKER}{pid}-0000cafe"
    for d in (left, held):
        (d / "a" / "c").mkdir(parents=True)
        (d / "a" / "c" / "0").write_bytes(b"chunk")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(held),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        tb.save({"a": np.ones(3, np.float32)}, str(dest))
        assert _temporaries(tmp_path) == [held.name]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert tb.load(str(dest))["a"].tolist() == [1.0, 1.0, 1.0]
    tb.save({"a": np.ones(3, np.float32)}, str(dest))  # its lock is free now
    assert _temporaries(tmp_path) == []


def test_a_store_whose_removal_was_interrupted_is_removed_by_the_next_save(tmp_path, monkeypatch):
    """A Ctrl-C while a failed save removes its temporary store leaves the store; the
    next save of this process removes it (its PID is alive, so only this process may)."""
    import shutil

    import tensorbridge.formats.zarr as zarr_mod

    dest = tmp_path / "x.zarr"
    tb.save({"a": np.zeros(3, np.float32)}, str(dest))
    real_rmtree = shutil.rmtree

    def fetch_fails(name):
        raise ValueError("no tensor")

    def rmtree(path, *args, **kwargs):
        monkeypatch.setattr(zarr_mod.shutil, "rmtree", real_rmtree)  # (once)
        raise KeyboardInterrupt

    monkeypatch.setattr(zarr_mod.shutil, "rmtree", rmtree)
    _interrupted_then_saved(tmp_path, monkeypatch, dest, fetch_fails)
    assert tb.load(str(dest))["a"].tolist() == [1.0, 1.0, 1.0]


def test_a_store_made_again_after_its_removal_is_removed_by_the_next_save(tmp_path, monkeypatch):
    """zarr-python's own thread can finish an interrupted save's chunk writes after the
    store was removed, and make its directories again: the next save of this process
    removes it all the same."""
    import tensorbridge.formats.zarr as zarr_mod

    dest = tmp_path / "x.zarr"
    tb.save({"a": np.zeros(3, np.float32)}, str(dest))
    real_discard = zarr_mod._discard

    def discard(tmp):
        real_discard(tmp)
        os.makedirs(os.path.join(tmp, "a", "c"))  # a late chunk write
        with open(os.path.join(tmp, "a", "c", "0"), "wb") as f:
            f.write(b"chunk")

    monkeypatch.setattr(zarr_mod, "_discard", discard)

    def fetch_fails(name):
        raise KeyboardInterrupt

    _interrupted_then_saved(tmp_path, monkeypatch, dest, fetch_fails)


@pytest.mark.parametrize("fault", [OSError(5, "Input/output error"), KeyboardInterrupt()])
def test_without_an_exchange_a_failed_second_rename_puts_the_old_store_back(
    tmp_path, monkeypatch, fault
):
    """Where two paths cannot be exchanged (not Linux), the old store is moved aside and
    the new one renamed in: a failure between puts the old one back, and its aside name
    is one no later save takes for a stale temporary store."""
    import tensorbridge.formats.zarr as zarr_mod

    dest = tmp_path / "x.zarr"
    tb.save({"a": np.zeros(3, np.float32)}, str(dest))
    monkeypatch.setattr(zarr_mod, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(dst) == str(dest) and ".tb-tmp-" in os.fspath(src):
            raise fault
        return real_rename(src, dst)

    monkeypatch.setattr(zarr_mod.os, "rename", rename)
    with pytest.raises((FileFormatError, KeyboardInterrupt)):
        tb.save({"a": np.ones(3, np.float32)}, str(dest))
    monkeypatch.undo()
    assert tb.load(str(dest))["a"].tolist() == [0.0, 0.0, 0.0]
    assert sorted(os.listdir(tmp_path)) == ["x.zarr"]
    monkeypatch.setattr(zarr_mod, "_exchange", lambda a, b: False)
    tb.save({"a": np.ones(3, np.float32)}, str(dest))  # and without a fault, it is replaced
    assert tb.load(str(dest))["a"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == ["x.zarr"]


def test_a_load_during_which_another_save_swaps_the_store_reads_one_version(tmp_path, monkeypatch):
    """zarr-python reads chunks by path: a save that swaps in a new store while a load
    reads would give it arrays of two versions. The load notices the swap and reads
    again, and returns one version (before, it mixed them without a word)."""
    import tensorbridge.formats.zarr as zarr_mod
    from tensorbridge.errors import CheckpointChangedError

    dest = str(tmp_path / "x.zarr")
    tb.save({"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)}, dest)
    real_read, reads = zarr_mod.ZarrReader.read, []

    def read(self, name):
        reads.append(name)
        got = real_read(self, name)
        if len(reads) == 1:  # another save, between the load's two arrays
            tb.save({"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)}, dest)
        return got

    monkeypatch.setattr(zarr_mod.ZarrReader, "read", read)
    got = tb.load(dest)
    assert len(reads) == 4  # read again
    assert got["a"].tolist() == got["b"].tolist() == [1.0, 1.0, 1.0]
    monkeypatch.undo()
    with tb.open(dest) as r:
        r.read("a")
        tb.save({"a": np.full(3, 2, np.float32), "b": np.full(3, 2, np.float32)}, dest)
        with pytest.raises(CheckpointChangedError, match="replaced or changed while it was read"):
            r.verify()


def test_a_store_swapped_while_it_is_opened_is_opened_again(tmp_path, monkeypatch):
    """Another save swaps the store while a load walks it (a file of the walk is gone):
    the load opens it again instead of raising the walk's FileNotFoundError."""
    import tensorbridge.formats.zarr as zarr_mod

    dest = str(tmp_path / "x.zarr")
    tb.save({"a": np.zeros(3, np.float32)}, dest)
    real_walk, walks = zarr_mod._walk, []

    def walk(path):
        walks.append(path)
        if len(walks) == 1:
            tb.save({"b": np.ones(3, np.float32)}, dest)  # another save, mid-walk
            raise FileNotFoundError(2, "No such file or directory", path + "/a/zarr.json")
        return real_walk(path)

    monkeypatch.setattr(zarr_mod, "_walk", walk)
    got = tb.load(dest)
    assert len(walks) == 2 and list(got) == ["b"] and got["b"].tolist() == [1.0, 1.0, 1.0]


def test_without_an_exchange_an_interrupt_after_the_second_rename_removes_the_old_store(
    tmp_path, monkeypatch
):
    """The interrupt comes as the second rename returns: the new store is in place, and
    the old one, moved aside, is removed (its aside name is one no cleaner takes)."""
    import tensorbridge.formats.zarr as zarr_mod

    dest = tmp_path / "x.zarr"
    tb.save({"a": np.zeros(3, np.float32)}, str(dest))
    monkeypatch.setattr(zarr_mod, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if os.fspath(dst) == str(dest) and ".tb-tmp-" in os.fspath(src):
            raise KeyboardInterrupt  # as a handler run when the call returns would

    monkeypatch.setattr(zarr_mod.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        tb.save({"a": np.ones(3, np.float32)}, str(dest))
    monkeypatch.undo()
    assert tb.load(str(dest))["a"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == ["x.zarr"]


@pytest.mark.parametrize("locks", ["flock", "none"])
def test_this_processs_own_unlocked_store_is_removed_and_a_locked_one_kept(
    tmp_path, monkeypatch, locks
):
    """A temporary store of this very process that no save holds any more (zarr-python's
    thread made it again after a later save had cleared it) is removed by the next save;
    one that a save of this process is writing is kept, also where the file system has
    no locks (every lock granted): this process knows its own."""
    from tensorbridge.formats import atomic

    if locks == "none":
        monkeypatch.setattr(atomic, "_flock", lambda fd, wait: True)
    dest = tmp_path / "x.zarr"
    tb.save({"a": np.zeros(3, np.float32)}, str(dest))
    late = tmp_path / f".x.zarr{atomic.TMP_MARKER}{os.getpid()}-0badf00d"
    (late / "a" / "c").mkdir(parents=True)
    busy, fd = atomic.new_locked_directory(str(tmp_path), "x.zarr")  # (another thread's)
    try:
        tb.save({"a": np.ones(3, np.float32)}, str(dest))
        assert _temporaries(tmp_path) == [os.path.basename(busy)]
    finally:
        atomic.release_directory(busy, fd)
    tb.save({"a": np.ones(3, np.float32)}, str(dest))
    assert _temporaries(tmp_path) == []


def test_convert_into_an_existing_store_replaces_it(tmp_path, capsys):
    """`tensorbridge convert x.safetensors y.zarr` over an existing store replaces it, as
    save does (before, the existing directory was taken for a sharded checkpoint's and
    refused); a directory of another name is still a sharded checkpoint's."""
    from tensorbridge.cli import main

    src, dst = str(tmp_path / "x.safetensors"), str(tmp_path / "y.zarr")
    tb.save({"a": np.ones(3, np.float32)}, src)
    tb.save({"a": np.zeros(3, np.float32)}, dst)
    assert main(["convert", src, dst]) == 0
    assert tb.load(dst)["a"].tolist() == [1.0, 1.0, 1.0]
    other = tmp_path / "ckpt"
    other.mkdir()
    assert main(["convert", src, str(other)]) == 0
    assert "model.safetensors.index.json" in os.listdir(other)


def test_without_an_exchange_an_old_store_whose_removal_is_interrupted_goes_next_time(
    tmp_path, monkeypatch
):
    """Once the new store is in, the old one moved aside is renamed to a temporary name
    before it is removed: an interrupt during its removal leaves it to the next save, not
    under the aside name that no save removes."""
    import tensorbridge.formats.zarr as zarr_mod

    dest = tmp_path / "x.zarr"
    tb.save({"a": np.zeros(3, np.float32)}, str(dest))
    monkeypatch.setattr(zarr_mod, "_exchange", lambda a, b: False)

    def discard(tmp):
        raise KeyboardInterrupt  # as the old store's removal begins

    monkeypatch.setattr(zarr_mod, "_discard", discard)
    with pytest.raises(KeyboardInterrupt):
        tb.save({"a": np.ones(3, np.float32)}, str(dest))
    monkeypatch.undo()
    assert tb.load(str(dest))["a"].tolist() == [1.0, 1.0, 1.0]
    assert len(_temporaries(tmp_path)) == 1
    tb.save({"a": np.full(3, 2, np.float32)}, str(dest))
    assert sorted(os.listdir(tmp_path)) == ["x.zarr"]
