"""Zip archives that Python's zipfile writes no way to make: members whose bytes overlap."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _npy(nbytes: int) -> bytes:
    """A version-1.0 .npy header for a uint8 array of ``nbytes`` (no data)."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({nbytes},), }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def _local(name: bytes, data: bytes) -> bytes:
    return (
        struct.pack(
            "<4s5H3L2H",
            b"PK\x03\x04",
            20,
            0,
            0,
            0,
            0x21,
            zlib.crc32(data),
            len(data),
            len(data),
            len(name),
            0,
        )
        + name
    )


def nested_npz(copies: int, payload: bytes) -> bytes:
    """``copies`` stored members, each a uint8 .npy whose data is the next member (its local
    header and data): every member's bytes lie inside the one before. The file is about
    ``len(payload) + 200 * copies`` bytes; reading every member returns about
    ``copies * len(payload)`` bytes."""
    names = [f"m{i}.npy".encode() for i in range(copies)]
    datas = [b""] * copies
    datas[-1] = _npy(len(payload)) + payload
    for i in range(copies - 2, -1, -1):
        inner = _local(names[i + 1], datas[i + 1]) + datas[i + 1]
        datas[i] = _npy(len(inner)) + inner
    body = _local(names[0], datas[0]) + datas[0]
    offsets = [0]
    for i in range(copies - 1):  # the next local header follows this member's .npy header
        inner = 30 + len(names[i + 1]) + len(datas[i + 1])
        offsets.append(offsets[i] + 30 + len(names[i]) + len(datas[i]) - inner)
    central = b""
    for name, data, offset in zip(names, datas, offsets, strict=True):
        central += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0,
                0,
                0,
                0x21,
                zlib.crc32(data),
                len(data),
                len(data),
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, copies, copies, len(central), len(body), 0)
    return body + central + end


def payload(nbytes: int) -> bytes:
    return np.arange(nbytes, dtype=np.uint8).tobytes()
