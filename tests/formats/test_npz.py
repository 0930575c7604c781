""".npz: np.savez/np.savez_compressed files read bit-exactly, what we write np.load
reads, every dtype round-trips as bytes, and one hostile archive per rule."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.dtypes import DTYPES, canonical_name
from tensorbridge.errors import ConversionError, FileFormatError, UnsafeContentError
from tensorbridge.formats.base import TensorInfo
from tensorbridge.formats.npy import MARKED_DTYPES, build_header
from tensorbridge.formats.npz import BOMB_MIN_SIZE, FORMAT, MAX_DEFLATE_RATIO

from .samples import same, sample


def read_all(path) -> dict[str, np.ndarray]:
    with FORMAT.open(str(path)) as r:
        return {k: r.read(k) for k in r.keys()}


def write(path, arrays: dict[str, np.ndarray], **options) -> None:
    infos = [TensorInfo(k, canonical_name(v.dtype), v.shape) for k, v in arrays.items()]
    FORMAT.write(str(path), infos, arrays.__getitem__, **options)


def npy_bytes(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, a, allow_pickle=True)
    return f.getvalue()


def make_zip(path, members: list[tuple[str, bytes]], method=zipfile.ZIP_STORED) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", method) as zf:
            for name, data in members:
                zf.writestr(name, data)


NUMPY_KNOWN = [n for n in DTYPES if n not in MARKED_DTYPES]


# --- reading what NumPy writes ---------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_reads_np_savez_bit_exact(tmp_path, save):
    arrays = {
        f"{n}_{o}": (
            sample(n).astype(sample(n).dtype.newbyteorder(o))
            if DTYPES[n].itemsize > 1
            else sample(n)
        )
        for n in NUMPY_KNOWN
        for o in "<>"
    }
    arrays["fortran"] = np.asfortranarray(sample("float32", (3, 4, 2)))
    arrays["zero_d"] = sample("float64", ())
    arrays["empty"] = np.zeros((0, 3), np.int32)
    p = tmp_path / "a.npz"
    save(p, **arrays)
    got = read_all(p)
    assert list(got) == list(arrays)
    for k, a in arrays.items():
        expected = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("="))
        assert same(np.ascontiguousarray(got[k]), expected), k


def test_infos_in_member_order(tmp_path):
    p = tmp_path / "i.npz"
    np.savez(p, b=np.zeros((2, 3), np.float16), a=np.arange(4))
    with FORMAT.open(str(p)) as r:
        assert r.keys() == ["b", "a"]
        assert r.info("b") == TensorInfo("b", "float16", (2, 3))
        assert [i.nbytes for i in r.infos()] == [12, 32]


# --- what we write, NumPy reads ----------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_np_load_reads_what_we_write_every_dtype(tmp_path, compress):
    arrays = {n: sample(n, (4, 3)) for n in DTYPES}
    p = tmp_path / "w.npz"
    write(p, arrays, compress=compress)
    with np.load(p, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(arrays)
        for n, a in arrays.items():
            if n in MARKED_DTYPES:
                assert z[n].dtype.names == (n,)
                assert same(z[n][n].view(DTYPES[n].numpy), a)
            else:
                assert same(z[n], a)
    methods = {zi.compress_type for zi in zipfile.ZipFile(p).infolist()}
    assert methods == {zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(), (0,), (5, 2)])
def test_round_trip_every_dtype_bit_exact(tmp_path, compress, shape):
    arrays = {n: sample(n, shape, seed=2) for n in DTYPES}
    write(tmp_path / "r.npz", arrays, compress=compress)
    got = read_all(tmp_path / "r.npz")
    for n, a in arrays.items():
        assert same(got[n], a), n


def test_chunked_streams_cross_chunk_boundaries(tmp_path, monkeypatch):
    import tensorbridge.formats.npz as npz

    monkeypatch.setattr(npz, "CHUNK_BYTES", 7)
    arrays = {"x": sample("float64", (10, 3)), "y": sample("bfloat16", (9,))}
    for compress in (False, True):
        write(tmp_path / "c.npz", arrays, compress=compress)
        got = read_all(tmp_path / "c.npz")
        assert all(same(got[k], a) for k, a in arrays.items())


def test_output_is_reproducible(tmp_path):
    arrays = {"x": sample("float32")}
    write(tmp_path / "1.npz", arrays)
    write(tmp_path / "2.npz", arrays)
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()


def test_open_reads_headers_only(tmp_path):
    """A corrupted data byte (bad CRC) is only noticed when that tensor is read."""
    p = tmp_path / "crc.npz"
    a = np.arange(1000, dtype=np.int64)
    np.savez(p, a=a, b=np.ones(3))
    data = bytearray(p.read_bytes())
    at = data.index(a[500:502].tobytes())
    data[at] ^= 0xFF
    p.write_bytes(bytes(data))
    with FORMAT.open(str(p)) as r:
        assert r.info("a").shape == (1000,)
        assert same(r.read("b"), np.ones(3))
        with pytest.raises(FileFormatError, match="CRC"):
            r.read("a")


# --- writer refusals --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text",
    [("../x", "'..' path component"), ("/abs", "absolute"), ("a\x00b", "NUL"), ("", "empty")],
)
def test_writer_refuses_unsafe_names_and_writes_nothing(tmp_path, name, text):
    with pytest.raises(UnsafeContentError, match=text):
        write(tmp_path / "n.npz", {name: np.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_writer_refuses_bad_options_and_metadata(tmp_path):
    p = str(tmp_path / "o.npz")
    info = [TensorInfo("a", "float32", (1,))]
    fetch = lambda n: np.zeros(1, np.float32)  # noqa: E731
    with pytest.raises(ConversionError, match="compress='yes' is not True or False"):
        FORMAT.write(p, info, fetch, compress="yes")
    with pytest.raises(ConversionError, match=r"unknown option\(s\) \['level'\]"):
        FORMAT.write(p, info, fetch, level=9)
    with pytest.raises(ConversionError, match="metadata"):
        FORMAT.write(p, info, fetch, {"k": "v"})
    assert os.listdir(tmp_path) == []


def test_fetch_failure_midway_keeps_existing_file(tmp_path):
    p = tmp_path / "keep.npz"
    np.savez(p, old=np.arange(3))
    before = p.read_bytes()
    infos = [TensorInfo("a", "float32", (2,)), TensorInfo("b", "float32", (2,))]

    def fetch(name):
        if name == "b":
            raise RuntimeError("disk gone")
        return np.zeros(2, np.float32)

    with pytest.raises(RuntimeError, match="disk gone"):
        FORMAT.write(str(p), infos, fetch)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.npz"]


def test_fetch_returning_wrong_shape_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="announced as float32"):
        FORMAT.write(
            str(tmp_path / "s.npz"),
            [TensorInfo("a", "float32", (2,))],
            lambda n: np.zeros(3, np.float32),
        )
    assert os.listdir(tmp_path) == []


# --- hostile archives: one per rule ----------------------------------------------------------


def _nul_name(path):
    make_zip(path, [("aXb.npy", npy_bytes(np.zeros(2)))])
    data = path.read_bytes().replace(b"aXb.npy", b"a\x00b.npy")
    path.write_bytes(data)


def _bomb(path):
    """A deflated member whose sizes claim 2 GiB from a few hundred bytes."""
    member = npy_bytes(np.zeros(100, np.uint8))
    make_zip(path, [("x.npy", member)], zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    for sig, at in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):  # central dir, local header
        i = data.index(sig)
        data[i + at : i + at + 4] = struct.pack("<I", 2**31)
    path.write_bytes(bytes(data))


def _stored_size_lie(path):
    make_zip(path, [("x.npy", npy_bytes(np.zeros(100, np.uint8)))])
    data = bytearray(path.read_bytes())
    i = data.index(b"PK\x01\x02")
    data[i + 24 : i + 28] = struct.pack("<I", 5000)
    path.write_bytes(bytes(data))


def _bzip2(path):
    make_zip(path, [("x.npy", npy_bytes(np.zeros(3)))], zipfile.ZIP_BZIP2)


def _truncated_member(path):
    make_zip(path, [("x.npy", npy_bytes(np.zeros(4))[:-8])])


def _trailing_member(path):
    make_zip(path, [("x.npy", npy_bytes(np.zeros(4)) + b"junk")])


def _object_member(path):
    make_zip(path, [("x.npy", npy_bytes(np.array([{"a": 1}], dtype=object)))])


def _bad_header_member(path):
    make_zip(path, [("x.npy", b"\x93NUMPY\x01\x00\x11\x27" + b"{" * 64)])


def _truncated_archive(path):
    np.savez(path, a=np.arange(100))
    path.write_bytes(path.read_bytes()[:300])


HOSTILE = {
    "not a zip": (
        lambda p: p.write_bytes(b"hello, not a zip" * 10),
        FileFormatError,
        "not a valid .npz",
    ),
    "empty file": (lambda p: p.write_bytes(b""), FileFormatError, "not a valid .npz"),
    "truncated archive": (_truncated_archive, FileFormatError, "not a valid .npz"),
    "non-.npy member": (
        lambda p: make_zip(p, [("a.npy", npy_bytes(np.zeros(1))), ("evil.txt", b"x")]),
        FileFormatError,
        "npz members that are not .npy arrays",
    ),
    "duplicate members": (
        lambda p: make_zip(
            p, [("a.npy", npy_bytes(np.zeros(1))), ("a.npy", npy_bytes(np.ones(1)))]
        ),
        UnsafeContentError,
        "'a' appears more than once",
    ),
    "parent dir member": (
        lambda p: make_zip(p, [("../x.npy", npy_bytes(np.zeros(1)))]),
        UnsafeContentError,
        "'..' path component",
    ),
    "absolute member": (
        lambda p: make_zip(p, [("/abs.npy", npy_bytes(np.zeros(1)))]),
        UnsafeContentError,
        "absolute path",
    ),
    "NUL in member name": (_nul_name, UnsafeContentError, "NUL"),
    "decompression bomb": (_bomb, UnsafeContentError, "decompression bomb"),
    "stored size lie": (_stored_size_lie, FileFormatError, r"stored \(not compressed\)"),
    "unsupported compression": (_bzip2, FileFormatError, "compression method 12"),
    "member data truncated": (_truncated_member, FileFormatError, "it is truncated"),
    "member trailing bytes": (_trailing_member, FileFormatError, "trailing bytes"),
    "object array member": (
        _object_member,
        UnsafeContentError,
        "no member can be read as a tensor: 'x': pickled Python objects",
    ),
    "header too large in member": (_bad_header_member, FileFormatError, "10000-byte limit"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_is_refused(tmp_path, case):
    build, error, text = HOSTILE[case]
    p = tmp_path / "bad.npz"
    build(p)
    with pytest.raises(error, match=text) as info:
        read_all(p)
    assert str(p) in str(info.value) and "Fix:" in str(info.value)
    assert os.listdir(tmp_path) == ["bad.npz"]


def test_bomb_guard_limits():
    assert MAX_DEFLATE_RATIO >= 1032 and BOMB_MIN_SIZE == 1 << 20
    zeros = bytes(8 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    assert len(zeros) / len(c.compress(zeros) + c.flush()) < MAX_DEFLATE_RATIO


def test_honest_highly_compressible_member_is_read(tmp_path):
    a = np.zeros((3, 1 << 20), np.uint8)  # 3 MiB of zeros deflate ~1029:1, over BOMB_MIN_SIZE
    np.savez_compressed(tmp_path / "z.npz", a=a)
    assert same(read_all(tmp_path / "z.npz")["a"], a)


def test_read_refuses_unknown_name(tmp_path):
    np.savez(tmp_path / "k.npz", a=np.zeros(1))
    with FORMAT.open(str(tmp_path / "k.npz")) as r:
        with pytest.raises(FileFormatError, match=r"no tensor named 'b'.*\['a'\]"):
            r.read("b")


def test_header_builder_matches_numpy():
    a = np.zeros((2, 3), np.float32)
    f = io.BytesIO()
    np.lib.format.write_array(f, a)
    assert build_header("float32", (2, 3)) == f.getvalue()[: -a.nbytes]


# --- fuzz: byte mutations of a valid archive raise only TensorBridgeError -------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tensorbridge.errors import TensorBridgeError  # noqa: E402


@pytest.fixture(scope="module")
def valid_npz(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("seed") / "s.npz"
    np.savez_compressed(p, a=sample("float32", (2, 3)), b=np.arange(4))
    return p.read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_mutated_archives_raise_only_tensorbridge_errors(tmp_path_factory, valid_npz, data):
    raw = bytearray(valid_npz)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    p = tmp_path_factory.mktemp("fuzz") / "f.npz"
    p.write_bytes(bytes(raw))
    try:
        read_all(p)
    except TensorBridgeError:
        pass


class _Marker:
    """Unpickling it would create a file: proof that a member was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def test_members_that_are_not_tensors_are_skipped_and_said_why(tmp_path):
    marker = tmp_path / "unpickled"
    p = tmp_path / "mixed.npz"
    np.savez(
        p,
        w=np.arange(3, dtype=np.float32),
        labels=np.array(["cat", "dog"]),
        when=np.array(["2020-01-01"], dtype="datetime64[D]"),
        rec=np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]),
        obj=np.array([_Marker(str(marker))], dtype=object),
        raw=np.array([b"ab"]),
        b=np.ones((2, 2), np.int64),
    )
    got = tb.load(p)
    assert list(got) == ["w", "b"] and got["w"].tolist() == [0, 1, 2]
    assert tb.load(p, names=["b"], to="torch")["b"].sum().item() == 4
    with tb.open(p) as r:
        assert r.keys() == ["w", "b"]
        assert set(r.skipped) == {"labels", "when", "rec", "obj", "raw"}
        assert "<U3" in r.skipped["labels"] and "datetime64" in r.skipped["when"]
        assert "records" in r.skipped["rec"] and "never unpickled" in r.skipped["obj"]
    with pytest.raises(FileFormatError, match="'labels' is not read: it holds <U3 values"):
        tb.load(p, names=["labels"])
    assert not marker.exists()


def test_an_archive_of_nothing_but_non_tensors_is_refused(tmp_path):
    p = tmp_path / "strings.npz"
    np.savez(p, labels=np.array(["a"]), when=np.array([1], dtype="datetime64[s]"))
    with pytest.raises(FileFormatError, match="no member can be read as a tensor: 'labels': <U1"):
        tb.load(p)


def test_convert_says_which_entries_it_left_out(tmp_path):
    import json
    import subprocess
    import sys

    p = tmp_path / "mixed.npz"
    np.savez(p, w=np.ones(2, np.float32), labels=np.array(["a", "b"]))
    out = tmp_path / "o.safetensors"
    cmd = [sys.executable, "-m", "tensorbridge", "convert", str(p), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "left out 1 entry of the source that is not a tensor: 'labels'" in run.stderr
    assert tb.load(out)["w"].tolist() == [1, 1]
    run = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["not_tensors"] == {"labels": "<U1 values, not a tensor"}
    run = subprocess.run([*cmd, "--include", "lab*"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "matches 'labels', which is not a tensor: <U1 values" in run.stderr


def _rewrite_member(src, dst, member: str, change) -> None:  # type: ignore[no-untyped-def]
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            body = zi.read(info.filename)
            zo.writestr(info.filename, change(body) if info.filename == member else body)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.replace(b"'descr': '<f4'", b"'descr': [1, 2]  "), "structured dtype"),
        (lambda b: b.replace(b"'descr': '<f4'", b"'descr': [('a','<zz')]"), "structured dtype"),
    ],
)
def test_a_corrupt_member_is_refused_not_skipped(tmp_path, change, message):
    src, bad = tmp_path / "two.npz", tmp_path / "bad.npz"
    np.savez(src, good=np.arange(4, dtype="f4"), other=np.arange(3, dtype="i4"))
    _rewrite_member(src, bad, "good.npy", change)
    with pytest.raises(FileFormatError, match=f"member 'good.npy'.*{message}"):
        tb.load(bad)


@pytest.mark.parametrize(
    "change, what",
    [(lambda b: b[:-3], "it is truncated"), (lambda b: b + b"junk", "it has trailing bytes")],
)
def test_a_skipped_member_must_still_hold_what_its_header_says(tmp_path, change, what):
    src, bad = tmp_path / "two.npz", tmp_path / "bad.npz"
    np.savez(src, w=np.arange(4, dtype="f4"), s=np.array(["abc", "de"]))
    _rewrite_member(src, bad, "s.npy", change)
    with pytest.raises(FileFormatError, match=f"member 's.npy': the header declares 24 .*{what}"):
        tb.load(bad)


def test_raw_void_records_are_skipped_like_other_records(tmp_path):
    p = tmp_path / "v.npz"
    np.savez(p, good=np.arange(3, dtype="f4"), v=np.zeros(3, dtype="V4"), v3=np.zeros(2, "V3"))
    assert list(tb.load(p)) == ["good"]
    with tb.open(p) as r:
        assert "np.void" in r.skipped["v"] and "np.void" in r.skipped["v3"]


def test_diff_says_which_entries_it_did_not_compare(tmp_path):
    import json
    import subprocess
    import sys

    a = tmp_path / "a.npz"
    np.savez(a, w=np.ones(2, np.float32), labels=np.array(["x"]))
    b = tmp_path / "b.safetensors"
    tb.save({"w": np.ones(2, np.float32)}, b)
    cmd = [sys.executable, "-m", "tensorbridge", "diff", str(a), str(b)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0  # (not a difference: the tensors match)
    assert "note: A holds 1 entry that is not a tensor, not compared: 'labels'" in run.stdout
    doc = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True).stdout)
    assert doc["not_tensors_a"] == {"labels": "<U1 values, not a tensor"}
    assert doc["not_tensors_b"] == {} and doc["same"] is True
