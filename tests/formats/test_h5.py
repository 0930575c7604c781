"""HDF5: interoperability with h5py both ways, exact round trips of every dtype,
and refusal of everything that could read other files."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

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

from .samples import read_all_with, same, sample, write_with

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
                assert d.attrs[DTYPE_ATTR] == name.encode()  # fixed-length ASCII
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
    arrays = {
        "t": base.T,
        "s": base[::-1, ::2],
        "be": base.astype(">f8"),
        "bf": sample("bfloat16", (4, 6))[:, ::2],
    }
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


def _external_storage(f, d):
    f.create_dataset(
        "x", shape=(len(SECRET),), dtype="u1", external=[(str(d / "sentinel.bin"), 0, len(SECRET))]
    )


def _external_link(f, d):
    with h5py.File(d / "other.h5", "w") as o:
        o.create_dataset("secret", data=np.frombuffer(SECRET, np.uint8))
    f["x"] = h5py.ExternalLink(str(d / "other.h5"), "/secret")


def _virtual(f, d):
    with h5py.File(d / "src.h5", "w") as o:
        o.create_dataset("s", data=np.frombuffer(SECRET, np.uint8))
    layout = h5py.VirtualLayout(shape=(len(SECRET),), dtype="u1")
    layout[:] = h5py.VirtualSource(str(d / "src.h5"), "s", shape=(len(SECRET),))
    f.create_virtual_dataset("x", layout)


def _vlen_int(f, d):
    x = f.create_dataset("x", shape=(2,), dtype=h5py.vlen_dtype(np.int32))
    x[0] = [1, 2]
    x[1] = [3]


def _partly_chunked(f, d):
    f.create_dataset("x", shape=(40,), dtype="f4", chunks=(10,))[:10] = 1


def _named_type(f, d):
    f["x"] = np.dtype("f4")


#: a dataset or link "x" that cannot be a tensor: how to make it, the reason given, and the
#: error when the file holds nothing else
UNREADABLE = {
    "external storage": (_external_storage, "its data lives in external files", UnsafeContentError),
    "external link": (_external_link, "an external link to", UnsafeContentError),
    "virtual dataset": (_virtual, "a virtual dataset", UnsafeContentError),
    "dangling soft link": (
        lambda f, d: f.__setitem__("x", h5py.SoftLink("/gone")),
        "a soft link to '/gone'",
        FileFormatError,
    ),
    "vlen str": (
        lambda f, d: f.create_dataset("x", data=["a", "bc"], dtype=h5py.string_dtype()),
        "not numbers",
        FileFormatError,
    ),
    "fixed bytes": (
        lambda f, d: f.create_dataset("x", data=np.array([b"ab", b"c"])),
        "not numbers",
        FileFormatError,
    ),
    "compound": (
        lambda f, d: f.create_dataset("x", data=np.zeros(2, [("a", "f4"), ("b", "i4")])),
        "not numbers",
        FileFormatError,
    ),
    "object ref": (
        lambda f, d: f.create_dataset("x", data=[f.ref], dtype=h5py.ref_dtype),
        "not numbers",
        FileFormatError,
    ),
    "vlen int": (_vlen_int, "not numbers", FileFormatError),
    "null dataspace": (
        lambda f, d: f.create_dataset("x", data=h5py.Empty("f4")),
        "null dataspace",
        FileFormatError,
    ),
    "never written": (
        lambda f, d: f.create_dataset("x", shape=(2**40,), dtype="u1"),
        "never written",
        FileFormatError,
    ),
    "partly written chunks": (_partly_chunked, "partly written: 1 of 4 chunks", FileFormatError),
    "huge chunks": (
        lambda f, d: f.create_dataset(
            "x", shape=(1,), maxshape=(None,), chunks=(2**27,), dtype="f4", data=[1]
        ),
        "chunks hold 536870912 bytes each, for a tensor of 4 bytes",
        FileFormatError,
    ),
    "named datatype": (_named_type, "a named datatype", FileFormatError),
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_unreadable_entries_are_skipped_with_the_reason(tmp_path, sentinel, kind):
    make, why, _ = UNREADABLE[kind]
    p = tmp_path / "mixed.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("ok", data=np.arange(3.0))
        make(f, tmp_path)
    with FORMAT.open(str(p)) as r:
        assert r.keys() == ["ok"]
        assert same(r.read("ok"), np.arange(3.0))
        assert list(r.skipped) == ["x"], r.skipped
        assert why in r.skipped["x"]
        assert "SECRET" not in repr(r.skipped)


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_a_file_with_nothing_readable_is_refused_with_the_reasons(tmp_path, sentinel, kind):
    make, why, error = UNREADABLE[kind]
    p = tmp_path / "only.h5"
    with h5py.File(p, "w") as f:
        make(f, tmp_path)
    err = _refused(p, error, why)
    assert "no dataset can be read as a tensor: 'x': " in str(err)


def test_hard_links_are_read_once_under_their_first_name(tmp_path):
    p = tmp_path / "links.h5"
    with h5py.File(p, "w") as f:
        g = f.create_group("g")
        g.create_dataset("x", data=np.arange(4.0))
        for i in range(3):
            f[f"z{i}"] = g["x"]  # three more names of the same dataset
        g["again"] = g  # a group that contains itself
        f["s"] = h5py.SoftLink("/g/x")
    with FORMAT.open(str(p)) as r:
        assert r.keys() == ["g.x"]
        assert r.skipped == {
            "g.again": "another name (hard link) of 'g', which is read once, under that name",
            "s": "a soft link to '/g/x'; links are not followed (read the target's own name)",
            **{
                f"z{i}": "another name (hard link) of 'g.x', which is read once, under that name"
                for i in range(3)
            },
        }


def test_compressed_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("ok", data=np.zeros(10_000_000, np.uint8), compression="gzip")
        bomb = f.create_dataset(
            "bomb", shape=(2**34,), dtype="u1", compression="gzip", chunks=(2**24,)
        )
        for i in range(1024):  # every chunk stored, each a deflate stream of 5 bytes
            bomb.id.write_direct_chunk((i * 2**24,), zlib.compress(b"", 9))
    assert os.path.getsize(p) < 500_000
    err = _refused(p, UnsafeContentError, "decompression bomb")
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


@pytest.mark.parametrize(
    "value, dtype, text",
    [
        ("float128", "u2", "not one of"),
        ("bfloat16", "u1", "holds uint8, not uint16"),
        ("bfloat16", "f2", "holds float16, not uint16"),
    ],
)
def test_bad_dtype_markers_are_refused(tmp_path, value, dtype, text):
    p = tmp_path / "marker.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("d", data=np.zeros(2, dtype)).attrs[DTYPE_ATTR] = value
    _refused(p, FileFormatError, text)


@pytest.mark.parametrize(
    "content", [b"", b"not an hdf5 file at all" * 10, b"\x89HDF\r\n\x1a\n" + b"\0" * 64]
)
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


@pytest.mark.parametrize(
    "bad, error, text",
    [
        ("a/b", ConversionError, "'a.b'"),
        (".", ConversionError, "root itself"),
        ("../x", UnsafeContentError, "'..'"),
        ("", UnsafeContentError, "empty"),
        ("a\x00", UnsafeContentError, "NUL"),
    ],
)
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
        FORMAT.write(
            str(tmp_path / "w.h5"),
            [TensorInfo("a", "float32", (2,))],
            lambda n: np.zeros(3, np.float32),
        )
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
    code = (
        "import sys, tensorbridge.formats.h5, tensorbridge.formats; "
        "tensorbridge.formats.get_format('h5'); assert 'h5py' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- fuzzing: byte mutations give a clean result or a TensorBridgeError -----------------------


@pytest.fixture(scope="module")
def valid_h5(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("fuzz") / "v.h5"
    write(
        p,
        {"a": sample("float32", (2, 3)), "b": sample("bfloat16", (4,)), "c": np.zeros(2, bool)},
        {"m": "x"},
    )
    return p.read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 8192)),
)
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


@pytest.mark.parametrize(
    "meta, text",
    [
        ({"": "e"}, "metadata key '' is refused: an HDF5 attribute name cannot be empty"),
        (
            {"k": "a\x00b"},
            "metadata key 'k' is refused: an HDF5 string attribute cannot hold a NUL",
        ),
        (
            {"k\x00z": "v"},
            "metadata key 'k\\x00z' is refused: an HDF5 attribute name cannot hold a NUL",
        ),
    ],
)
def test_unstorable_metadata_is_refused_before_writing(tmp_path, meta, text):
    p = tmp_path / "m.h5"
    write(p, {"old": np.arange(3)})
    before = p.read_bytes()
    with pytest.raises(ConversionError) as info:
        write(p, {"a": np.zeros(1)}, meta)
    assert text in str(info.value)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.h5"]


def test_a_file_truncated_after_open_is_an_error_not_zeros(tmp_path):
    p = tmp_path / "t.h5"
    a = np.arange(100_000, dtype=np.float64)
    write(p, {"a": a})
    with FORMAT.open(str(p)) as r:
        os.truncate(p, os.path.getsize(p) // 2)
        with pytest.raises(FileFormatError, match="shrank from"):
            r.read("a")
        with pytest.raises(FileFormatError, match="shrank from"):
            r.read_slice("a", slice(0, 10))


def test_string_attributes_of_every_kind_become_metadata(tmp_path):
    p = tmp_path / "m.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.zeros(1))
        f.attrs["vlen"] = "ünï"
        f.attrs["vlen_bytes"] = np.array(b"raw", dtype=h5py.string_dtype("ascii"))
        f.attrs["fixed"] = np.bytes_(b"abc")
        f.attrs["fixed_utf8"] = np.array("é".encode(), dtype=h5py.string_dtype("utf-8", 2))
        f.attrs["one"] = ["only"]
        f.attrs["many"] = ["a", "b"]  # a list of strings is not one string: left out
        f.attrs["n"] = 3
        f.attrs["bad_utf8"] = np.bytes_(b"\xff\xfe")
    _, metadata = read_all(p)
    assert metadata == {
        "vlen": "ünï",
        "vlen_bytes": "raw",
        "fixed": "abc",
        "fixed_utf8": "é",
        "one": "only",
    }


def test_rank_over_32_is_refused_before_writing(tmp_path):
    a = np.zeros((1,) * 40, np.float32)
    with pytest.raises(ConversionError, match="40 dimensions, but HDF5 datasets have at most 32"):
        write(tmp_path / "r.h5", {"a": a})
    assert os.listdir(tmp_path) == []
    write(tmp_path / "r.h5", {"a": np.zeros((1,) * 32, np.float32)})
    assert read_all(tmp_path / "r.h5")[0]["a"].shape == (1,) * 32


# --- chunks decoded here, with a bound ---------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        {"compression": "gzip"},
        {"compression": "gzip", "shuffle": True},
        {"compression": "gzip", "shuffle": True, "fletcher32": True},
        {"fletcher32": True},
        {"shuffle": True},
        {"compression": "lzf"},  # left to libhdf5
    ],
)
@pytest.mark.parametrize("name", ["float32", ">float64", "int16", "bool", "complex64", "uint8"])
def test_filtered_chunks_read_as_h5py_reads_them(tmp_path, opts, name):
    a = sample(name.lstrip(">"), (37, 5), seed=3)
    if name.startswith(">"):
        a = a.astype(a.dtype.newbyteorder(">"))
    p = tmp_path / "f.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=a, chunks=(8, 3), **opts)  # edge chunks on both axes
        f.create_dataset("w", data=a[:10], chunks=(10, 5), **opts)
    with h5py.File(p, "r") as f:
        want = {k: f[k][()] for k in f}
    got, _ = read_all(p)
    for k, v in want.items():
        assert same(got[k], v.astype(v.dtype.newbyteorder("="))), (k, opts)


@pytest.mark.parametrize(
    "inflated, text",
    [
        (4 << 20, "inflates to more than its 4096 bytes"),  # a 4 KB stream: stopped at 4 KiB
        (64 << 20, "stores 65238 bytes for 4096 bytes of data"),  # refused before inflating
    ],
)
def test_a_chunk_that_inflates_past_its_size_is_stopped(tmp_path, inflated, text):
    p = tmp_path / "bomb.h5"
    with h5py.File(p, "w") as f:
        d = f.create_dataset("x", shape=(1024,), dtype="f4", chunks=(1024,), compression="gzip")
        d.id.write_direct_chunk((0,), zlib.compress(bytes(inflated), 9))
    with FORMAT.open(str(p)) as r, pytest.raises(UnsafeContentError, match=text):
        r.read("x")


def test_a_corrupt_fletcher32_chunk_is_an_error(tmp_path):
    p = tmp_path / "f.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.arange(100, dtype=np.int32), chunks=(100,), fletcher32=True)
        mask, raw = f["x"].id.read_direct_chunk((0,))
        f["x"].id.write_direct_chunk((0,), raw[:8] + bytes([raw[8] ^ 1]) + raw[9:])
    with FORMAT.open(str(p)) as r, pytest.raises(FileFormatError, match="Fletcher-32"):
        r.read("x")


@pytest.mark.parametrize(
    "index",
    [
        np.s_[3],
        np.s_[-1],
        np.s_[2:9],
        np.s_[:, 4],
        np.s_[1:30:7, ::3],
        np.s_[5, 2:3],
        np.s_[..., -2],
        np.s_[36],
        np.s_[0:0],
    ],
)
def test_parts_of_decoded_chunks_match_h5py_and_touch_only_their_chunks(
    tmp_path, monkeypatch, index
):
    import tensorbridge.formats.h5 as tbh5

    a = sample("float64", (37, 11), seed=5)
    p = tmp_path / "p.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=a, chunks=(8, 4), compression="gzip", shuffle=True)
    decoded = []
    real = tbh5._Chunks._decode
    monkeypatch.setattr(
        tbh5._Chunks, "_decode", lambda self, *args: decoded.append(1) or real(self, *args)
    )
    mask = np.zeros(a.shape, bool)
    mask[index] = True
    rows, cols = np.nonzero(mask)
    box_chunks = (
        0
        if not rows.size
        else ((rows.max() // 8 - rows.min() // 8 + 1) * (cols.max() // 4 - cols.min() // 4 + 1))
    )
    with FORMAT.open(str(p)) as r:
        assert same(np.asarray(r.array("x")[index]), a[index])
        assert len(decoded) == box_chunks  # the chunks of the bounding box, no others
        if isinstance(index, int):
            decoded.clear()
            assert same(r.read_slice("x", index), a[index])
            assert len(decoded) == 3  # one row of chunks
