""".npy: files from np.save read bit-exactly, what we write np.load reads, every
dtype round-trips as bytes, and one hostile file per validation rule."""

from __future__ import annotations

import dataclasses
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from tensorbridge.dtypes import DTYPES, canonical_name
from tensorbridge.errors import ConversionError, FileFormatError, UnsafeContentError
from tensorbridge.formats.base import TensorInfo
from tensorbridge.formats.npy import (
    FORMAT,
    MARKED_DTYPES,
    MAX_HEADER_SIZE,
    decode_dtype,
    encode_dtype,
)

from .samples import same, sample

NUMPY_KNOWN = [n for n in DTYPES if n not in MARKED_DTYPES]


def read(path) -> np.ndarray:
    with FORMAT.open(str(path)) as r:
        assert r.keys() == ["array"]
        return r.read("array")


def write(path, arr: np.ndarray) -> None:
    FORMAT.write(
        str(path), [TensorInfo("array", canonical_name(arr.dtype), arr.shape)], lambda name: arr
    )


def raw_npy(header: str | bytes, data: bytes = b"", version=(1, 0), hlen=None) -> bytes:
    body = header.encode("latin1") if isinstance(header, str) else header
    code = "<H" if version == (1, 0) else "<I"
    n = len(body) if hlen is None else hlen
    return b"\x93NUMPY" + bytes(version) + struct.pack(code, n) + body + data


# --- reading what NumPy writes -------------------------------------------------------


@pytest.mark.parametrize("name", NUMPY_KNOWN)
@pytest.mark.parametrize("order", ["<", ">"])
def test_reads_np_save_bit_exact_both_byte_orders(tmp_path, name, order):
    a = sample(name)
    stored = a.astype(a.dtype.newbyteorder(order)) if a.dtype.itemsize > 1 else a
    p = tmp_path / "a.npy"
    np.save(p, stored)
    out = read(p)
    assert same(out, a)  # native dtype, same values, NaN payloads kept
    assert out.dtype.isnative and out.flags.writeable


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3, 4)])
def test_reads_0d_empty_and_nd(tmp_path, shape):
    a = sample("float64", shape)
    np.save(tmp_path / "a.npy", a)
    assert same(read(tmp_path / "a.npy"), a)


@pytest.mark.parametrize("name", ["float32", "complex128", "int16", "bool"])
def test_reads_fortran_order(tmp_path, name):
    a = np.asfortranarray(sample(name, (3, 4, 5)))
    np.save(tmp_path / "f.npy", a)
    with open(tmp_path / "f.npy", "rb") as f:
        assert b"'fortran_order': True" in f.read(128)
    assert same(read(tmp_path / "f.npy"), np.ascontiguousarray(a))


def test_reads_big_endian_fortran_complex(tmp_path):
    a = sample("complex128", (2, 3))
    np.save(tmp_path / "f.npy", np.asfortranarray(a.astype(">c16")))
    assert same(read(tmp_path / "f.npy"), a)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_reads_every_format_version(tmp_path, version):
    a = sample("float32")
    with open(tmp_path / "v.npy", "wb") as f:
        np.lib.format.write_array(f, a, version=version)
    assert same(read(tmp_path / "v.npy"), a)


# --- what we write, NumPy reads ----------------------------------------------------------


@pytest.mark.parametrize("name", list(DTYPES))
def test_np_load_reads_what_we_write(tmp_path, name):
    a = sample(name, (4, 3))
    write(tmp_path / "w.npy", a)
    got = np.load(tmp_path / "w.npy", allow_pickle=False)
    if name in MARKED_DTYPES:
        assert got.dtype.names == (name,)
        assert same(got[name].view(DTYPES[name].numpy), a)
    else:
        assert same(got, a)


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (4, 3)])
def test_round_trip_every_dtype_bit_exact(tmp_path, name, shape):
    a = sample(name, shape, seed=1)
    write(tmp_path / "r.npy", a)
    assert same(read(tmp_path / "r.npy"), a)


def test_writes_non_contiguous_and_big_endian_as_c_order_little_endian(tmp_path):
    a = sample("float32", (6, 8))
    view = a.astype(">f4")[::2, ::-3]
    write(tmp_path / "n.npy", view)
    expected = np.ascontiguousarray(a[::2, ::-3])
    assert same(read(tmp_path / "n.npy"), expected)
    assert same(np.load(tmp_path / "n.npy"), expected)


def test_header_is_aligned_to_64_bytes(tmp_path):
    write(tmp_path / "h.npy", np.zeros((2, 3), np.float32))
    data = (tmp_path / "h.npy").read_bytes()
    (hlen,) = struct.unpack("<H", data[8:10])
    assert (10 + hlen) % 64 == 0 and data[10 + hlen - 1 : 10 + hlen] == b"\n"


def test_marker_layout_helpers():
    assert encode_dtype(ml_dtypes.bfloat16) == np.dtype([("bfloat16", "<u2")])
    assert encode_dtype(ml_dtypes.float8_e5m2) == np.dtype([("float8_e5m2", "u1")])
    assert decode_dtype(np.dtype([("bfloat16", "<u2")])) == "bfloat16"
    assert decode_dtype(np.dtype([("bfloat16", "<u4")])) is None  # wrong width
    assert decode_dtype(np.dtype([("weights", "<u2")])) is None  # not a dtype name
    assert decode_dtype(np.dtype([("bfloat16", "<u2"), ("x", "u1")])) is None
    assert decode_dtype(np.dtype("<f4")) is None


def test_reads_big_endian_marker_layout(tmp_path):
    a = sample("bfloat16", (5,))
    p = tmp_path / "b.npy"
    np.save(p, a.view("<u2").astype(">u2").view([("bfloat16", ">u2")]))
    assert same(read(p), a)


def test_writer_refuses_several_tensors_and_writes_nothing(tmp_path):
    p = tmp_path / "two.npy"
    infos = [TensorInfo("a", "float32", (1,)), TensorInfo("b", "float32", (1,))]
    with pytest.raises(ConversionError, match=r"exactly one array.*Fix: save to \.npz"):
        FORMAT.write(str(p), infos, lambda n: np.zeros(1, np.float32))
    assert os.listdir(tmp_path) == []


def test_writer_refuses_metadata_and_unknown_options(tmp_path):
    infos = [TensorInfo("array", "float32", (1,))]
    with pytest.raises(ConversionError, match="metadata"):
        FORMAT.write(str(tmp_path / "m.npy"), infos, lambda n: np.zeros(1, np.float32), {"k": "v"})
    with pytest.raises(ConversionError, match=r"unknown option\(s\) \['compress'\]"):
        FORMAT.write(
            str(tmp_path / "m.npy"), infos, lambda n: np.zeros(1, np.float32), compress=True
        )
    assert os.listdir(tmp_path) == []


def test_fetch_failure_keeps_existing_file_byte_identical(tmp_path):
    p = tmp_path / "keep.npy"
    np.save(p, np.arange(5))
    before = p.read_bytes()

    def fetch(name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        FORMAT.write(str(p), [TensorInfo("array", "int64", (5,))], fetch)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.npy"]


def test_unknown_name_and_closed_reader(tmp_path):
    write(tmp_path / "a.npy", np.zeros(2))
    r = FORMAT.open(str(tmp_path / "a.npy"))
    with pytest.raises(FileFormatError, match="no tensor named 'x'"):
        r.read("x")
    r.close()
    r.close()
    with pytest.raises(FileFormatError, match="closed"):
        r.read("array")


# --- hostile files: one per rule --------------------------------------------------------

GOOD = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
F4x2 = b"\x00" * 8

HOSTILE = {
    "empty file": (b"", FileFormatError, "ended inside the magic"),
    "bad magic": (b"\x93NUMPX\x01\x00" + b"\x00" * 60, FileFormatError, "magic string"),
    "bad version": (raw_npy(GOOD, F4x2, version=(4, 0)), FileFormatError, "version 4.0"),
    "header too large": (
        raw_npy(GOOD, F4x2, version=(2, 0), hlen=MAX_HEADER_SIZE + 1),
        FileFormatError,
        "over the 10000-byte limit",
    ),
    "header cut short": (
        raw_npy(GOOD, version=(1, 0), hlen=len(GOOD) + 50)[:80],
        FileFormatError,
        "ended inside the header",
    ),
    "header not a literal": (
        raw_npy("{'descr': __import__('os')}"),
        FileFormatError,
        "not a Python literal",
    ),
    "header not a dict": (raw_npy("[1, 2, 3]"), FileFormatError, "not a dict"),
    "extra key": (
        raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", F4x2),
        FileFormatError,
        "exactly 'descr'",
    ),
    "missing key": (
        raw_npy("{'descr': '<f4', 'shape': (2,)}", F4x2),
        FileFormatError,
        "exactly 'descr'",
    ),
    "fortran_order not bool": (
        raw_npy("{'descr': '<f4', 'fortran_order': 1, 'shape': (2,)}", F4x2),
        FileFormatError,
        "fortran_order 1",
    ),
    "negative shape": (
        raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}"),
        FileFormatError,
        "non-negative",
    ),
    "shape as list": (
        raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': [2]}", F4x2),
        FileFormatError,
        "not a tuple",
    ),
    "shape overflows int64": (
        raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776)}"
        ),
        FileFormatError,
        "overflows int64",
    ),
    "declared size > data": (raw_npy(GOOD, b"\x00" * 7), FileFormatError, "truncated"),
    "trailing garbage": (raw_npy(GOOD, F4x2 + b"junk"), FileFormatError, "4 trailing bytes"),
    "object dtype": (
        raw_npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,)}", b"\x00" * 8),
        UnsafeContentError,
        "object array",
    ),
    "string dtype": (
        raw_npy("{'descr': '<U2', 'fortran_order': False, 'shape': (1,)}", b"\x00" * 8),
        FileFormatError,
        "not a numeric tensor dtype",
    ),
    "bytes dtype": (
        raw_npy("{'descr': '|S4', 'fortran_order': False, 'shape': (1,)}", b"\x00" * 4),
        FileFormatError,
        "not a numeric tensor dtype",
    ),
    "datetime dtype": (
        raw_npy("{'descr': '<M8[ns]', 'fortran_order': False, 'shape': (1,)}", b"\x00" * 8),
        FileFormatError,
        "not a numeric tensor dtype",
    ),
    "structured dtype": (
        raw_npy(
            "{'descr': [('a', '<f4'), ('b', '<i4')], 'fortran_order': False, 'shape': (1,)}",
            b"\x00" * 8,
        ),
        UnsafeContentError,
        "structured dtype",
    ),
    "structured with object field": (
        raw_npy(
            "{'descr': [('bfloat16', '|O')], 'fortran_order': False, 'shape': (1,)}", b"\x00" * 8
        ),
        UnsafeContentError,
        "structured",
    ),
    "subarray dtype": (
        raw_npy("{'descr': '(2,)<f4', 'fortran_order': False, 'shape': (1,)}", F4x2),
        FileFormatError,
        "not a numeric tensor dtype",
    ),
    "unknown dtype string": (
        raw_npy("{'descr': 'nonsense', 'fortran_order': False, 'shape': (1,)}", F4x2),
        FileFormatError,
        "not a dtype NumPy understands",
    ),
    "descr not a string": (
        raw_npy("{'descr': 5, 'fortran_order': False, 'shape': (1,)}", F4x2),
        FileFormatError,
        "not a dtype string",
    ),
    "v3 header not utf-8": (
        raw_npy(b"{'descr': '\xff'}", version=(3, 0)),
        FileFormatError,
        "not valid UTF-8",
    ),
    "bool bytes other than 0/1": (
        raw_npy("{'descr': '|b1', 'fortran_order': False, 'shape': (2,)}", b"\x01\x02"),
        FileFormatError,
        "bytes other than 0 and 1",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused(tmp_path, case):
    data, error, text = HOSTILE[case]
    p = tmp_path / "bad.npy"
    p.write_bytes(data)
    with pytest.raises(error, match=text) as info:
        read(p)
    assert str(p) in str(info.value)  # the message names the file
    assert "Fix:" in str(info.value)
    assert os.listdir(tmp_path) == ["bad.npy"]  # reading wrote nothing


def test_directory_is_refused(tmp_path):
    with pytest.raises(FileFormatError, match="not a regular file"):
        FORMAT.open(str(tmp_path))


# --- fuzz: byte mutations of a valid file raise only TensorBridgeError ----------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tensorbridge.errors import TensorBridgeError  # noqa: E402


@pytest.fixture(scope="module")
def valid_npy(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("seed") / "s.npy"
    np.save(p, sample("float32", (2, 3)))
    return p.read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_mutated_files_raise_only_tensorbridge_errors(tmp_path_factory, valid_npy, data):
    raw = bytearray(valid_npy)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    p = tmp_path_factory.mktemp("fuzz") / "f.npy"
    p.write_bytes(bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw))
    try:
        read(p)
    except TensorBridgeError:
        pass


# --- raw exceptions that escaped, and np.save's ml_dtypes files ---------------------------


@pytest.mark.parametrize(
    "shape, text",
    [
        ("(0, 18446744073709551616)", "a dimension of 2**63 or more"),
        ("(18446744073709551616, 0)", "a dimension of 2**63 or more"),
        ("(0x" + "f" * 5000 + ",)", "(<int of 20000 bits>,)"),
        ("(" + "9" * 5000 + ",)", "is not a Python literal"),
        ("(2, 0x" + "1" * 3000 + ")", "(2, <int of 11997 bits>)"),
    ],
)
def test_absurd_shapes_are_file_format_errors(tmp_path, shape, text):
    p = tmp_path / "s.npy"
    p.write_bytes(raw_npy(f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n"))
    with pytest.raises(FileFormatError) as info:
        FORMAT.open(str(p))
    assert text in str(info.value)
    assert len(str(info.value)) < 1000


def test_deprecated_bytes_alias_is_refused_without_a_warning(tmp_path):
    p = tmp_path / "a.npy"
    p.write_bytes(raw_npy("{'descr': '|a5', 'fortran_order': False, 'shape': (1,), }\n", b"x" * 5))
    with pytest.raises(FileFormatError, match=r"descr '\|a5' is a bytes string"):
        FORMAT.open(str(p))  # pytest turns warnings into errors: none is raised


def test_np_save_float8_e5m2_is_read_as_float8_e5m2(tmp_path):
    a = sample("float8_e5m2", (4, 3))
    p = tmp_path / "f8.npy"
    np.save(p, a)  # descr '<f1', which np.load itself cannot read
    assert b"'descr': '<f1'" in p.read_bytes()[:128]
    assert same(read(p), a)


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn"])
def test_np_save_raw_void_ml_dtypes_get_an_honest_message(tmp_path, name):
    p = tmp_path / "v.npy"
    np.save(p, sample(name, (3,)))  # descr '<V2' / '<V1': which dtype is lost
    with pytest.raises(FileFormatError) as info:
        FORMAT.open(str(p))
    text = str(info.value)
    assert "-byte values with no dtype: np.save writes ml_dtypes arrays" in text
    assert "void_as=" in text and "corrupt" not in text


@pytest.mark.parametrize("name", sorted(MARKED_DTYPES))
def test_np_save_of_ml_dtypes_is_read_with_void_as(tmp_path, name):
    a = sample(name, (4, 3))
    p = tmp_path / "v.npy"
    np.save(p, a)
    with FORMAT.open(str(p), void_as=name) as r:
        assert r.info("array").dtype == name
        assert same(r.read("array"), a)


@pytest.mark.parametrize("name", sorted(MARKED_DTYPES))
def test_void_option_writes_what_np_save_writes(tmp_path, name):
    a = sample(name, (4, 3))
    ours, theirs = tmp_path / "tb.npy", tmp_path / "np.npy"
    FORMAT.write(str(ours), [TensorInfo("array", name, a.shape)], lambda n: a, void=True)
    np.save(theirs, a)
    assert ours.read_bytes() == theirs.read_bytes()
    with FORMAT.open(str(ours), void_as=name) as r:
        assert same(r.read("array"), a)


def test_a_numpy_void_array_is_never_read_as_bfloat16(tmp_path):
    p = tmp_path / "void.npy"
    np.save(p, np.frombuffer(bytes(range(8)), "V2"))  # genuine records: descr '|V2'
    assert b"'descr': '|V2'" in p.read_bytes()[:64]
    with pytest.raises(FileFormatError, match=r"'\|V2' is raw 2-byte values .* NumPy void"):
        FORMAT.open(str(p))
    # MLX's header layout with '|V2' is not MLX's bfloat16 (MLX writes '<V2')
    p.write_bytes(raw_npy("{'descr': '|V2', 'fortran_order': False, 'shape': (2, )}\n", bytes(4)))
    with pytest.raises(FileFormatError, match="void_as='bfloat16'"):
        FORMAT.open(str(p))
    with FORMAT.open(str(p), void_as="bfloat16") as r:  # unless the caller says so
        assert r.read("array").dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("shape, fortran", [((), "True"), ((3,), "True"), ((2, 3), "False")])
def test_mlx_header_layout_with_v2_is_bfloat16(tmp_path, order, shape, fortran):
    """mx.save's own header text (mlx/io/load.cpp): 'shape': (2, 3, )} with no ', }'."""
    a = sample("bfloat16", shape)
    dims = "".join(f"{d}, " for d in shape)
    header = f"{{'descr': '{order}V2', 'fortran_order': {fortran}, 'shape': ({dims})}}  \n"
    data = a.view(np.uint16).astype(order + "u2").tobytes()
    p = tmp_path / "mx.npy"
    p.write_bytes(raw_npy(header, data))
    assert same(read(p), a)


@pytest.mark.parametrize(
    "void_as, match",
    [
        ("float32", "is not a dtype raw bytes are read as"),
        (2, "is not a dtype raw bytes are read as"),
        ("float8_e4m3fn", "but void_as='float8_e4m3fn' is a 1-byte dtype. Fix: pass void_as= "),
    ],
)
def test_void_as_refusals(tmp_path, void_as, match):
    p = tmp_path / "v.npy"
    np.save(p, sample("bfloat16", (3,)))
    with pytest.raises((ConversionError, FileFormatError), match=match):
        FORMAT.open(str(p), void_as=void_as)


def test_void_write_option_must_be_a_bool(tmp_path):
    a = sample("bfloat16", (3,))
    with pytest.raises(ConversionError, match=r"void='yes' is not True or False"):
        FORMAT.write(
            str(tmp_path / "v.npy"),
            [TensorInfo("array", "bfloat16", (3,))],
            lambda n: a,
            void="yes",
        )
    assert not (tmp_path / "v.npy").exists()


@pytest.mark.parametrize(
    "header, nbytes",
    [
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 4),
        ("{'descr': '>i8', 'fortran_order': True, 'shape': (3,), }", 24),
        ("{'descr': '|b1', 'fortran_order': False, 'shape': (2, 0, 5), }", 0),
    ],
)
def test_fast_header_path_agrees_with_literal_eval(tmp_path, header, nbytes):
    fast = tmp_path / "fast.npy"
    slow = tmp_path / "slow.npy"
    fast.write_bytes(raw_npy(header + "  \n", bytes(nbytes)))
    slow.write_bytes(raw_npy(header.replace(": ", ":  ") + "  \n", bytes(nbytes)))
    with FORMAT.open(str(fast)) as a, FORMAT.open(str(slow)) as b:
        assert dataclasses.replace(a._header, header_size=0) == dataclasses.replace(
            b._header, header_size=0
        )
