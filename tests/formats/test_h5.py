"""HDF5: interoperability with h5py both ways, exact round trips of every dtype,
and refusal of everything that could read other files."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorbridge.dtypes import DTYPES
from tensorbridge.errors import (
    ConversionError,
    FileFormatError,
    FrameworkNotInstalledError,
    TensorBridgeError,
    UnsafeContentError,
)
from tensorbridge.formats.base import TensorInfo
from tensorbridge.formats.h5 import DTYPE_ATTR, FORMAT

from .samples import read_all_with, sample, same, write_with

RAW_BITS = [d.name for d in DTYPES.values() if d.numpy.isbuiltin == 2]
NATIVE = [d.name for d in DTYPES.values() if d.numpy.isbuiltin != 2]


def write(path, arrays: dict[str, np.ndarray], metadata=None) -> None:
    write_with(FORMAT, path, arrays, metadata)


def read_all(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return read_all_with(FORMAT, path)


# --- interoperability -----------------------------------------------------------------

def test_reads_h5py_files_with_groups_as_dotted_names(tmp_path):
    p = tmp_path / "keras.h5"
    arrays = {f"layers/l{i}/{name}": sample(name, (2, 3), seed=i) for i, name in enumerate(NATIVE)}
    with h5py.File(p, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        f.create_dataset("scalar", data=np.float32(-0.0))
        f.create_dataset("gz", data=sample("float32", (50,)), compression="gzip", chunks=(10,))
        f.attrs["note"] = "hello"
        f.attrs["epochs"] = 3  # not a string: not metadata
    got, metadata = read_all(p)
    assert metadata == {"note": "hello"}
    for k, v in arrays.items():
        assert same(got[k.replace("/", ".")], v), k
    assert same(got["scalar"], np.array(-0.0, np.float32))
    assert same(got["gz"], sample("float32", (50,)))


def test_big_endian_datasets_are_read_native_with_nan_payloads(tmp_path):
    bits = np.array([0x7FC01234, 0x80000000, 0x00000001, 0xFFA00001], dtype="<u4")
    p = tmp_path / "be.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("be", data=bits.view("<f4").astype(">f4"))
        f.create_dataset("be16", data=np.array([1, -2], dtype=">i2"))
    got, _ = read_all(p)
    assert got["be"].dtype == np.dtype("float32") and got["be"].dtype.isnative
    assert got["be"].view("<u4").tolist() == bits.tolist()
    assert same(got["be16"], np.array([1, -2], np.int16))


def test_h5py_reads_what_we_write(tmp_path):
    arrays = {name: sample(name, (4, 2)) for name in DTYPES}
    p = tmp_path / "ours.h5"
    write(p, arrays, {"k": "v"})
    with h5py.File(p, "r") as f:
        assert dict(f.attrs) == {"k": "v"}
        assert sorted(f.keys()) == sorted(arrays)
        for name, a in arrays.items():
            d = f[name]
            if name in RAW_BITS:
                assert d.attrs[DTYPE_ATTR] == name
                assert d.dtype == np.dtype(f"u{a.itemsize}")
                assert d[()].tobytes() == a.tobytes()
            else:
                assert DTYPE_ATTR not in d.attrs
                assert same(d[()], a), name


# --- round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (2, 0), (7,), (2, 3, 4)])
def test_round_trip_every_dtype_bit_exact(tmp_path, name, shape):
    a = sample(name, shape)
    p = tmp_path / "r.h5"
    write(p, {"enc.layer.w": a})
    got, _ = read_all(p)
    assert list(got) == ["enc.layer.w"]
    assert same(got["enc.layer.w"], a)
    assert got["enc.layer.w"].flags.writeable


def test_non_contiguous_and_big_endian_inputs(tmp_path):
    base = sample("float64", (4, 6))
    arrays = {"t": base.T, "s": base[::-1, ::2], "be": base.astype(">f8"),
              "bf": sample("bfloat16", (4, 6))[:, ::2]}
    write(tmp_path / "nc.h5", arrays)
    got, _ = read_all(tmp_path / "nc.h5")
    for k, v in arrays.items():
        assert same(got[k], np.ascontiguousarray(v).astype(v.dtype.newbyteorder("="))), k


def test_rewrite_replaces_content_and_keeps_mode(tmp_path):
    p = tmp_path / "m.h5"
    write(p, {"a": np.zeros(3)})
    os.chmod(p, 0o640)
    write(p, {"b": np.ones(2, np.int8)})
    assert list(read_all(p)[0]) == ["b"]
    assert os.stat(p).st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["m.h5"]


# --- hostile files ----------------------------------------------------------------------

SECRET = b"SECRET-do-not-leak-" * 8


@pytest.fixture
def sentinel(tmp_path):
    s = tmp_path / "sentinel.bin"
    s.write_bytes(SECRET)
    return s


def _refused(path, error, text):
    with pytest.raises(error) as info:
        FORMAT.open(str(path))
    assert type(info.value) is error
    assert text in str(info.value)
    assert str(path) in str(info.value)
    assert "SECRET" not in str(info.value)
    return info.value


def test_external_storage_is_refused(tmp_path, sentinel):
    p = tmp_path / "ext.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("leak", shape=(len(SECRET),), dtype="u1",
                         external=[(str(sentinel), 0, len(SECRET))])
    with h5py.File(p, "r") as f:  # h5py itself happily returns the other file's bytes
        assert f["leak"][()].tobytes() == SECRET
    _refused(p, UnsafeContentError, "external files")


def test_external_link_is_refused(tmp_path, sentinel):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("secret", data=np.frombuffer(SECRET, np.uint8))
    p = tmp_path / "link.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("fine", data=np.zeros(2))
        f.create_group("g")["stolen"] = h5py.ExternalLink(str(other), "/secret")
    _refused(p, UnsafeContentError, "external link")


def test_soft_link_is_refused(tmp_path):
    p = tmp_path / "soft.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("a", data=np.zeros(2))
        f["alias"] = h5py.SoftLink("/a")
    _refused(p, UnsafeContentError, "soft link to '/a'")


def test_virtual_dataset_is_refused(tmp_path):
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("x", data=np.arange(4))
    layout = h5py.VirtualLayout(shape=(4,), dtype="i8")
    layout[:] = h5py.VirtualSource(str(src), "x", shape=(4,))
    p = tmp_path / "vds.h5"
    with h5py.File(p, "w") as f:
        f.create_virtual_dataset("v", layout)
    _refused(p, UnsafeContentError, "virtual dataset")


def test_hard_linked_group_loop_is_refused(tmp_path):
    p = tmp_path / "loop.h5"
    with h5py.File(p, "w") as f:
        g = f.create_group("g")
        g.create_dataset("x", data=np.zeros(1))
        g["again"] = g
    _refused(p, UnsafeContentError, "second time")


@pytest.mark.parametrize("kind", ["vlen_str", "fixed_bytes", "compound", "object_ref", "vlen_int"])
def test_non_numeric_datasets_are_refused(tmp_path, kind):
    p = tmp_path / f"{kind}.h5"
    with h5py.File(p, "w") as f:
        if kind == "vlen_str":
            f.create_dataset("d", data=["a", "bc"], dtype=h5py.string_dtype())
        elif kind == "fixed_bytes":
            f.create_dataset("d", data=np.array([b"ab", b"c"]))
        elif kind == "compound":
            f.create_dataset("d", data=np.zeros(2, dtype=[("x", "f4"), ("y", "i4")]))
        elif kind == "object_ref":
            f.create_dataset("target", data=np.zeros(1))
            f.create_dataset("d", data=[f["target"].ref], dtype=h5py.ref_dtype)
        else:
            d = f.create_dataset("d", shape=(2,), dtype=h5py.vlen_dtype(np.int32))
            d[0] = [1, 2]
            d[1] = [3]
    _refused(p, FileFormatError, "not numbers")


def test_null_dataspace_is_refused(tmp_path):
    p = tmp_path / "null.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("e", data=h5py.Empty("f4"))
    _refused(p, FileFormatError, "null dataspace")


def test_absurd_uncompressed_size_is_refused_before_allocating(tmp_path):
    p = tmp_path / "huge.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("huge", shape=(2**40,), dtype="u1")  # storage never allocated
    assert os.path.getsize(p) < 10_000
    _refused(p, FileFormatError, "more than the whole file")


def test_compressed_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("ok", data=np.zeros(10_000_000, np.uint8), compression="gzip")
        bomb = f.create_dataset("bomb", shape=(2**36,), dtype="u1", compression="gzip",
                                chunks=(2**20,))
        bomb[:10] = 1  # one chunk stored; the rest would be produced from nothing
    assert os.path.getsize(p) < 200_000
    err = _refused(p, FileFormatError, "decompression bomb")
    assert "'bomb'" in str(err)
    with h5py.File(p, "a") as f:
        del f["bomb"]
    got, _ = read_all(p)  # real gzip data, however well it compresses, is fine
    assert same(got["ok"], np.zeros(10_000_000, np.uint8))


def test_dotted_and_grouped_names_that_collide_are_refused(tmp_path):
    p = tmp_path / "collide.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("a.b", data=np.zeros(1))
        f.create_dataset("a/b", data=np.ones(1))
    _refused(p, UnsafeContentError, "'a.b' appears more than once")


@pytest.mark.parametrize("value, dtype, text", [
    ("float128", "u2", "not one of"),
    ("bfloat16", "u1", "holds uint8, not uint16"),
    ("bfloat16", "f2", "holds float16, not uint16"),
])
def test_bad_dtype_markers_are_refused(tmp_path, value, dtype, text):
    p = tmp_path / "marker.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("d", data=np.zeros(2, dtype)).attrs[DTYPE_ATTR] = value
    _refused(p, FileFormatError, text)


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all" * 10, b"\x89HDF\r\n\x1a\n" + b"\0" * 64])
def test_garbage_is_a_file_format_error(tmp_path, content):
    p = tmp_path / "junk.h5"
    p.write_bytes(content)
    _refused(p, FileFormatError, "opening the HDF5 file failed")


def test_directory_is_refused(tmp_path):
    with pytest.raises(FileFormatError, match="not a regular file"):
        FORMAT.open(str(tmp_path))


def test_unknown_name_and_closed_reader(tmp_path):
    p = tmp_path / "u.h5"
    write(p, {"a": np.zeros(2)})
    r = FORMAT.open(str(p))
    with pytest.raises(FileFormatError, match="no tensor named 'b'"):
        r.info("b")
    r.close()
    r.close()
    with pytest.raises(FileFormatError, match="closed"):
        r.read("a")


# --- write refusals and atomicity ---------------------------------------------------------

@pytest.mark.parametrize("bad, error, text", [
    ("a/b", ConversionError, "'a.b'"),
    (".", ConversionError, "root itself"),
    ("../x", UnsafeContentError, "'..'"),
    ("", UnsafeContentError, "empty"),
    ("a\x00", UnsafeContentError, "NUL"),
])
def test_bad_names_are_refused_on_write(tmp_path, bad, error, text):
    with pytest.raises(error) as info:
        write(tmp_path / "n.h5", {bad: np.zeros(1)})
    assert text in str(info.value)
    assert os.listdir(tmp_path) == []


def test_non_string_metadata_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="strings to strings"):
        write(tmp_path / "m.h5", {"a": np.zeros(1)}, {"k": 1})
    assert os.listdir(tmp_path) == []


def test_fetch_failure_leaves_old_file_byte_identical(tmp_path):
    p = tmp_path / "keep.h5"
    write(p, {"old": np.arange(5)})
    before = p.read_bytes()
    infos = [TensorInfo("a", "float32", (10,)), TensorInfo("b", "float32", (10,))]

    def fetch(name):
        if name == "b":
            raise RuntimeError("boom")
        return np.zeros(10, np.float32)

    with pytest.raises(RuntimeError, match="boom"):
        FORMAT.write(str(p), infos, fetch)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.h5"]


def test_wrong_fetched_array_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="announced as float32"):
        FORMAT.write(str(tmp_path / "w.h5"), [TensorInfo("a", "float32", (2,))],
                     lambda n: np.zeros(3, np.float32))
    assert os.listdir(tmp_path) == []


def test_destination_directory_is_refused(tmp_path):
    with pytest.raises(FileFormatError, match="is a directory"):
        write(tmp_path, {"a": np.zeros(1)})


# --- h5py stays optional ---------------------------------------------------------------------

def test_missing_h5py_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(FrameworkNotInstalledError, match=r"tensorbridge\[h5\]"):
        FORMAT.open(str(tmp_path / "x.h5"))
    with pytest.raises(FrameworkNotInstalledError, match=r"pip install"):
        write(tmp_path / "x.h5", {"a": np.zeros(1)})


def test_importing_the_module_does_not_import_h5py():
    code = ("import sys, tensorbridge.formats.h5, tensorbridge.formats; "
            "tensorbridge.formats.get_format('h5'); assert 'h5py' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- fuzzing: byte mutations give a clean result or a TensorBridgeError -----------------------

@pytest.fixture(scope="module")
def valid_h5(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("fuzz") / "v.h5"
    write(p, {"a": sample("float32", (2, 3)), "b": sample("bfloat16", (4,)), "c": np.zeros(2, bool)},
          {"m": "x"})
    return p.read_bytes()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 8192)))
def test_fuzzed_files_never_crash_the_reader(tmp_path, valid_h5, edits, cut):
    data = bytearray(valid_h5)
    for pos, value in edits:
        data[pos % len(data)] = value
    p = tmp_path / "fuzz.h5"
    p.write_bytes(bytes(data if cut is None else data[:cut]))
    try:
        with FORMAT.open(str(p)) as r:
            for name in r.keys():
                assert r.read(name).nbytes == r.info(name).nbytes
    except TensorBridgeError:
        pass


@pytest.mark.parametrize("meta, text", [
    ({"": "e"}, "metadata key '' is refused: an HDF5 attribute name cannot be empty"),
    ({"k": "a\x00b"}, "metadata key 'k' is refused: an HDF5 string attribute cannot hold a NUL"),
    ({"k\x00z": "v"}, "metadata key 'k\\x00z' is refused: an HDF5 attribute name cannot hold a NUL"),
])
def test_unstorable_metadata_is_refused_before_writing(tmp_path, meta, text):
    p = tmp_path / "m.h5"
    write(p, {"old": np.arange(3)})
    before = p.read_bytes()
    with pytest.raises(ConversionError) as info:
        write(p, {"a": np.zeros(1)}, meta)
    assert text in str(info.value)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.h5"]
