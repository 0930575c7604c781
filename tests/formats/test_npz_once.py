"""A deflated .npz member is inflated once per load: a small member (up to a header's
window) is inflated whole when its header is checked at open and read from those bytes,
within a bounded budget; a larger one has only its header inflated at open. Counted by
wrapping zlib.decompressobj (which zipfile uses too), checked bit for bit against np.load
and, for crafted members, against the zipfile path the reader takes past its budget (the
same arrays, the same errors and messages)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import ml_dtypes
import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import FileFormatError
from tensorbridge.formats import npz as npz_mod
from tensorbridge.formats.base import TensorInfo
from tensorbridge.formats.npy import MAX_HEADER_SIZE, PREFIX_MAX
from tensorbridge.formats.npz import FORMAT, INFLATE_CHUNK

from ..hostile.bounded import MIB, run_bounded
from .samples import same

WINDOW = PREFIX_MAX + MAX_HEADER_SIZE  # members up to this size are inflated whole at open


class Inflated:
    """Every byte any zlib decompressor hands out while installed (npz and zipfile)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        self.calls = 0
        real = zlib.decompressobj
        log = self

        class Counting:
            def __init__(self, *args: object) -> None:
                self._d = real(*args)

            def decompress(self, data: bytes, max_length: int = 0) -> bytes:
                out = self._d.decompress(data, max_length)
                log.total += len(out)
                log.calls += 1
                return out

            def flush(self, *args: int) -> bytes:
                out = self._d.flush(*args)
                log.total += len(out)
                return out

            def __getattr__(self, name: str) -> object:
                return getattr(self._d, name)

        monkeypatch.setattr(zlib, "decompressobj", Counting)


def sizes(path) -> tuple[int, int]:
    """(sum of members' sizes, sum of their .npy header sizes)."""
    total = headers = 0
    with zipfile.ZipFile(path) as z:
        for zi in z.infolist():
            total += zi.file_size
            with z.open(zi) as f:
                head = f.read(12)
            hlen = struct.unpack_from("<H" if head[6] == 1 else "<I", head, 8)[0]
            headers += (10 if head[6] == 1 else 12) + hlen
    return total, headers


def npload(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def keeping(p) -> npz_mod.NpzReader:
    """A reader as load opens it: small members inflated at open are kept for their read."""
    return npz_mod.NpzReader(str(p), keep=True)


def test_a_reader_opened_by_hand_keeps_nothing(tmp_path, monkeypatch):
    """tb.open may be kept open and read from rarely (many such readers would each hold
    up to KEEP_INFLATED bytes): only load, which reads every member at once, keeps them."""
    sd = {f"b{i}": np.full(64, i, np.float32) for i in range(50)}
    p = tmp_path / "c.npz"
    np.savez_compressed(p, **sd)
    total, _ = sizes(p)
    count = Inflated(monkeypatch)
    readers = [tb.open(p) for _ in range(20)]
    try:
        assert all(r._kept_bytes == 0 and not r._kept for r in readers)
        assert count.total == 20 * total  # (each member whole, for its header check)
        assert all(same(readers[0].read(k), v) for k, v in sd.items())
    finally:
        for r in readers:
            r.close()
    count.total = 0
    got = tb.load(p)
    assert count.total == total and all(same(got[k], v) for k, v in sd.items())
    count.total = 0
    tb.load(p, names=["b3"])  # a few members: nothing kept, each read inflates its own
    with zipfile.ZipFile(p) as z:
        assert count.total == total + z.getinfo("b3.npy").file_size


def test_500_small_members_are_each_inflated_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sd = {f"layers.{i}.bias": rng.standard_normal(1024, dtype=np.float32) for i in range(500)}
    p = tmp_path / "c.npz"
    np.savez_compressed(p, **sd)
    total, _ = sizes(p)
    count = Inflated(monkeypatch)
    with keeping(p) as r:
        at_open = count.total
        assert r.info("layers.400.bias") == TensorInfo("layers.400.bias", "float32", (1024,))
        got = {k: r.read(k) for k in r.keys()}
        assert count.total == at_open == total  # every member whole at open, none again
    assert list(got) == list(sd) and all(same(got[k], v) for k, v in sd.items())
    count.total = 0
    loaded = tb.load(p)
    assert count.total == total
    assert all(same(loaded[k], v) for k, v in sd.items())


def test_larger_members_have_only_their_headers_inflated_at_open(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    sd = {f"m{i}": rng.standard_normal(4096, dtype=np.float32) for i in range(20)}  # 16 KiB
    sd["big"] = rng.standard_normal((3 * INFLATE_CHUNK + 20) // 4).astype(np.float32)
    sd["edge"] = np.arange(WINDOW - 128 + 1, dtype=np.uint8)  # one byte past the window
    p = tmp_path / "c.npz"
    np.savez_compressed(p, **sd)
    total, headers = sizes(p)
    count = Inflated(monkeypatch)
    with keeping(p) as r:
        assert count.total == headers  # each header alone (before: 10 KiB of each member)
        assert r.info("big").shape == sd["big"].shape and r.info("edge").dtype == "uint8"
    count.total = 0
    got = tb.load(p)
    assert count.total == total + headers  # the data once, a header twice
    assert all(same(got[k], v) for k, v in sd.items())


def dtype_zoo() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    f = rng.standard_normal((3, 5)).astype(np.float32)
    return {
        "f4": f,
        "be_f8": np.arange(12, dtype=">f8").reshape(3, 4),
        "be_i2": np.arange(7, dtype=">i2"),
        "be_c8": (np.arange(4) + 1j).astype(">c8"),
        "scalar": np.array(3.5, dtype=np.float64),
        "scalar_be": np.array(7, dtype=">i4"),
        "empty": np.zeros((0, 3), np.float32),
        "fortran": np.asfortranarray(f),
        "bool": np.array([True, False, True]),
        "u8": np.arange(10, dtype=np.uint64) << np.uint64(60),
        "f2": f.astype(np.float16),
        "long": rng.standard_normal((50, 40)).astype(np.float32),  # 8000 bytes: kept
        "just_under": np.arange(WINDOW - 128, dtype=np.uint8),  # header + data = WINDOW
        "just_over": np.arange(WINDOW - 127, dtype=np.uint8),
    }


@pytest.mark.parametrize("keep", ["default", "none"])
def test_np_savez_compressed_reads_bit_exact(tmp_path, monkeypatch, keep):
    if keep == "none":  # every member through zipfile, as when the budget is spent
        monkeypatch.setattr(npz_mod, "KEEP_INFLATED", 0)
    zoo = dtype_zoo()
    p = tmp_path / "zoo.npz"
    np.savez_compressed(p, **zoo)
    ref = npload(p)
    for mmap in (None, False):
        got = tb.load(p, mmap=mmap)
        assert list(got) == list(zoo)
        for k, v in ref.items():
            want = v.astype(v.dtype.newbyteorder("=")) if v.dtype.byteorder == ">" else v
            assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
            assert got[k].tobytes() == want.tobytes(), k
    with keeping(p) as r:
        assert r._kept_bytes <= npz_mod.KEEP_INFLATED
        kept = set(r._kept)
        assert {r.info(k).shape for k in zoo} == {v.shape for v in zoo.values()}
    if keep == "default":
        assert "just_under.npy" in kept and "just_over.npy" not in kept
        assert kept >= {f"{k}.npy" for k in zoo if k != "just_over"}
    else:
        assert not kept


def test_bf16_written_by_np_savez_compressed_as_void(tmp_path):
    a = np.random.default_rng(3).standard_normal((4, 6)).astype(ml_dtypes.bfloat16)
    p = tmp_path / "bf.npz"
    np.savez_compressed(p, w=a, b=a[:0])  # descr '<V2': ml_dtypes' arrays
    got = tb.load(p, void_as="bfloat16")
    assert got["w"].dtype == ml_dtypes.bfloat16 and got["w"].tobytes() == a.tobytes()
    assert got["b"].shape == (0, 6)
    with pytest.raises(FileFormatError, match="void_as='bfloat16'"):
        tb.load(p)


def test_reading_a_member_twice_inflates_it_again(tmp_path, monkeypatch):
    a = np.arange(100, dtype=np.int32)
    p = tmp_path / "c.npz"
    np.savez_compressed(p, a=a)
    count = Inflated(monkeypatch)
    with keeping(p) as r:
        first = r.read("a")
        assert not r._kept and r._kept_bytes == 0  # handed out: nothing kept any more
        calls = count.calls
        second = r.read("a")
        assert count.calls > calls  # through zipfile, as before
    assert same(first, a) and same(second, a) and first is not second


def test_the_budget_bounds_what_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(npz_mod, "KEEP_INFLATED", 20_000)
    sd = {f"t{i}": np.full(1024, i, np.float32) for i in range(50)}  # 4224 bytes each
    p = tmp_path / "c.npz"
    np.savez_compressed(p, **sd)
    with keeping(p) as r:
        assert len(r._kept) == 4 and r._kept_bytes == 4 * 4224
        got = {k: r.read(k) for k in r.keys()}
        assert r._kept_bytes == 0 and not r._kept
    assert all(same(got[k], v) for k, v in sd.items())
    r = FORMAT.open(str(p))
    r.close()
    assert not r._kept and r._kept_bytes == 0


# --- crafted members: the kept path and the zipfile path agree ------------------------------


def npy(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, a)
    return f.getvalue()


def one_member(name: str, body: bytes, *, usize: int | None = None, crc: int | None = None):
    """A zip of one deflated member ``name`` whose stream inflates to ``body``, declaring
    ``usize`` bytes and CRC ``crc`` (by default, the true ones) in both of its headers."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = c.compress(body) + c.flush()
    crc = zlib.crc32(body) if crc is None else crc
    usize = len(body) if usize is None else usize
    n = name.encode()
    fields = (20, 0, 8, 0, 0x21, crc, len(data), usize, len(n))
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields, 0) + n + data
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0, 0) + n
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


def outcome(path) -> tuple[str, object]:
    """("ok", the array's bytes) or (the error type, its message) of reading member ``a``,
    after an open that must succeed."""
    with keeping(path) as r:
        r.info("a")
        try:
            return "ok", r.read("a").tobytes()
        except FileFormatError as exc:
            return type(exc).__name__, str(exc)


A = np.arange(1024, dtype=np.float32)


@pytest.mark.parametrize(
    ("case", "want"),
    [
        ("bad crc", ("FileFormatError", "Bad CRC-32 for file 'a.npy'")),
        ("short stream", ("FileFormatError", "ended after 2000 of 4096 data bytes")),
        ("long stream", ("ok", A[:512].tobytes())),  # zipfile stops at the declared size
        ("bad crc, long stream", ("FileFormatError", "Bad CRC-32 for file 'a.npy'")),
    ],
)
def test_crafted_members_read_as_through_zipfile(tmp_path, monkeypatch, case, want):
    full = npy(A)
    head = len(full) - A.nbytes
    if case == "bad crc":
        blob = one_member("a.npy", full, crc=zlib.crc32(full) ^ 1)
    elif case == "short stream":  # header says 1024 floats, the stream holds 500
        body = full[: head + 2000]
        blob = one_member("a.npy", body, usize=len(full))
    else:  # header says 512 floats, the stream holds 1024: the declared size cuts it
        body = npy(A[:512])[:head] + A.tobytes()
        cut = body[: head + 2048]
        crc = zlib.crc32(cut) ^ (case != "long stream")
        blob = one_member("a.npy", body, usize=len(cut), crc=crc)
    p = tmp_path / "m.npz"
    p.write_bytes(blob)
    kept = outcome(p)
    monkeypatch.setattr(npz_mod, "KEEP_INFLATED", 0)
    with keeping(p) as r:
        assert not r._kept
    assert outcome(p) == kept  # the same array, or the same error and message
    if want[0] == "ok":
        assert kept == want
    else:
        assert kept[0] == want[0] and str(want[1]) in str(kept[1]), kept


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_corrupt_header_in_member_400_is_refused_at_open(tmp_path, monkeypatch, size):
    n = 1024 if size == "small" else 4096  # kept whole, or past the window
    members = [
        (f"layers.{i}.bias.npy", npy(np.arange(n, dtype=np.float32) + i)) for i in range(500)
    ]
    good = members[400][1]
    members[400] = (members[400][0], good.replace(b"'<f4'", b"'|O8'", 1))
    p = tmp_path / "c.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for name, body in members:
            z.writestr(name, body)
    count = Inflated(monkeypatch)
    with tb.open(p) as r:  # an object array is skipped, never unpickled, and said why
        assert "layers.400.bias" not in r.keys() and len(r.keys()) == 499
        assert list(r.skipped) == ["layers.400.bias"] and "pickled" in r.skipped["layers.400.bias"]
        with pytest.raises(
            FileFormatError, match="'layers.400.bias' is not read: it holds pickled"
        ):
            r.read("layers.400.bias")
    # the hostile header that says it is longer than any header may be
    bad = bytearray(good)
    bad[8:10] = struct.pack("<H", 60000)
    members[400] = (members[400][0], bytes(bad))
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for name, body in members:
            z.writestr(name, body)
    count.total = 0
    with pytest.raises(FileFormatError, match="member 'layers.400.bias.npy': the header is 60000 "):
        tb.load(p)
    before = 400 * (4 * n + 128 if size == "small" else 128)  # whole, or the headers
    assert count.total <= before + WINDOW  # and at most a header's window of member 400


# --- bounded memory: a file of many small, very compressible members ---------------------------

OPEN = """
from tensorbridge.formats.npz import NpzReader
with NpzReader(ARGS[0], keep=True) as r:
    keys = r.keys()
    RESULT = {"count": len(keys), "kept": r._kept_bytes,
              "nbytes": sum(r.read(k).nbytes for k in keys) if ARGS[1] else 0}
"""


@pytest.mark.parametrize("read", [False, True])
def test_many_small_zero_members_keep_a_bounded_amount(tmp_path, read):
    base = tmp_path / "tiny.npz"
    np.savez_compressed(base, a=np.zeros(4, np.float32))
    b = run_bounded(OPEN, [str(base), True], timeout=60)
    assert b.outcome == "ok", b
    p = tmp_path / "zeros.npz"
    body = npy(np.zeros(WINDOW - 128, np.uint8))  # inflates to the whole window
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(5000):
            z.writestr(f"z{i}.npy", body)
    assert p.stat().st_size < 2 * MIB  # ~50 MB when inflated
    r = run_bounded(OPEN, [str(p), read], timeout=120)
    assert r.outcome == "ok" and r.result["count"] == 5000, r
    assert 0 < r.result["kept"] <= 8 * MIB  # (KEEP_INFLATED), not the 50 MB inflated
    assert r.result["nbytes"] == (5000 * (WINDOW - 128) if read else 0)
    assert r.peak_rss < b.peak_rss + 32 * MIB, (r.peak_rss, b.peak_rss)
