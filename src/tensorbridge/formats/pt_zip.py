"""The zip layout of a ``torch.save`` checkpoint: validating it, locating and writing records.

Every entry sits under one top-level folder (``archive/`` when tensorbridge writes);
``NAME/data.pkl`` is the pickle and ``NAME/data/KEY`` the raw bytes of storage KEY.
Records are stored uncompressed and start at multiples of :data:`ALIGNMENT`, as
torch's writer does, so ``torch.load(mmap=True)`` can map them; when reading, a
stored record's bytes are located through its local header and read directly.

Compressed records (a checkpoint re-zipped by hand) are inflated here, not by
``zipfile``, so that no call can produce more than asked: deflate, bzip2 and lzma are
decompressed in bounded steps (``max_length``), only up to the bytes requested, and a
record may not declare more than :data:`MAX_RATIO` times its compressed size.
"""

from __future__ import annotations

import bz2
import lzma
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

from ..errors import FileFormatError, UnsafeContentError
from .safetensors import read_exact_into

__all__ = [
    "ALIGNMENT",
    "ARCHIVE",
    "MAX_RATIO",
    "add_record",
    "check_magic",
    "check_record",
    "check_unique_members",
    "find_prefix",
    "inflate_into",
    "record_start",
    "stored_data_offset",
    "truncated",
]

#: Data records start at multiples of this (as torch's writer does; needed for mmap).
ALIGNMENT = 64
#: Archive folder name used when writing (torch uses this for file objects).
ARCHIVE = "archive"
#: A compressed record may declare at most this many bytes per compressed byte (the most
#: deflate can ever expand; bzip2 and lzma could claim far more, so it applies to all).
MAX_RATIO = 1032
_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_STEP = 1 << 16


# --- reading -----------------------------------------------------------------------


def check_magic(head: bytes, size: int, path: str) -> bool:
    """Check the first bytes; True for torch's legacy (pre-1.6, non-zip) pickle format."""
    if size == 0:
        raise FileFormatError(
            "the file is empty. Fix: save the checkpoint again; it was never written or "
            "was truncated to nothing.",
            path,
        )
    if head[:1] == b"\x80":
        return True
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise FileFormatError(
            f"the file starts with {head[:8]!r}, not a zip signature, so it is not a PyTorch "
            "checkpoint (torch.save writes a zip archive). Fix: check the file type.",
            path,
        )
    return False


def find_prefix(names: list[str], path: str) -> str:
    first = names[0] if names else ""
    if "/" not in first:
        raise FileFormatError(
            f"the zip has no top-level folder (first entry {first!r}); this is a zip, but not a "
            "PyTorch checkpoint. Fix: pass a file written by torch.save.",
            path,
        )
    prefix = first.split("/", 1)[0] + "/"
    if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
        raise UnsafeContentError(
            "this is a TorchScript archive (torch.jit.save): a compiled program, not a "
            "checkpoint of tensors. Fix: in a trusted environment, load it with torch.jit.load "
            "and save its tensors with torch.save(module.state_dict(), path) or safetensors.",
            path,
        )
    if prefix + "data.pkl" not in names:
        raise FileFormatError(
            f"the zip has no {prefix + 'data.pkl'!r} entry, so it is not a PyTorch checkpoint. "
            "Fix: pass a file written by torch.save.",
            path,
        )
    return prefix


def check_unique_members(names: list[str], path: str) -> None:
    """A zip holding one entry name twice is ambiguous: readers disagree on which wins."""
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UnsafeContentError(
                f"the zip holds the entry {n!r} twice; different readers would pick different "
                "copies. Fix: save the checkpoint again with torch.save.",
                path,
            )
        seen.add(n)


def check_record(member: zipfile.ZipInfo, path: str) -> None:
    """Refuse encrypted records, unknown methods, and declared sizes no method can reach."""
    if member.flag_bits & 0x1:
        raise FileFormatError(
            f"the entry {member.filename!r} is encrypted. Fix: save the checkpoint "
            "again without encryption.",
            path,
        )
    if member.compress_type not in _METHODS:
        raise FileFormatError(
            f"the entry {member.filename!r} uses zip compression method {member.compress_type}, "
            "which is not supported (stored, deflate, bzip2 and lzma are). Fix: save the "
            "checkpoint again with torch.save, which stores records uncompressed.",
            path,
        )
    if member.compress_type != zipfile.ZIP_STORED and member.file_size > MAX_RATIO * max(
        member.compress_size, 1
    ):
        raise FileFormatError(
            f"the entry {member.filename!r} declares {member.file_size} bytes from "
            f"{member.compress_size} compressed bytes, a ratio over {MAX_RATIO}:1 (a "
            "decompression bomb, or a corrupt zip). Fix: save the checkpoint again with "
            "torch.save, which stores records uncompressed.",
            path,
        )


def record_start(fd: int, member: zipfile.ZipInfo, size: int, path: str) -> int:
    """Where ``member``'s (stored or compressed) bytes start in the file of ``size`` bytes."""
    header = bytearray(30)
    if member.header_offset + 30 > size:
        raise truncated(member, path)
    read_exact_into(fd, memoryview(header), member.header_offset, path)
    sig, *_, name_len, extra_len = struct.unpack("<4s5H3I2H", header)
    start = member.header_offset + 30 + name_len + extra_len
    if sig != b"PK\x03\x04" or start + member.compress_size > size:
        raise truncated(member, path)
    return start


def _decompressor(member: zipfile.ZipInfo, head: bytes, path: str) -> tuple[Any, int]:
    """A decompressor for ``member`` and how many leading bytes of its data it consumed."""
    if member.compress_type == zipfile.ZIP_DEFLATED:
        return zlib.decompressobj(-15), 0
    if member.compress_type == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor(), 0
    # zip's lzma: 2 bytes version, 2 bytes properties size, properties, raw LZMA1 data
    if len(head) < 4:
        raise truncated(member, path)
    psize = struct.unpack("<H", head[2:4])[0]
    if len(head) < 4 + psize:
        raise truncated(member, path)
    props = lzma._decode_filter_properties(lzma.FILTER_LZMA1, head[4 : 4 + psize])  # type: ignore[attr-defined]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[props]), 4 + psize


def inflate_into(
    fd: int, start: int, member: zipfile.ZipInfo, lo: int, out: memoryview, path: str
) -> None:
    """Decompress ``member`` (data at ``start`` in ``fd``) and fill ``out`` with its bytes
    ``lo .. lo + len(out)``. No step produces more than 64 KiB, nothing beyond the last
    byte asked for is produced, and the CRC is checked when the whole record is read."""
    hi = lo + len(out)
    if hi > member.file_size:
        raise truncated(member, path)
    end = start + member.compress_size
    pos = start
    head = os.pread(fd, min(64, member.compress_size), pos)
    dec, skip = _decompressor(member, head, path)
    pos += skip
    produced, crc, tail = 0, 0, b""
    is_zlib = member.compress_type == zipfile.ZIP_DEFLATED
    while produced < hi:
        want = min(_STEP, hi - produced)
        if is_zlib:
            if not tail and pos < end:
                tail = os.pread(fd, min(_STEP, end - pos), pos)
                pos += len(tail)
            chunk = dec.decompress(tail, want)
            tail = dec.unconsumed_tail
            stuck = not chunk and not tail and (pos >= end or dec.eof)
        else:
            data = b""
            if dec.needs_input and pos < end:
                data = os.pread(fd, min(_STEP, end - pos), pos)
                pos += len(data)
            stuck = dec.eof or (dec.needs_input and not data)
            chunk = b"" if stuck else dec.decompress(data, want)
        if not chunk:
            if stuck:
                raise truncated(member, path)
            continue
        crc = zlib.crc32(chunk, crc)
        a, b = max(lo - produced, 0), min(hi - produced, len(chunk))
        if a < b:
            out[produced + a - lo : produced + b - lo] = chunk[a:b]
        produced += len(chunk)
    if hi == member.file_size and crc != member.CRC:
        raise FileFormatError(
            f"the entry {member.filename!r} fails its CRC check. Fix: the checkpoint is "
            "corrupt; download or save it again.",
            path,
        )


def stored_data_offset(fd: int, member: zipfile.ZipInfo, size: int, path: str) -> int:
    """Where a stored record's bytes start in the file of ``size`` bytes open as ``fd``.

    Returns -1 for a compressed record (to be read through zipfile, which checks sizes
    and CRC). The local header is read and checked against the file size.
    """
    if member.flag_bits & 0x1:
        raise FileFormatError(
            f"the entry {member.filename!r} is encrypted. Fix: save the checkpoint "
            "again without encryption.",
            path,
        )
    if member.compress_type != zipfile.ZIP_STORED:
        return -1  # read through zipfile, which checks sizes and CRC
    header = bytearray(30)
    if member.header_offset + 30 > size:
        raise truncated(member, path)
    read_exact_into(fd, memoryview(header), member.header_offset, path)
    sig, *_, name_len, extra_len = struct.unpack("<4s5H3I2H", header)
    start = member.header_offset + 30 + name_len + extra_len
    if (
        sig != b"PK\x03\x04"
        or start + member.file_size > size
        or member.compress_size != member.file_size
    ):
        raise truncated(member, path)
    return start


def truncated(member: zipfile.ZipInfo, path: str) -> FileFormatError:
    """The error for a record whose local header is bad or whose data runs past the end."""
    return FileFormatError(
        f"the entry {member.filename!r} has a bad local header or runs past the end of the "
        "file. Fix: the checkpoint is truncated or corrupt; download or save it again.",
        path,
    )


# --- writing -----------------------------------------------------------------------


def _aligned_info(name: str, size: int, offset: int) -> zipfile.ZipInfo:
    """A stored ZipInfo whose data will start at a multiple of :data:`ALIGNMENT`.

    Padding goes into an extra field ``FB`` as torch's writer does. zipfile appends a
    20-byte zip64 extra when it decides (from ``file_size``) that zip64 is needed.
    """
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0
    base = offset + 30 + len(name.encode("utf-8")) + zip64 + 4
    pad = -base % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def add_record(zf: zipfile.ZipFile, f: Any, name: str, pieces: Sequence[Any], size: int) -> None:
    """Write one stored, aligned record ``name`` of ``size`` bytes into ``zf`` (on file ``f``)."""
    info = _aligned_info(name, size, f.tell())
    with zf.open(info, "w") as w:
        for piece in pieces:
            w.write(piece)
