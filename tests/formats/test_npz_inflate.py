"""Deflated .npz members are inflated into their arrays in pieces of INFLATE_CHUNK: a member
spanning several pieces (and ending inside one) reads exactly, and a corrupt byte in a
later piece is still refused by its CRC."""

from __future__ import annotations

import io
import zipfile
import zlib

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import FileFormatError
from tensorbridge.formats.npz import INFLATE_CHUNK


def big() -> np.ndarray:
    n = (3 * INFLATE_CHUNK + 20) // 4  # three pieces and the start of a fourth
    return np.random.default_rng(0).standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("writer", ["numpy", "tensorbridge"])
def test_a_member_of_several_pieces_reads_exactly(tmp_path, writer):
    a, b = big(), np.arange(7, dtype=np.int16)
    p = tmp_path / "c.npz"
    if writer == "numpy":
        np.savez_compressed(p, a=a, b=b)
    else:
        tb.save({"a": a, "b": b}, p, compress=True)
    with zipfile.ZipFile(p) as z:
        assert z.getinfo("a.npy").compress_type == zipfile.ZIP_DEFLATED
    for mmap in (None, False):
        got = tb.load(p, mmap=mmap)
        assert got["a"].tobytes() == a.tobytes() and got["b"].tobytes() == b.tobytes()


def test_a_corrupt_byte_in_a_later_piece_fails_the_crc(tmp_path):
    a = big()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a)
    good = buf.getvalue()
    bad = bytearray(good)
    bad[-5] ^= 0xFF  # in the last piece
    p = tmp_path / "c.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.npy", bytes(bad))
    # the archive now says the CRC of the good bytes, in both of its headers
    data = p.read_bytes()
    crc_bad = zlib.crc32(bytes(bad)).to_bytes(4, "little")
    assert data.count(crc_bad) == 2
    p.write_bytes(data.replace(crc_bad, zlib.crc32(good).to_bytes(4, "little")))
    with pytest.raises(FileFormatError, match="CRC"):
        tb.load(p)
