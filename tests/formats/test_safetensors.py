"""safetensors: interoperability with the real package both ways, exact round trips,
and one hostile file per validation rule."""

from __future__ import annotations

import json
import os
import struct
import tempfile

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge.dtypes import DTYPES
from tensorbridge.errors import (
    ConversionError,
    FileFormatError,
    TensorBridgeError,
    UnsafeContentError,
)
from tensorbridge.formats.base import TensorInfo
from tensorbridge.formats.safetensors import FORMAT, MAX_HEADER_SIZE, WHOLE_FILE_BYTES

from .samples import read_all_with, same, sample, write_with

ST_DTYPES = [d.name for d in DTYPES.values() if d.safetensors]
NO_CODE = [d.name for d in DTYPES.values() if not d.safetensors]
NUMPY_BINDING = {
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
}


def write(path, arrays: dict[str, np.ndarray], metadata=None) -> None:
    write_with(FORMAT, path, arrays, metadata)


def read_all(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return read_all_with(FORMAT, path)


def torch_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# --- interoperability ---------------------------------------------------------------


def test_reads_numpy_binding_files_exactly(tmp_path):
    arrays = {f"t.{name}": sample(name, seed=i) for i, name in enumerate(sorted(NUMPY_BINDING))}
    p = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(arrays, str(p), metadata={"format": "np"})
    got, metadata = read_all(p)
    assert metadata == {"format": "np"}
    assert set(got) == set(arrays)
    for k in arrays:
        assert same(got[k], arrays[k]), k


def _torch_dtype(name: str):
    return getattr(torch, {"bool": "bool"}.get(name, name), None)


TORCH_ST = [n for n in ST_DTYPES if _torch_dtype(n) is not None]


def test_torch_covers_the_float8_and_bfloat16_codes():
    assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"} <= set(TORCH_ST)


@pytest.mark.parametrize("name", TORCH_ST)
def test_reads_torch_binding_files_exactly(tmp_path, name):
    a = sample(name, (4, 3))
    t = torch.from_numpy(a.view(f"u{a.itemsize}") if a.dtype.isbuiltin == 2 else a)
    if a.dtype.isbuiltin == 2:
        t = t.view(_torch_dtype(name))
    p = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"w": t, "other": torch.arange(3)}, str(p))
    got, _ = read_all(p)
    assert got["w"].dtype == DTYPES[name].numpy
    assert got["w"].tobytes() == torch_bytes(t) == a.tobytes()
    assert got["other"].tobytes() == torch.arange(3).numpy().tobytes()


@pytest.mark.parametrize("name", TORCH_ST)
def test_torch_binding_reads_what_we_write(tmp_path, name):
    a = sample(name, (2, 7))
    p = tmp_path / "ours.safetensors"
    write(p, {"x": a, "y": np.arange(5, dtype=np.int64)}, {"k": "v"})
    loaded = safetensors.torch.load_file(str(p))
    assert loaded["x"].dtype == _torch_dtype(name)
    assert tuple(loaded["x"].shape) == a.shape
    assert torch_bytes(loaded["x"]) == a.tobytes()
    with safetensors.safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


@pytest.mark.parametrize("name", sorted(NUMPY_BINDING))
def test_numpy_binding_reads_what_we_write(tmp_path, name):
    a = sample(name, (3, 2))
    p = tmp_path / "ours.safetensors"
    write(p, {"x": a})
    loaded = safetensors.numpy.load_file(str(p))
    assert same(loaded["x"], a)


# --- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("name", ST_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (7,), (3, 4, 5)])
def test_round_trip_every_dtype_bit_exact(tmp_path, name, shape):
    a = sample(name, shape)
    p = tmp_path / "r.safetensors"
    write(p, {"a": a})
    got, _ = read_all(p)
    assert same(got["a"], a)
    assert got["a"].flags.writeable and got["a"].flags.c_contiguous


def test_special_float_bits_survive(tmp_path):
    bits = np.array([0x7FC01234, 0x80000000, 0x00000001, 0xFFA00001, 0x7F800000], dtype="<u4")
    a = bits.view(np.float32)
    p = tmp_path / "s.safetensors"
    write(p, {"a": a})
    assert read_all(p)[0]["a"].view("<u4").tolist() == bits.tolist()


def test_non_contiguous_and_big_endian_inputs_are_written_in_c_order_little_endian(tmp_path):
    base = sample("float32", (6, 8))
    arrays = {
        "transposed": base.T,
        "strided": base[::2, ::3],
        "big": base.astype(">f4"),
        "big_t": base.astype(">f4").T,
        "flipped": base[::-1],
    }
    p = tmp_path / "nc.safetensors"
    write(p, arrays)
    got, _ = read_all(p)
    for k, v in arrays.items():
        assert same(got[k], np.ascontiguousarray(v).astype("<f4")), k


def test_chunked_writes_of_big_rows(tmp_path, monkeypatch):
    import tensorbridge.formats.safetensors as mod

    monkeypatch.setattr(mod, "CHUNK_BYTES", 64)
    a = sample("float64", (5, 40))[:, ::-1]  # rows of 320 bytes > chunk, non-contiguous
    p = tmp_path / "c.safetensors"
    write(p, {"a": a, "b": sample("int16", (100,))[::-1]})
    got, _ = read_all(p)
    assert same(got["a"], np.ascontiguousarray(a))


def test_header_is_padded_to_8_bytes_with_spaces(tmp_path):
    p = tmp_path / "h.safetensors"
    write(p, {"abc": np.zeros(1, np.uint8)})
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    assert raw[8 : 8 + n].rstrip(b" ").endswith(b"}")
    assert raw[8 : 8 + n].decode().strip() == raw[8 : 8 + n].decode().rstrip(" ")


def test_keys_in_file_order_and_infos(tmp_path):
    arrays = {"z": np.zeros(2, np.float32), "a": np.ones((1, 3), ml_dtypes.bfloat16)}
    p = tmp_path / "o.safetensors"
    write(p, arrays)
    with FORMAT.open(str(p)) as r:
        assert r.keys() == ["z", "a"]
        assert r.info("a") == TensorInfo("a", "bfloat16", (1, 3))
        with pytest.raises(FileFormatError, match="no tensor named 'missing'"):
            r.read("missing")


def test_read_slice_of_first_axis(tmp_path):
    a = sample("bfloat16", (6, 4))
    p = tmp_path / "sl.safetensors"
    write(p, {"a": a})
    with FORMAT.open(str(p)) as r:
        assert same(r.read_slice("a", slice(1, 4)), a[1:4])
        assert same(r.read_slice("a", -1), a[-1])
        assert same(r.read_slice("a", slice(5, 2)), a[5:2])
        with pytest.raises(ConversionError, match="step of 1"):
            r.read_slice("a", slice(0, 4, 2))
        with pytest.raises(ConversionError, match="out of range"):
            r.read_slice("a", 6)


def test_closed_reader_refuses_reads(tmp_path):
    p = tmp_path / "c.safetensors"
    write(p, {"a": np.zeros(2, np.int8)})
    r = FORMAT.open(str(p))
    r.close()
    r.close()
    with pytest.raises(FileFormatError, match="closed"):
        r.read("a")


# --- hostile files: one per rule -------------------------------------------------


def raw_file(tmp_path, header: object, data: bytes = b"", n: int | None = None) -> str:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = tmp_path / "hostile.safetensors"
    p.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)
    return str(p)


def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = [
    # (id, header, data, header-length override, error type, message substring)
    (
        "header_too_big",
        {},
        b"",
        MAX_HEADER_SIZE + 1,
        FileFormatError,
        "over the 100000000-byte limit",
    ),
    ("header_past_eof", {}, b"", 10_000, FileFormatError, "larger than the rest of the file"),
    ("bad_utf8", b'{"a\xff": 1}', b"", None, FileFormatError, "not valid UTF-8"),
    ("bad_json", b'{"a": ', b"", None, FileFormatError, "not valid JSON"),
    ("deep_json", b"[" * 100_000, b"", None, FileFormatError, "JSON arrays and objects"),
    ("not_object", [1, 2], b"", None, FileFormatError, "JSON list, not an object"),
    (
        "unknown_dtype",
        {"a": entry(dtype="F128")},
        b"\0" * 4,
        None,
        FileFormatError,
        "unknown dtype 'F128'",
    ),
    (
        "lowercase_dtype",
        {"a": entry(dtype="f32")},
        b"\0" * 4,
        None,
        FileFormatError,
        "unknown dtype 'f32'",
    ),
    (
        "negative_shape",
        {"a": entry(shape=(-1,))},
        b"\0" * 4,
        None,
        FileFormatError,
        "non-negative integers",
    ),
    (
        "float_shape",
        {"a": entry(shape=(1.0,))},
        b"\0" * 4,
        None,
        FileFormatError,
        "non-negative integers",
    ),
    (
        "bool_shape",
        {"a": entry(shape=(True,))},
        b"\0" * 4,
        None,
        FileFormatError,
        "non-negative integers",
    ),
    (
        "too_many_dims",
        {"a": entry(shape=(1,) * 65)},
        b"\0" * 4,
        None,
        FileFormatError,
        "at most 64",
    ),
    (
        "overflow_product",
        {"a": entry(shape=(2**32, 2**32, 0), offsets=(0, 0))},
        b"",
        None,
        FileFormatError,
        "overflows",
    ),
    (
        "size_mismatch",
        {"a": entry(shape=(2,), offsets=(0, 4))},
        b"\0" * 4,
        None,
        FileFormatError,
        "span 4 bytes, but shape [2] of float32 needs 8",
    ),
    (
        "reversed_offsets",
        {"a": entry(offsets=(4, 0))},
        b"\0" * 4,
        None,
        FileFormatError,
        "0 <= begin <= end",
    ),
    (
        "overlap",
        {"a": entry(offsets=(0, 4)), "b": entry(offsets=(2, 6))},
        b"\0" * 6,
        None,
        FileFormatError,
        "overlap",
    ),
    (
        "hole",
        {"a": entry(offsets=(0, 4)), "b": entry(offsets=(6, 10))},
        b"\0" * 10,
        None,
        FileFormatError,
        "hole of 2",
    ),
    ("hole_at_start", {"a": entry(offsets=(4, 8))}, b"\0" * 8, None, FileFormatError, "hole of 4"),
    ("trailing_bytes", {"a": entry()}, b"\0" * 5, None, FileFormatError, "1 trailing bytes"),
    (
        "truncated_data",
        {"a": entry(shape=(2,), offsets=(0, 8))},
        b"\0" * 5,
        None,
        FileFormatError,
        "truncated",
    ),
    (
        "duplicate_keys",
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
        b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
        b"\0\0",
        None,
        UnsafeContentError,
        "'a' more than once",
    ),
    (
        "duplicate_metadata_keys",
        b'{"__metadata__": {"k": "1", "k": "2"}}',
        b"",
        None,
        UnsafeContentError,
        "'k' more than once",
    ),
    ("metadata_not_str", {"__metadata__": {"k": 1}}, b"", None, UnsafeContentError, "{'k': 1}"),
    ("metadata_not_dict", {"__metadata__": ["k"]}, b"", None, UnsafeContentError, "['k']"),
    ("nul_name", {"a\x00b": entry()}, b"\0" * 4, None, UnsafeContentError, "NUL"),
    ("dotdot_name", {"../../etc/x": entry()}, b"\0" * 4, None, UnsafeContentError, "'..'"),
    ("absolute_name", {"/etc/passwd": entry()}, b"\0" * 4, None, UnsafeContentError, "absolute"),
    ("empty_name", {"": entry()}, b"\0" * 4, None, UnsafeContentError, "empty"),
    (
        "extra_entry_key",
        {"a": {**entry(), "offsets": [0, 4]}},
        b"\0" * 4,
        None,
        FileFormatError,
        "exactly the keys",
    ),
    (
        "missing_entry_key",
        {"a": {"dtype": "F32", "shape": [1]}},
        b"\0" * 4,
        None,
        FileFormatError,
        "exactly the keys",
    ),
    ("entry_not_object", {"a": [1]}, b"", None, FileFormatError, "exactly the keys"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_header_is_refused(tmp_path, case):
    _, header, data, n, error, text = case
    p = raw_file(tmp_path, header, data, n)
    with pytest.raises(error, match=None) as info:
        FORMAT.open(p)
    assert text in str(info.value)
    assert p in str(info.value)  # the message names the file
    assert type(info.value) is error


def test_reference_implementation_also_refuses_tiling_errors(tmp_path):
    """Our rules are at least as strict as the Rust core's."""
    for header, data in [
        ({"a": entry(offsets=(0, 4)), "b": entry(offsets=(6, 10))}, b"\0" * 10),
        ({"a": entry()}, b"\0" * 5),
    ]:
        p = raw_file(tmp_path, header, data)
        with pytest.raises(safetensors.SafetensorError):
            safetensors.numpy.load_file(p)
        with pytest.raises(FileFormatError):
            FORMAT.open(p)


def test_reference_accepts_duplicates_we_refuse(tmp_path):
    p = raw_file(
        tmp_path,
        b'{"a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}, '
        b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        b"\xff",
    )
    assert safetensors.numpy.load_file(p)["a"].dtype == np.uint8  # last one silently wins
    with pytest.raises(UnsafeContentError, match="more than once"):
        FORMAT.open(p)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_short_files_are_refused(tmp_path, content):
    p = tmp_path / "short.safetensors"
    p.write_bytes(content)
    with pytest.raises(FileFormatError, match="shorter than the 8-byte header length"):
        FORMAT.open(str(p))


def test_invalid_bool_bytes_are_refused(tmp_path):
    p = raw_file(tmp_path, {"b": entry(dtype="BOOL", shape=(2,), offsets=(0, 2))}, b"\x01\x02")
    with FORMAT.open(p) as r:
        with pytest.raises(FileFormatError, match="other than 0 and 1"):
            r.read("b")


def test_directory_and_missing_paths_are_refused(tmp_path):
    with pytest.raises(FileFormatError, match="not a regular file"):
        FORMAT.open(str(tmp_path))
    with pytest.raises(FileFormatError, match="cannot open the file"):
        FORMAT.open(str(tmp_path / "nope.safetensors"))


def test_file_truncated_after_open_gives_a_clean_error(tmp_path):
    p = tmp_path / "t.safetensors"
    write(p, {"a": np.zeros(WHOLE_FILE_BYTES // 4, np.float32)})  # (not read whole at open)
    with FORMAT.open(str(p)) as r:
        os.truncate(p, 100)
        with pytest.raises(FileFormatError, match="truncated or changed"):
            r.read("a")


def test_a_small_file_rewritten_after_open_is_converted_as_one_version(tmp_path, monkeypatch):
    """Every tensor a reader hands on (read, or copied kernel-side from its span) comes
    from the file as it is, so a convert never mixes the version at open with a later one."""
    from tensorbridge.cli.convert_cmd import convert_file
    from tensorbridge.formats import safetensors as st

    src, dst = str(tmp_path / "src.safetensors"), str(tmp_path / "dst.safetensors")

    def save(k: int) -> None:
        tree = {"f": np.full(8, float(k), np.float32), "q": np.full(8, k == 1)}
        tb.save(tree, src)

    save(2)
    with open(src, "rb") as f:
        v2 = f.read()
    save(1)
    real = st.SafetensorsReader.__init__
    done: list[bool] = []

    def init(self, path):  # type: ignore[no-untyped-def]
        real(self, path)
        if path == src and not done:
            done.append(True)
            with open(src, "r+b") as f:  # rewritten in place, the same layout
                f.write(v2)

    monkeypatch.setattr(st.SafetensorsReader, "__init__", init)
    convert_file(src, dst)
    got = tb.load(dst)
    assert done and got["f"].tolist() == [2.0] * 8 and got["q"].tolist() == [False] * 8


def test_empty_file_with_only_metadata(tmp_path):
    p = tmp_path / "e.safetensors"
    FORMAT.write(str(p), [], lambda name: None, {"only": "meta"})
    assert read_all(p) == ({}, {"only": "meta"})
    assert safetensors.numpy.load_file(str(p)) == {}


# --- write refusals and atomicity --------------------------------------------------


@pytest.mark.parametrize("name", NO_CODE)
def test_dtypes_without_a_code_are_refused_with_a_fix(tmp_path, name):
    p = tmp_path / "x.safetensors"
    with pytest.raises(ConversionError, match="safetensors cannot store") as info:
        write(p, {"x": sample(name, (2,))})
    assert "--dtype" in str(info.value) and ".npz" in str(info.value)
    assert not p.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {1: "v"}, {"k": ["v"]}])
def test_non_string_metadata_is_refused(tmp_path, metadata):
    with pytest.raises(ConversionError, match="strings to strings"):
        write(tmp_path / "m.safetensors", {"a": np.zeros(1)}, metadata)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["", "a\x00b", "../x", "/abs", "__metadata__"])
def test_unsafe_names_are_refused_on_write(tmp_path, bad):
    with pytest.raises(UnsafeContentError, match="refused|reserved"):
        write(tmp_path / "n.safetensors", {bad: np.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_duplicate_infos_are_refused_on_write(tmp_path):
    infos = [TensorInfo("a", "float32", (1,))] * 2
    with pytest.raises(UnsafeContentError, match="more than once"):
        FORMAT.write(str(tmp_path / "d.safetensors"), infos, lambda n: np.zeros(1, np.float32))


@pytest.mark.parametrize(
    "wrong", [np.zeros((2,), np.float64), np.zeros((3,), np.float32), [0.0, 0.0]]
)
def test_fetch_returning_the_wrong_array_is_refused(tmp_path, wrong):
    p = tmp_path / "w.safetensors"
    with pytest.raises(ConversionError, match="fetch"):
        FORMAT.write(str(p), [TensorInfo("a", "float32", (2,))], lambda n: wrong)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_the_old_file_byte_identical(tmp_path):
    p = tmp_path / "keep.safetensors"
    write(p, {"old": np.arange(4, dtype=np.int32)})
    before = p.read_bytes()
    infos = [TensorInfo(f"t{i}", "float32", (1000,)) for i in range(3)]

    def fetch(name):
        if name == "t2":
            raise RuntimeError("source went away")
        return np.ones(1000, np.float32)

    with pytest.raises(RuntimeError, match="source went away"):
        FORMAT.write(str(p), infos, fetch)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_fetch_is_called_once_per_tensor_in_order(tmp_path):
    calls = []
    arrays = {n: sample("int32", (4,), seed=i) for i, n in enumerate("cab")}

    def fetch(name):
        calls.append(name)
        return arrays[name]

    infos = [TensorInfo(n, "int32", (4,)) for n in "cab"]
    FORMAT.write(str(tmp_path / "f.safetensors"), infos, fetch)
    assert calls == ["c", "a", "b"]


# --- fuzzing: any byte mutation gives a clean result or a TensorBridgeError ------------


def _valid_file_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "v.safetensors")
        write(
            p,
            {
                "a": sample("float32", (2, 3)),
                "b": sample("bfloat16", (4,)),
                "c": np.array([True, False]),
            },
            {"m": "x"},
        )
        with open(p, "rb") as f:
            return f.read()


VALID = _valid_file_bytes()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.just(len(VALID)), st.integers(0, len(VALID))),
)
def test_fuzzed_files_never_crash_the_reader(tmp_path, edits, cut):
    data = bytearray(VALID)
    for pos, value in edits:
        data[pos] = value
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(data[:cut]))
    try:
        with FORMAT.open(str(p)) as r:
            for name in r.keys():
                arr = r.read(name)
                assert arr.nbytes == r.info(name).nbytes
    except TensorBridgeError:
        pass
