"""``load`` of a small ``.safetensors`` file (at most WHOLE_FILE_BYTES) reads it whole, with
one ``pread``, without a reader: the same bytes, dtypes, refusals and one-version promise
as the reader's way, checked here by forcing both ways on the same files."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

import tensorbridge as tb
from tensorbridge.errors import CheckpointChangedError, FileFormatError
from tensorbridge.formats import safetensors as st
from tensorbridge.formats.safetensors import WHOLE_FILE_BYTES

from .test_single_file_versions import rewrite_in_place, save_version, values, versions

N = 256  # floats per tensor: a file of about 2 KiB


def data_of(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def whole_reads(monkeypatch) -> list[int]:
    """Offsets and sizes of the reads of a whole file: a list filled as ``load`` runs."""
    real = os.preadv
    seen: list[int] = []

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        seen.append(len(buffers[0]))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    return seen


def test_a_small_file_is_read_with_one_read_and_no_reader(tmp_path, monkeypatch):
    p = str(tmp_path / "s.safetensors")
    save_version(p, "safetensors", 1.0, N)
    seen = whole_reads(monkeypatch)
    opened: list[str] = []
    monkeypatch.setattr(st.SafetensorsReader, "__init__", lambda *a: opened.append("reader"))
    got = tb.load(p)
    assert seen == [os.path.getsize(p)] and not opened
    assert values(got) == {1.0} and list(got) == ["a", "b"]
    assert got["a"].flags.writeable and got["a"].base is got["b"].base
    got["a"][0] = 9  # private: the file and the other array are unchanged
    assert tb.load(p, mmap=False)["a"][0] == 1.0 and got["b"][0] == 1.0


MIXED = {
    "h": np.arange(7, dtype=np.float16),  # 14 bytes: the next tensor starts misaligned
    "f": np.arange(5, dtype=np.float32),
    "d": np.arange(3, dtype=np.float64),
    "c": np.array([1 + 2j], np.complex64),
    "bf": np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16),
    "f8": np.arange(3, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
    "q": np.array([True, False, True]),
    "empty": np.zeros((0, 4), np.int64),
    "scalar": np.array(3.5, np.float32),
    "i": np.arange(-3, 3, dtype=np.int8).reshape(2, 3),
}


@pytest.mark.parametrize("mmap", [None, False, True])
def test_every_dtype_and_layout_reads_exactly_as_the_reader_does(tmp_path, mmap):
    p = str(tmp_path / "m.safetensors")
    tb.save(MIXED, p)
    assert os.path.getsize(p) <= WHOLE_FILE_BYTES
    got = tb.load(p, mmap=mmap)
    with tb.open(p) as r:
        want = {name: r.read(name) for name in r.keys()}
    assert list(got) == list(want)
    for name, arr in got.items():
        assert arr.dtype == want[name].dtype and arr.shape == want[name].shape, name
        assert arr.tobytes() == want[name].tobytes() == MIXED[name].tobytes(), name
        assert arr.flags.aligned and arr.flags.writeable, name
    torch_got = tb.load(p, to="torch", mmap=mmap)
    assert torch_got["bf"].dtype == torch.bfloat16
    assert torch_got["f"].numpy().tobytes() == MIXED["f"].tobytes()


def test_files_by_the_reference_writer_read_exactly(tmp_path):
    p = str(tmp_path / "ref.safetensors")
    tree = {"x": np.arange(10, dtype=np.float16), "y": np.arange(6, dtype=np.int32).reshape(2, 3)}
    safetensors.numpy.save_file(tree, p, metadata={"k": "v"})
    got = tb.load(p)
    ref = safetensors.numpy.load_file(p)
    assert list(got) == list(ref)
    assert all(got[k].tobytes() == ref[k].tobytes() and got[k].dtype == ref[k].dtype for k in ref)


def test_a_bool_byte_other_than_0_or_1_is_refused(tmp_path):
    p = str(tmp_path / "b.safetensors")
    tb.save({"q": np.array([True, False, True])}, p)
    raw = bytearray(data_of(p))
    raw[-1] = 7
    with open(p, "wb") as f:
        f.write(raw)
    with pytest.raises(FileFormatError, match="BOOL but holds bytes other than 0 and 1"):
        tb.load(p)


@pytest.mark.parametrize("cut", ["half", "same size"])
def test_a_file_rewritten_while_read_whole_is_read_again(tmp_path, monkeypatch, cut):
    p, data = versions(tmp_path, "safetensors", N)
    real = os.preadv
    fired: list[int] = []

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        if not fired:
            fired.append(offset)
            if cut == "half":  # a read cut short, then the file rewritten (np.save's way)
                n = real(fd, [memoryview(buffers[0])[: len(buffers[0]) // 2]], offset)
                rewrite_in_place(p, data)
                return n
            n = real(fd, buffers, offset)  # all read, then rewritten before the check
            rewrite_in_place(p, data)
            return n
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    got = tb.load(p)
    assert fired == [0]
    assert values(got) == {2.0}  # read again: the new version, whole


def test_a_file_rewritten_at_every_read_gives_up_with_a_clear_error(tmp_path, monkeypatch):
    p = str(tmp_path / "v.safetensors")
    save_version(p, "safetensors", 1.0, N)
    data = data_of(p)
    real = os.preadv
    reads: list[int] = []

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        reads.append(offset)
        n = real(fd, buffers, offset)
        rewrite_in_place(p, data)  # same bytes, but a new version each time
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    with pytest.raises(CheckpointChangedError, match="Fix: load it again"):
        tb.load(p)
    assert len(reads) == 3


def test_a_file_replaced_while_read_whole_is_not_a_change(tmp_path, monkeypatch):
    p, _ = versions(tmp_path, "safetensors", N)
    other = str(tmp_path / "other.safetensors")  # (version 2, which versions() wrote)
    real = os.preadv
    reads: list[int] = []

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        if not reads:
            os.replace(other, p)  # an atomic save: a new inode at the path
        reads.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    got = tb.load(p)
    assert values(got) == {1.0} and reads == [0]  # the version opened, read once
    assert values(tb.load(p)) == {2.0}


def test_a_header_half_written_is_read_again_not_called_corrupt(tmp_path, monkeypatch):
    p, data = versions(tmp_path, "safetensors", N, shift=True)  # (another header length)
    real = os.preadv
    fired: list[int] = []

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        if not fired:  # the read sees a header cut in the middle of its JSON
            fired.append(offset)
            buffers[0][:40] = data[:40]
            n = real(fd, [memoryview(buffers[0])[40:]], offset + 40) + 40
            rewrite_in_place(p, data)
            return n
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    assert values(tb.load(p)) == {2.0} and fired


def test_a_directory_with_a_file_suffix_is_still_a_checkpoint(tmp_path):
    d = tmp_path / "model.safetensors"
    tb.save({"w": np.ones(3, np.float32)}, str(tmp_path / "ck") + "/")
    os.rename(tmp_path / "ck", d)  # (tensorbridge would not write a checkpoint there)
    assert os.path.isdir(d)
    assert tb.load(str(d))["w"].tolist() == [1, 1, 1]


def test_refusals_are_those_of_the_reader(tmp_path):
    fifo = str(tmp_path / "f.safetensors")
    os.mkfifo(fifo)
    with pytest.raises(FileFormatError, match="not a regular file"):
        tb.load(fifo)
    with pytest.raises(FileFormatError, match="cannot open the file"):
        tb.load(str(tmp_path / "missing.safetensors"))
    short = str(tmp_path / "short.safetensors")
    with open(short, "wb") as f:
        f.write(b"\x05\x00")
    with pytest.raises(FileFormatError, match="shorter than the 8-byte header length"):
        tb.load(short)
    lying = str(tmp_path / "lying.safetensors")
    with open(lying, "wb") as f:
        f.write((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(FileFormatError, match="larger than the rest of the file"):
        tb.load(lying)


def test_larger_files_go_through_the_reader(tmp_path, monkeypatch):
    p = str(tmp_path / "big.safetensors")
    tb.save({"a": np.ones(WHOLE_FILE_BYTES // 4, np.float32)}, p)
    opened: list[str] = []
    real = st.SafetensorsReader.__init__

    def init(self, path):  # type: ignore[no-untyped-def]
        opened.append(path)
        real(self, path)

    monkeypatch.setattr(st.SafetensorsReader, "__init__", init)
    assert tb.load(p, mmap=False)["a"].sum() == WHOLE_FILE_BYTES // 4 and opened == [p]


def raw_file(path: str, header: bytes, data: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)


def test_mmap_takes_true_false_or_none_only(tmp_path):
    p = str(tmp_path / "s.safetensors")
    save_version(p, "safetensors", 1.0, N)
    with pytest.raises(tb.ConversionError, match="mmap='no'.*pass mmap=True, mmap=False"):
        tb.load(p, mmap="no")
    with pytest.raises(tb.ConversionError, match="mmap=1"):
        tb.load(p, mmap=1)
    mapped = tb.load(p, mmap=np.True_)["a"]  # NumPy's True maps, as True does
    rewrite_in_place(p, data_of(p).replace(np.float32(1).tobytes(), np.float32(3).tobytes()))
    assert mapped[0] == 3.0


def test_a_header_starting_with_a_bom_is_named(tmp_path):
    p = str(tmp_path / "bom.safetensors")
    raw_file(p, "\ufeff{}".encode())
    with pytest.raises(FileFormatError, match="Unexpected UTF-8 BOM"):
        tb.load(p)


def test_an_unsafe_name_is_refused_before_any_entry_is_checked(tmp_path):
    p = str(tmp_path / "names.safetensors")
    raw_file(p, b'{"a":{"dtype":"F32"},"../b":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}')
    with pytest.raises(tb.UnsafeContentError, match="'../b'"):
        tb.load(p)
