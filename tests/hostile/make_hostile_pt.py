"""Small .pt files that try to make a reader take far more time or memory than their size.

Each generator writes one file into a directory and returns its path. They are the
amplification classes of issue 15 for PyTorch checkpoints, built by hand (no torch):
memo "billion laughs", huge objects in refusal messages, inflating text records, bombs
in compressed storage records, many names over one storage, zero-stride views, and
overflowing strides. ``tests/hostile/test_bounds_pt.py`` reads each one under
``run_bounded`` and checks the outcome, the wall time and the peak memory.
"""

from __future__ import annotations

import bz2
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

MIB = 1 << 20

GENERATORS: dict[str, Callable[[Path], Path]] = {}


def generator(name: str) -> Callable:
    def deco(fn: Callable[[Path], Path]) -> Callable[[Path], Path]:
        GENERATORS[name] = fn
        return fn

    return deco


# --- pickle building blocks (protocol 2) ----------------------------------------------


def s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def tensor(
    key: str,
    numel: int,
    shape: tuple,
    stride: tuple,
    offset: int = 0,
    storage: str = "FloatStorage",
) -> bytes:
    """``_rebuild_tensor_v2`` of storage record ``key`` (``numel`` elements)."""

    def ints(xs: tuple) -> bytes:
        return (
            b"(" + b"".join(b"\x8a\x09" + x.to_bytes(9, "little", signed=True) for x in xs) + b"t"
        )

    pid = (
        b"("
        + s("storage")
        + f"ctorch\n{storage}\n".encode()
        + s(key)
        + s("cpu")
        + b"\x8a\x09"
        + numel.to_bytes(9, "little", signed=True)
        + b"tQ"
    )
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + b"\x8a\x09"
        + offset.to_bytes(9, "little", signed=True)
        + ints(shape)
        + ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def checkpoint(
    path: Path,
    pkl: bytes,
    records: dict[str, bytes] | None = None,
    method: int = zipfile.ZIP_STORED,
    extra: dict[str, bytes] | None = None,
) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl, compress_type=method)
        z.writestr("archive/byteorder", "little")
        for key, raw in (records or {}).items():
            z.writestr(f"archive/data/{key}", raw, compress_type=method)
        for name, raw in (extra or {}).items():
            z.writestr(f"archive/{name}", raw, compress_type=method)
        z.writestr("archive/version", "3\n")
    return path


def laughs(levels: int, width: int, leaf: bytes) -> bytes:
    """Lists that each hold ``width`` references to the previous one: ``width**levels``
    paths to walk in a pickle of a few bytes per level. Leaves the top list on the stack."""
    out = [leaf + put(0) + b"0"]
    for i in range(1, levels + 1):
        out.append(b"](" + get(i - 1) * width + b"e" + put(i) + b"0")
    return b"".join(out) + get(levels)


def set_declared_size(path: Path, member: str, size: int) -> None:
    """Patch ``member``'s uncompressed size in its local and central headers."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, info.header_offset + 22, size)
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + name_len] == member.encode():
            struct.pack_into("<I", raw, pos + 24, size)
        pos = raw.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(raw))


# --- the generators ---------------------------------------------------------------------


@generator("memo-billion-laughs")
def _(d: Path) -> Path:  # 10**30 paths to names of ints; a few hundred bytes
    pkl = b"\x80\x02}" + s("x") + laughs(30, 10, b"K\x01") + b"s."
    return checkpoint(d / "laughs.pt", pkl)


@generator("memo-billion-laughs-of-tensors")
def _(d: Path) -> Path:  # the same, every leaf one tensor
    pkl = b"\x80\x02}" + s("x") + laughs(30, 10, tensor("0", 1, (1,), (1,))) + b"s."
    return checkpoint(d / "laughs_t.pt", pkl, {"0": b"\0" * 4})


@generator("repr-of-laughs-in-refusal")
def _(d: Path) -> Path:  # the huge list is the state BUILD refuses, and a dict key
    pkl = b"\x80\x02}" + s("w") + tensor("0", 1, (1,), (1,)) + laughs(30, 10, b"K\x01") + b"bs."
    return checkpoint(d / "repr.pt", pkl, {"0": b"\0" * 4})


@generator("repr-of-laughs-as-dict-key")
def _(d: Path) -> Path:
    return checkpoint(d / "key.pt", b"\x80\x02}" + laughs(30, 10, b"K\x01") + b"K\x01s.")


@generator("data-pkl-deflate-bomb")
def _(d: Path) -> Path:  # 64 MiB of EMPTY_LIST opcodes deflate to ~64 KB
    return checkpoint(
        d / "pklbomb.pt", b"\x80\x02" + b"]" * (64 * MIB) + b".", method=zipfile.ZIP_DEFLATED
    )


@generator("data-pkl-many-tiny-objects")
def _(d: Path) -> Path:  # 2 MiB stored: 2 million empty lists on the stack
    return checkpoint(d / "tiny.pt", b"\x80\x02" + b"]" * (2 * MIB) + b".")


@generator("metadata-json-bomb")
def _(d: Path) -> Path:  # 8 MiB of empty lists, deflated to 8 KB
    body = b'{"a": ' + b"[]," * (8 * MIB // 3) + b"[]}"
    return checkpoint(
        d / "jsonbomb.pt",
        b"\x80\x02}.",
        method=zipfile.ZIP_DEFLATED,
        extra={"extra/tensorbridge_metadata.json": body},
    )


@generator("metadata-json-nesting-stored")
def _(d: Path) -> Path:  # 8 MiB stored: {"a": [[[[...]]]]}
    body = b'{"a": ' + b"[" * (4 * MIB) + b"]" * (4 * MIB) + b"}"
    return checkpoint(
        d / "jsonnest.pt", b"\x80\x02}.", extra={"extra/tensorbridge_metadata.json": body}
    )


def _compressed_record_bomb(d: Path, name: str, method: int, raw_size: int) -> Path:
    """A storage record of ``raw_size`` zero bytes, compressed, declared as 4096 bytes."""
    if method == zipfile.ZIP_BZIP2:
        c = bz2.BZ2Compressor(9)
    elif method == zipfile.ZIP_LZMA:
        c = zipfile._get_compressor(zipfile.ZIP_LZMA)  # type: ignore[attr-defined]
    else:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(min(raw_size, 16 * MIB))
    blob = b"".join(c.compress(chunk) for _ in range(raw_size // len(chunk))) + c.flush()
    pkl = b"\x80\x02}" + s("w") + tensor("0", 1024, (1024,), (1,)) + b"s."
    p = checkpoint(d / name, pkl, {"0": bytes(4096)}, method=zipfile.ZIP_STORED)
    # replace the stored record with the compressed blob, keeping sizes honest but for
    # the uncompressed size, which stays 4096 (the lie zipfile trusts)
    with zipfile.ZipFile(p) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(p, "w") as z:
        for info, data in entries:
            if info.filename == "archive/data/0":
                z.writestr(info.filename, data, compress_type=method)
            else:
                z.writestr(info, data)
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("archive/data/0")
    raw = bytearray(p.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    head = raw[start : start + info.compress_size]
    if method == zipfile.ZIP_LZMA:  # keep zip's 4-byte lzma header + properties
        psize = struct.unpack_from("<H", head, 2)[0]
        blob = bytes(head[: 4 + psize]) + blob[4 + psize :]
    tail = raw[start + info.compress_size :]
    delta = len(blob) - info.compress_size
    out = raw[:start] + blob + tail
    struct.pack_into("<I", out, info.header_offset + 18, len(blob))
    # fix the central directory: this member's compressed size, and later offsets
    pos = out.find(b"PK\x01\x02", start + len(blob))
    while pos >= 0:
        n = struct.unpack_from("<H", out, pos + 28)[0]
        fname = bytes(out[pos + 46 : pos + 46 + n])
        if fname == b"archive/data/0":
            struct.pack_into("<I", out, pos + 20, len(blob))
        else:
            off = struct.unpack_from("<I", out, pos + 42)[0]
            if off > info.header_offset:
                struct.pack_into("<I", out, pos + 42, off + delta)
        pos = out.find(b"PK\x01\x02", pos + 4)
    eocd = out.rfind(b"PK\x05\x06")
    cd_off = struct.unpack_from("<I", out, eocd + 16)[0]
    struct.pack_into("<I", out, eocd + 16, cd_off + delta)
    p.write_bytes(bytes(out))
    return p


@generator("record-bzip2-bomb")
def _(d: Path) -> Path:  # 32 MiB of zeros in ~500 bytes, declared 4 KiB
    return _compressed_record_bomb(d, "bz2bomb.pt", zipfile.ZIP_BZIP2, 32 * MIB)


@generator("record-lzma-bomb")
def _(d: Path) -> Path:
    return _compressed_record_bomb(d, "lzmabomb.pt", zipfile.ZIP_LZMA, 32 * MIB)


@generator("record-deflate-bomb")
def _(d: Path) -> Path:
    return _compressed_record_bomb(d, "zbomb.pt", zipfile.ZIP_DEFLATED, 32 * MIB)


@generator("record-declared-ratio-over-1032")
def _(d: Path) -> Path:  # honest stream, but the header declares 1 GiB
    pkl = b"\x80\x02}" + s("w") + tensor("0", 1 << 28, (1 << 28,), (1,)) + b"s."
    p = checkpoint(d / "ratio.pt", pkl, {"0": bytes(4096)}, method=zipfile.ZIP_BZIP2)
    set_declared_size(p, "archive/data/0", 1 << 30)
    return p


@generator("corrupt-deflate-record")
def _(d: Path) -> Path:
    pkl = b"\x80\x02}" + s("w") + tensor("0", 1024, (1024,), (1,)) + b"s."
    p = checkpoint(
        d / "corrupt_z.pt", pkl, {"0": bytes(range(256)) * 16}, method=zipfile.ZIP_DEFLATED
    )
    _scribble(p, "archive/data/0")
    return p


@generator("corrupt-lzma-record")
def _(d: Path) -> Path:
    pkl = b"\x80\x02}" + s("w") + tensor("0", 1024, (1024,), (1,)) + b"s."
    p = checkpoint(d / "corrupt_x.pt", pkl, {"0": bytes(range(256)) * 16}, method=zipfile.ZIP_LZMA)
    _scribble(p, "archive/data/0")
    return p


def _scribble(p: Path, member: str) -> None:
    """Overwrite the middle of a compressed member's data with 0xFF bytes."""
    with zipfile.ZipFile(p) as z:
        info = z.getinfo(member)
    raw = bytearray(p.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    mid = start + info.compress_size // 2
    raw[mid : mid + 8] = b"\xff" * 8
    p.write_bytes(bytes(raw))


@generator("names-sharing-one-storage")
def _(d: Path) -> Path:  # 1,000 names over one 1 MiB storage: 1 GiB if each is copied
    n = MIB // 4
    items = b"".join(
        s(f"w{i}") + (tensor("0", n, (n,), (1,)) + put(1) if i == 0 else get(1))
        for i in range(1000)
    )
    return checkpoint(d / "shared.pt", b"\x80\x02}(" + items + b"u.", {"0": bytes(MIB)})


@generator("zero-stride-views")
def _(d: Path) -> Path:  # 16 names of 64 MiB each over a 4-byte storage
    n = 16 * MIB
    items = b"".join(s(f"w{i}") + tensor("0", 1, (n,), (0,)) for i in range(16))
    return checkpoint(d / "zerostride.pt", b"\x80\x02}(" + items + b"u.", {"0": b"\0" * 4})


@generator("stride-2-62")
def _(d: Path) -> Path:  # a size-1 axis with stride 2**62 (legal), next to a real one
    pkl = (
        b"\x80\x02}("
        + s("ok")
        + tensor("0", 4, (1, 4), (1 << 62, 1))
        + s("big")
        + tensor("0", 4, (2, 2), (1 << 62, 1))
        + b"u."
    )
    return checkpoint(d / "stride.pt", pkl, {"0": b"\0" * 16})


@generator("long-name-repeated")
def _(d: Path) -> Path:  # a 1 MiB key above 40,000 names through the memo: 40 GiB of names
    leaf = b"}(" + b"".join(b"M" + struct.pack("<H", i) + b"K\x01" for i in range(200)) + b"u"
    middle = (
        b"}("
        + b"".join(
            b"M" + struct.pack("<H", i) + (leaf + put(0) if i == 0 else get(0)) for i in range(200)
        )
        + b"u"
    )
    return checkpoint(d / "longname.pt", b"\x80\x02}" + s("k" * MIB) + middle + b"s.")
