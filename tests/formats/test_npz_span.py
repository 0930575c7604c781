"""Stored ``.npz`` members as byte ranges (``NpzReader.raw_span``): what loads map, what the
arena copies and what ``convert`` copies kernel-side.

Files come from the reference writers (``np.savez``, ``np.savez_compressed``, ``tb.save``);
every result is compared as bytes with ``np.load`` or safetensors' own reader. A mapping is
proven by rewriting the file in place: a mapped array shows the change, a copy does not.
Hostile archives (local headers that disagree with the central directory, sizes past the
end) never yield a span outside the member; their loads end in bounded time and memory.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge.cli.convert_cmd import convert_file
from tensorbridge.errors import FileFormatError, TensorBridgeError
from tensorbridge.formats import safetensors as st_mod
from tensorbridge.formats.npy import build_header
from tensorbridge.formats.npz import FORMAT as NPZ

from ..hostile.bounded import MIB, run_bounded
from ..hostile.zipcraft import nested_npz, payload

RNG = np.random.default_rng(7)


def _values(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return (RNG.standard_normal(shape) * 100).astype(dtype)


# names of 6 bytes ("k.npy" + 1) and data sizes that are multiples of 64 keep np.savez's
# first members 8-byte aligned (30-byte local header + 6 + 20-byte zip64 extra + 128-byte
# .npy header = 184), so the mapping proof below has aligned members to map
ARRAYS: dict[str, np.ndarray] = {
    "ff": _values("<f4", (4, 16)),
    "dd": _values("<f8", (8, 8)),
    "cc": _values("<c8", (32,)),
    "uu": RNG.integers(0, 2**64, (7,), dtype=np.uint64),
    "hh": _values("<f2", (4,)),
    "bb": _values("i1", (3, 5)),  # itemsize 1: never misaligned
    "zz": np.array(2.5, np.float64),  # 0-d
    "ee": np.zeros((0, 3), np.float32),  # empty: no span
    "ft": np.asfortranarray(_values("<f4", (3, 4))),  # Fortran 2-D: no span
    "be": _values(">f4", (6,)),  # big-endian: no span
    "tf": np.array([True, False, True]),  # bool: no span (read checks its bytes)
    "bf": _values("float32", (9,)).astype(ml_dtypes.bfloat16),  # np.save writes '<V2'
}
NO_SPAN = {"ee", "ft", "be", "tf"}


def _np_bytes(a: np.ndarray) -> bytes:
    """The little-endian C-order bytes of what np.load returned."""
    if a.dtype.kind not in "V" and a.dtype.itemsize > 1:
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a).tobytes()


def _tb_bytes(a) -> bytes:
    return np.ascontiguousarray(np.asarray(a)).tobytes()


@pytest.fixture(scope="module")
def savez(tmp_path_factory) -> str:
    p = str(tmp_path_factory.mktemp("ref") / "stored.npz")
    np.savez(p, **ARRAYS)
    return p


@pytest.fixture(scope="module")
def savez_compressed(tmp_path_factory) -> str:
    p = str(tmp_path_factory.mktemp("ref") / "deflated.npz")
    np.savez_compressed(p, **ARRAYS)
    return p


def _file_bytes(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_spans_of_np_savez_are_exactly_the_members_array_bytes(savez):
    ref = np.load(savez)
    with NPZ.open(savez, void_as="bfloat16") as r:
        assert r.keys() == list(ARRAYS)
        for k in r.keys():
            span = r.raw_span(k)
            assert (span is None) == (k in NO_SPAN), k
            if span is None:
                continue
            st = os.stat(savez)
            assert span.path == savez and span.file_id == (st.st_dev, st.st_ino)
            assert span.nbytes == ARRAYS[k].nbytes
            raw = _file_bytes(savez, span.offset, span.nbytes)
            assert raw == _np_bytes(ref[k]) == r.read(k).tobytes(), k


def _fortran_npy(a: np.ndarray) -> bytes:
    """``a`` as a .npy member whose header says fortran_order (np.save writes that only for
    arrays that are not C-contiguous, so this is crafted), data in Fortran order."""
    text = f"{{'descr': '{a.dtype.str}', 'fortran_order': True, 'shape': {a.shape!r}, }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    head = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()
    return head + a.tobytes(order="F")


def test_fortran_order_members_have_a_span_only_where_it_is_the_c_order_bytes(tmp_path):
    arrays = {
        "row": _values("<f4", (1, 6)),
        "col": _values("<f4", (5, 1)),
        "vec": _values("<f8", (4,)),
        "one": np.array(1.5, np.float32),
        "mat": _values("<f4", (2, 3)),
    }
    p = tmp_path / "f.npz"
    p.write_bytes(_zip([{"name": k + ".npy", "data": _fortran_npy(v)} for k, v in arrays.items()]))
    ref = np.load(p)
    with NPZ.open(str(p)) as r:
        for k, v in arrays.items():
            assert ref[k].tobytes() == v.tobytes()  # (np.load agrees on the values)
            span = r.raw_span(k)
            assert (span is None) == (k == "mat"), k
            if span is not None:
                assert _file_bytes(str(p), span.offset, span.nbytes) == v.tobytes()
            assert r.read(k).tobytes() == v.tobytes()
    for mode in (True, False):
        got = tb.load(p, mmap=mode)
        assert all(got[k].tobytes() == v.tobytes() for k, v in arrays.items())


def test_compressed_members_have_no_span(savez_compressed):
    with NPZ.open(savez_compressed, void_as="bfloat16") as r:
        assert all(r.raw_span(k) is None for k in r.keys())


def test_tensorbridge_npz_members_are_aligned_and_mapped(tmp_path):
    p = str(tmp_path / "tb.npz")
    tree = {
        "w": _values("float32", (10, 3)),
        "b": ARRAYS["bf"],
        "i": ARRAYS["uu"],
        "odd name ü" * 7: _values("complex128", (3,)),  # a long UTF-8 name
        "x": _values("int8", (5,)),  # odd size: the next member is padded
        "y": _values("float64", (3,)),
    }
    tb.save(tree, p)  # stored; bfloat16 in the marker layout
    ref = np.load(p)
    with zipfile.ZipFile(p) as zf:
        assert zf.testzip() is None
    mapped = tb.load(p, mmap=True)
    offsets = {}
    with NPZ.open(p) as r:
        for k, v in tree.items():
            span = r.raw_span(k)
            assert span is not None and span.offset % 64 == 0, k
            assert _file_bytes(p, span.offset, span.nbytes) == v.tobytes()
            assert ref[k].tobytes() == v.tobytes() and mapped[k].tobytes() == v.tobytes()
            offsets[k] = span.offset
    with open(p, "r+b") as f:  # every member is mapped: rewrite the file in place
        for at in offsets.values():
            f.seek(at)
            f.write(b"\x7f")
    assert all(mapped[k].tobytes()[:1] == b"\x7f" for k in tree)
    tb.save(tree, p, compress=True)
    with NPZ.open(p) as r:
        assert all(r.raw_span(k) is None for k in r.keys())


def _poke_every_member(path: str) -> None:
    """Flip one byte of every non-empty member's data in place (the same inode): the first
    array byte of a stored member, a middle byte of a deflated one."""
    with zipfile.ZipFile(path) as zf:
        members = [zi for zi in zf.infolist() if ARRAYS[zi.filename[:-4]].nbytes]
    with open(path, "r+b") as f:
        for zi in members:
            f.seek(zi.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            start = zi.header_offset + 30 + name_len + extra_len
            if zi.compress_type == zipfile.ZIP_STORED:
                f.seek(start + 8)
                at = start + 10 + struct.unpack("<H", f.read(2))[0]  # after the .npy header
            else:
                at = start + zi.compress_size // 2
            f.seek(at)
            old = f.read(1)
            f.seek(at)
            f.write(bytes([old[0] ^ 0x5A]))


@pytest.mark.parametrize("which", ["savez", "savez_compressed"])
def test_mmap_true_maps_stored_members_and_copies_the_rest(tmp_path, which, request):
    src = request.getfixturevalue(which)
    p = str(tmp_path / "m.npz")
    with open(src, "rb") as f, open(p, "wb") as g:
        g.write(f.read())
    ref = dict(np.load(p))
    mapped = tb.load(p, mmap=True, void_as="bfloat16")
    copied = tb.load(p, mmap=False, void_as="bfloat16")
    for k, v in ref.items():
        assert _tb_bytes(mapped[k]) == _tb_bytes(copied[k]) == _np_bytes(v), k
    with NPZ.open(p, void_as="bfloat16") as r:
        aligned = {
            k
            for k in r.keys()
            if (s := r.raw_span(k)) is not None and s.offset % mapped[k].dtype.alignment == 0
        }
    assert len(aligned) >= (7 if which == "savez" else 0)  # the proof below maps something
    _poke_every_member(p)
    for k, v in ref.items():
        if k in aligned:  # it is the file: the in-place rewrite shows through
            assert _tb_bytes(mapped[k]) != _np_bytes(v), k
        elif k in NO_SPAN or which == "savez_compressed":  # read into fresh memory
            assert _tb_bytes(mapped[k]) == _np_bytes(v), k
        assert _tb_bytes(copied[k]) == _np_bytes(v), k  # copies never change
    if aligned:
        k = sorted(aligned)[0]
        mapped[k].reshape(-1)[:1] = 0  # copy-on-write: the file keeps its bytes
        with NPZ.open(p, void_as="bfloat16") as r:
            offset = r._stored[k] + r._headers[k].header_size
        assert _file_bytes(p, offset, 1) != _tb_bytes(mapped[k])[:1]


def test_a_stored_member_failing_its_crc_is_refused_by_every_path(tmp_path, monkeypatch):
    p = tmp_path / "c.npz"
    np.savez(p, ww=W, vv=V)
    with NPZ.open(str(p)) as r:
        span = r.raw_span("ww")
    assert span is not None
    data = bytearray(p.read_bytes())
    data[span.offset + 5] ^= 0x01  # one bit of the array data
    p.write_bytes(bytes(data))
    with NPZ.open(str(p)) as r:
        assert r.raw_span("vv") is not None  # its neighbour is fine
        for call in (r.read, r.raw_span):
            with pytest.raises(FileFormatError, match="CRC") as info:
                call("ww")
            assert str(p) in str(info.value) and "Fix:" in str(info.value)
    for mode in (True, False):
        with pytest.raises(FileFormatError, match="CRC"):
            tb.load(p, mmap=mode)
    with pytest.raises(FileFormatError, match="CRC"):
        convert_file(str(p), str(tmp_path / "o.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]


def test_the_crc_is_read_once_per_member(tmp_path, monkeypatch):
    from tensorbridge.formats import npz

    p = tmp_path / "c.npz"
    np.savez(p, ww=W, vv=V)
    seen: list[str] = []
    real = npz.NpzReader._check_crc

    def spy(self, zi, start):
        seen.append(zi.filename)
        return real(self, zi, start)

    monkeypatch.setattr(npz.NpzReader, "_check_crc", spy)
    with NPZ.open(str(p)) as r:
        for _ in range(3):
            assert r.raw_span("ww") is not None and r.raw_span("vv") is not None
    assert seen == ["ww.npy", "vv.npy"]


def test_torch_tensors_share_the_mapping_of_a_stored_member(tmp_path):
    torch = pytest.importorskip("torch")
    p = str(tmp_path / "t.npz")
    a = np.arange(4096, dtype=np.float32)
    np.savez(p, ww=a)
    with NPZ.open(p) as r:
        span = r.raw_span("ww")
    assert span is not None and span.offset % 4 == 0
    t = tb.load(p, to="torch", mmap=True)["ww"]
    c = tb.load(p, to="torch", mmap=False)["ww"]
    assert isinstance(t, torch.Tensor) and t.numpy().tobytes() == a.tobytes()
    with open(p, "r+b") as f:
        f.seek(span.offset)
        f.write(np.float32(-3).tobytes())
    assert t[0].item() == -3.0 and c[0].item() == 0.0


def test_lazy_indexing_reads_stored_members_by_byte_range(savez, savez_compressed):
    for path in (savez, savez_compressed):
        ref = np.load(path)
        with tb.open(path, void_as="bfloat16") as r:
            for k, key in (("ff", np.s_[1:3, ::5]), ("dd", np.s_[-1, 2:7:2]), ("cc", np.s_[5])):
                assert r.array(k)[key].tobytes() == np.ascontiguousarray(ref[k][key]).tobytes()


def test_lazy_read_of_a_file_truncated_or_replaced_after_open_is_refused(tmp_path):
    p = str(tmp_path / "t.npz")
    np.savez(p, ww=np.arange(1000, dtype=np.float32))
    with tb.open(p) as r:
        os.truncate(p, 200)
        with pytest.raises(FileFormatError, match="truncated"):
            r.array("ww")[900:]
    np.savez(p, ww=np.arange(1000, dtype=np.float32))
    with tb.open(p) as r:
        q = str(tmp_path / "other.npz")
        np.savez(q, ww=-np.arange(1000, dtype=np.float32))
        os.replace(q, p)
        with pytest.raises(TensorBridgeError, match="replaced"):
            r.array("ww")[:10]


# --- convert: npz -> safetensors copies stored members kernel-side ---------------------------


def _spans_taken(monkeypatch) -> list:
    taken: list = []
    real = st_mod.copy_span

    def spy(src_fd, span, dst_fd, dst_offset):
        taken.append(span)
        return real(src_fd, span, dst_fd, dst_offset)

    monkeypatch.setattr(st_mod, "copy_span", spy)
    return taken


@pytest.mark.parametrize("workers", [1, 2])
def test_convert_to_safetensors_copies_stored_members_byte_exact(tmp_path, monkeypatch, workers):
    st_numpy = pytest.importorskip("safetensors.numpy")
    src = str(tmp_path / "s.npz")
    arrays = {k: v for k, v in ARRAYS.items() if k not in ("bf", "ft")}
    np.savez(src, **arrays)
    taken = _spans_taken(monkeypatch)
    dst = str(tmp_path / "o.safetensors")
    summary = convert_file(src, dst, workers=workers)
    assert summary["verified"] == len(arrays)
    if workers == 1:  # (workers copy in their own processes)
        spanned = {k for k in arrays if k not in NO_SPAN}
        assert len(taken) == len(spanned)
    back = st_numpy.load_file(dst)
    ref = np.load(src)
    assert sorted(back) == sorted(arrays)
    for k in arrays:
        assert back[k].tobytes() == _np_bytes(ref[k]) and back[k].shape == ref[k].shape, k


def test_convert_bfloat16_members_to_safetensors_and_npy(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    src = str(tmp_path / "s.npz")
    tb.save({"bf": ARRAYS["bf"], "w": ARRAYS["ff"]}, src)
    convert_file(src, str(tmp_path / "o.safetensors"))
    back = st_torch.load_file(str(tmp_path / "o.safetensors"))
    assert str(back["bf"].dtype) == "torch.bfloat16"
    assert back["bf"].view(torch.int16).numpy().tobytes() == ARRAYS["bf"].tobytes()
    assert back["w"].numpy().tobytes() == ARRAYS["ff"].tobytes()
    convert_file(src, str(tmp_path / "o.npy"), include=["w"])
    assert np.load(str(tmp_path / "o.npy")).tobytes() == ARRAYS["ff"].tobytes()


# --- hostile archives -------------------------------------------------------------------------


def _npy(a: np.ndarray) -> bytes:
    import io

    f = io.BytesIO()
    np.lib.format.write_array(f, a, allow_pickle=False)
    return f.getvalue()


def _zip(members: list[dict]) -> bytes:
    """A zip of stored members, each a dict: ``name``, ``data``; optional ``local_name``,
    ``local_extra``, ``flags``, ``local_sizes`` (compressed, uncompressed), ``local_crc``,
    ``descriptor`` (data descriptor after the data), ``offset`` (added to the central
    directory's header offset), ``size`` (the central directory's sizes)."""
    body, central = b"", b""
    for m in members:
        name = m["name"].encode()
        data = m["data"]
        crc = zlib.crc32(data)
        size = m.get("size", len(data))
        descriptor = m.get("descriptor", False)
        flags = m.get("flags", 0) | (0x8 if descriptor else 0)
        lc, lu = m.get("local_sizes", (0, 0) if descriptor else (size, size))
        lname = m.get("local_name", name)
        lextra = m.get("local_extra", b"")
        offset = len(body)
        body += struct.pack(
            "<4s5H3L2H",
            b"PK\x03\x04",
            20,
            flags,
            0,
            0,
            0x21,
            m.get("local_crc", 0 if descriptor else crc),
            lc,
            lu,
            len(lname),
            len(lextra),
        )
        body += lname + lextra + data
        if descriptor:
            body += struct.pack("<4s3L", b"PK\x07\x08", crc, len(data), len(data))
        central += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                flags,
                0,
                0,
                0x21,
                crc,
                size,
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset + m.get("offset", 0),
            )
            + name
        )
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(body), 0
    )
    return body + central + end


W = np.arange(16, dtype=np.float32)
V = np.arange(8, dtype=np.int64) - 3


def _members(**first) -> list[dict]:
    return [{"name": "ww.npy", "data": _npy(W), **first}, {"name": "vv.npy", "data": _npy(V)}]


def _zip64_extra(usize: int, csize: int, tag_size: int = 16) -> bytes:
    return struct.pack("<HHQQ", 1, tag_size, usize, csize)


_N = len(_npy(W))
#: archives whose member "ww" reads correctly through zipfile (the central directory), but
#: whose local header does not say the same: never handed out as a byte range
DISAGREEING = {
    "local sizes lie": _members(local_sizes=(_N + 64, _N + 64)),
    "local CRC lies": _members(local_crc=1234),
    "data descriptor": _members(descriptor=True),
    "zip64 extra sizes lie": _members(
        local_sizes=(0xFFFFFFFF, 0xFFFFFFFF), local_extra=_zip64_extra(_N + 8, _N + 8)
    ),
    "zip64 sizes without extra": _members(local_sizes=(0xFFFFFFFF, 0xFFFFFFFF)),
    "zip64 extra overruns": _members(
        local_sizes=(0xFFFFFFFF, 0xFFFFFFFF), local_extra=_zip64_extra(_N, _N, tag_size=40)
    ),
    "zip64 extra too short": _members(
        local_sizes=(0xFFFFFFFF, 0xFFFFFFFF), local_extra=struct.pack("<HHQ", 1, 8, _N)
    ),
}


@pytest.mark.parametrize("case", list(DISAGREEING))
def test_members_whose_local_header_disagrees_have_no_span_and_still_load(tmp_path, case):
    p = tmp_path / "x.npz"
    p.write_bytes(_zip(DISAGREEING[case]))
    with zipfile.ZipFile(p) as zf:  # the reference reads it (by the central directory)
        assert zf.read("ww.npy") == _npy(W)
    with NPZ.open(str(p)) as r:
        assert r.raw_span("ww") is None
        assert r.raw_span("vv") is not None  # the honest member next to it
    for mode in (True, False):
        got = tb.load(p, mmap=mode)
        assert got["ww"].tobytes() == W.tobytes() and got["vv"].tobytes() == V.tobytes()


def test_local_extra_field_differing_from_central_directory_is_skipped_as_zipfile_does(tmp_path):
    p = tmp_path / "x.npz"
    extra = b"\xfe\xca\x03\x00abc"  # 7 bytes in the local header only: odd offsets
    p.write_bytes(_zip(_members(local_extra=extra)))
    ref = np.load(p)
    with NPZ.open(str(p)) as r:
        span = r.raw_span("ww")
        assert span is not None and span.offset == 30 + 6 + len(extra) + 128
        assert _file_bytes(str(p), span.offset, span.nbytes) == W.tobytes()
    for mode in (True, False):
        got = tb.load(p, mmap=mode)
        assert got["ww"].tobytes() == ref["ww"].tobytes() and got["vv"].tobytes() == V.tobytes()


def _huge_claim(p) -> None:
    """ww's header claims 2**28 floats and the central directory agrees; the file is small."""
    head = build_header("float32", (2**28,))
    members = [{"name": "ww.npy", "data": head + W.tobytes(), "size": len(head) + 2**30}]
    p.write_bytes(_zip(members))


#: archives refused when opened: (build, error type, message)
REFUSED = {
    "local name length differs": (
        lambda p: p.write_bytes(_zip(_members(local_name=b"www.npy"))),
        "FileFormatError",
        "in its local header",
    ),
    "member offset past EOF": (
        lambda p: p.write_bytes(_zip(_members(offset=1 << 20))),
        "FileFormatError",
        "no local file header",
    ),
    "header claims more than stored": (
        lambda p: p.write_bytes(
            _zip([{"name": "ww.npy", "data": _npy(W).replace(b"(16,)", b"(17,)")}])
        ),
        "FileFormatError",
        "it is truncated",
    ),
    "central size past EOF": (_huge_claim, "UnsafeContentError", "overlaps the central"),
    "overlapping members": (
        lambda p: p.write_bytes(nested_npz(50, payload(1 * MIB))),
        "UnsafeContentError",
        "overlaps member",
    ),
}

BOUNDED_LOADS = """
import tensorbridge as tb
RESULT = {}
for path in ARGS:
    for mode in (True, False):
        try:
            got = tb.load(path, mmap=mode)
            RESULT[path + str(mode)] = ["ok", sum(v.nbytes for v in got.values())]
        except tb.TensorBridgeError as exc:
            RESULT[path + str(mode)] = [type(exc).__name__, str(exc)]
"""


def test_hostile_archives_are_refused_in_bounded_time_and_memory(tmp_path):
    paths = []
    for i, (build, _, _) in enumerate(REFUSED.values()):
        p = tmp_path / f"h{i}.npz"
        build(p)
        paths.append(str(p))
    base = tmp_path / "fine.npz"
    np.savez(base, ww=W)
    r = run_bounded(BOUNDED_LOADS, [str(base), *paths], timeout=60, mem_limit=2 << 30)
    assert r.outcome == "ok", r
    assert r.result[str(base) + "True"] == ["ok", W.nbytes]
    for path, (error, text) in zip(paths, [v[1:] for v in REFUSED.values()], strict=True):
        for mode in (True, False):
            kind, detail = r.result[path + str(mode)]
            assert kind == error and text in detail and "Fix:" in detail, (path, detail)
    assert r.peak_rss < 400 * MIB and r.wall < 30


# --- a fuzz of the zip structure: any span that is handed out lies inside its member --------


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("fz") / "base.npz"
    np.savez(p, ww=W, vv=V)
    return p.read_bytes()


def _regions(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the zip headers of ``data`` (local headers with their extras, the
    central directory): where the fuzz mutates."""
    regions = []
    at = data.find(b"PK\x03\x04")
    while at >= 0:
        regions.append((at, at + 60))
        at = data.find(b"PK\x03\x04", at + 4)
    cd = data.find(b"PK\x01\x02")
    regions.append((cd, len(data)))
    return regions


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_zip_headers_never_yield_a_span_outside_the_member(tmp_path, fuzz_base, data):
    buf = bytearray(fuzz_base)
    regions = _regions(fuzz_base)
    for _ in range(data.draw(st.integers(1, 4))):
        lo, hi = regions[data.draw(st.integers(0, len(regions) - 1))]
        at = data.draw(st.integers(lo, min(hi, len(buf)) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    p = tmp_path / "f.npz"
    p.write_bytes(bytes(buf))
    try:
        r = NPZ.open(str(p))
    except TensorBridgeError:
        return
    with r:
        for k in r.keys():
            try:
                want = r.read(k).tobytes()
            except TensorBridgeError:  # a bad CRC: no span is handed out either
                try:
                    assert r.raw_span(k) is None
                except FileFormatError as exc:
                    assert "CRC" in str(exc)
                continue
            span = r.raw_span(k)
            if span is None:
                continue
            assert span.offset >= 0 and span.offset + span.nbytes <= len(buf)
            assert bytes(buf[span.offset : span.offset + span.nbytes]) == want
