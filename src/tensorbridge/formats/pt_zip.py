"""The zip layout of a ``torch.save`` checkpoint: validating it, locating and writing records.

Every entry sits under one top-level folder (``archive/`` when tensorbridge writes);
``NAME/data.pkl`` is the pickle and ``NAME/data/KEY`` the raw bytes of storage KEY.
Records are stored uncompressed and start at multiples of :data:`ALIGNMENT`, as
torch's writer does, so ``torch.load(mmap=True)`` can map them; when reading, a
stored record's bytes are located through its local header and read directly.
"""

from __future__ import annotations

import struct
import zipfile
from typing import Any, Sequence

from ..errors import FileFormatError, UnsafeContentError
from .safetensors import read_exact_into

__all__ = [
    "ALIGNMENT",
    "ARCHIVE",
    "add_record",
    "check_magic",
    "check_unique_members",
    "find_prefix",
    "stored_data_offset",
    "truncated",
]

#: Data records start at multiples of this (as torch's writer does; needed for mmap).
ALIGNMENT = 64
#: Archive folder name used when writing (torch uses this for file objects).
ARCHIVE = "archive"


# --- reading -----------------------------------------------------------------------

def check_magic(head: bytes, size: int, path: str) -> None:
    if size == 0:
        raise FileFormatError(
            "the file is empty. Fix: save the checkpoint again; it was never written or "
            "was truncated to nothing.", path)
    if head[:1] == b"\x80":
        raise FileFormatError(
            "this is a legacy (pre-1.6, non-zip) PyTorch checkpoint: one raw pickle, which "
            "cannot be read without running pickle. Fix: in a trusted environment, load it "
            "with torch and save it again with a modern torch (torch.save(obj, path) writes "
            "the zip format), or as safetensors.", path)
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise FileFormatError(
            f"the file starts with {head[:8]!r}, not a zip signature, so it is not a PyTorch "
            "checkpoint (torch.save writes a zip archive). Fix: check the file type.", path)


def find_prefix(names: list[str], path: str) -> str:
    first = names[0] if names else ""
    if "/" not in first:
        raise FileFormatError(
            f"the zip has no top-level folder (first entry {first!r}); this is a zip, but not a "
            "PyTorch checkpoint. Fix: pass a file written by torch.save.", path)
    prefix = first.split("/", 1)[0] + "/"
    if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
        raise UnsafeContentError(
            "this is a TorchScript archive (torch.jit.save): a compiled program, not a "
            "checkpoint of tensors. Fix: in a trusted environment, load it with torch.jit.load "
            "and save its tensors with torch.save(module.state_dict(), path) or safetensors.",
            path)
    if prefix + "data.pkl" not in names:
        raise FileFormatError(
            f"the zip has no {prefix + 'data.pkl'!r} entry, so it is not a PyTorch checkpoint. "
            "Fix: pass a file written by torch.save.", path)
    return prefix


def check_unique_members(names: list[str], path: str) -> None:
    """A zip holding one entry name twice is ambiguous: readers disagree on which wins."""
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UnsafeContentError(
                f"the zip holds the entry {n!r} twice; different readers would pick different "
                "copies. Fix: save the checkpoint again with torch.save.", path)
        seen.add(n)


def stored_data_offset(fd: int, member: zipfile.ZipInfo, size: int, path: str) -> int:
    """Where a stored record's bytes start in the file of ``size`` bytes open as ``fd``.

    Returns -1 for a compressed record (to be read through zipfile, which checks sizes
    and CRC). The local header is read and checked against the file size.
    """
    if member.flag_bits & 0x1:
        raise FileFormatError(
            f"the entry {member.filename!r} is encrypted. Fix: save the checkpoint "
            "again without encryption.", path)
    if member.compress_type != zipfile.ZIP_STORED:
        return -1  # read through zipfile, which checks sizes and CRC
    header = bytearray(30)
    if member.header_offset + 30 > size:
        raise truncated(member, path)
    read_exact_into(fd, memoryview(header), member.header_offset, path)
    sig, *_, name_len, extra_len = struct.unpack("<4s5H3I2H", header)
    start = member.header_offset + 30 + name_len + extra_len
    if sig != b"PK\x03\x04" or start + member.file_size > size \
            or member.compress_size != member.file_size:
        raise truncated(member, path)
    return start


def truncated(member: zipfile.ZipInfo, path: str) -> FileFormatError:
    """The error for a record whose local header is bad or whose data runs past the end."""
    return FileFormatError(
        f"the entry {member.filename!r} has a bad local header or runs past the end of the "
        "file. Fix: the checkpoint is truncated or corrupt; download or save it again.",
        path)


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
