"""GGUF cases found by a review against gguf-py: inputs the main GGUF tests do not have."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tensorbridge.files as tbf
from tensorbridge.formats.gguf_types import TYPES_BY_NAME

gguf = pytest.importorskip("gguf")
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402 - after importorskip

RNG = np.random.default_rng(1212)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _ref_dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf.quants.dequantize(raw, Q[name])


def _write(path, tensors: dict) -> None:
    w = gguf.GGUFWriter(str(path), "test")
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "IQ4_NL", "TQ1_0"])
def test_slices_of_a_quantised_vector_start_inside_a_block(tmp_path, type_name):
    """A 1-D quantised tensor's rows are elements: a slice starting or ending inside a block
    (``a[1:]``, ``a[-1]``, ``a[..., 3]``) used to dequantise from the block's start, giving
    the wrong values shifted by up to a block."""
    t = TYPES_BY_NAME[type_name]
    n = 3 * t.block_size
    raw = RNG.integers(0, 256, n // t.block_size * t.type_size, dtype=np.uint8)
    if type_name == "Q8_0":  # finite scales, so every value is a number
        raw = gguf.quants.quantize(RNG.standard_normal(n).astype(np.float32), Q.Q8_0)
    p = tmp_path / "v.gguf"
    _write(p, {"v": (raw, Q[type_name])})
    full = _ref_dequantize(raw, type_name)
    assert full.shape == (n,)
    bs = t.block_size
    with tbf.open(p) as r:
        a = r.array("v")
        assert _bits(r.read("v")) == _bits(full)
        for s in (slice(1, None), slice(bs - 1, bs + 1), slice(5, 2 * bs + 7), slice(bs, 2 * bs)):
            assert _bits(r.read_slice("v", s)) == _bits(full[s]), s
            assert _bits(a[s]) == _bits(full[s]), s
        for i in (0, 1, bs - 1, bs, n - 1, -1, -bs - 1):
            got = r.read_slice("v", i)
            assert got.shape == () and _bits(got) == _bits(full[i]), i
            assert _bits(a[i]) == _bits(full[i]), i
        assert _bits(a[..., 3]) == _bits(full[..., 3])
        assert _bits(a[::-1]) == _bits(full[::-1])
        assert a[7:7].shape == (0,)


def _two_quantisations(tmp_path):
    """One model three ways: Q8_0 + a Q8_1 tensor (which nothing dequantises), the same
    file again, and the same weights as Q4_0 with the Q8_1 tensor's blocks changed."""
    w = RNG.standard_normal((4, 64)).astype(np.float32)
    q81 = RNG.integers(0, 256, (2, 2 * 40), dtype=np.uint8)
    q81_changed = q81.copy()
    q81_changed[1, 5] ^= 1
    norm = RNG.standard_normal(64).astype(np.float32)
    paths = []
    for name, wq, wt, raw in (
        ("a", gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0, q81),
        ("b", gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0, q81),
        ("c", gguf.quants.quantize(w, Q.Q4_0), Q.Q4_0, q81_changed),
    ):
        p = tmp_path / f"{name}.gguf"
        _write(p, {"w": (wq, wt), "raw": (raw, Q.Q8_1), "norm": (norm, None)})
        paths.append(str(p))
    return paths


def test_diff_gguf_quantisations_compares_blocks_and_names_stored_types(tmp_path, capsys):
    """diff of two GGUFs: identical blocks are the same without dequantising (a Q8_1 tensor,
    which nothing dequantises, made diff fail with status 2 even on a file and its copy);
    changed blocks of such a type are "different" without numbers; the table names the
    stored types (Q8_0 vs Q4_0), not float32 twice."""
    import json

    from tensorbridge.cli import main

    a, b, c = _two_quantisations(tmp_path)
    with tbf.open(a) as r, pytest.raises(Exception, match="no known dequantisation"):
        r.read("raw")
    assert main(["diff", a, b]) == 0
    assert "same: 3 tensors match" in capsys.readouterr().out
    assert main(["diff", "--json", a, c]) == 1
    doc = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert doc["raw"]["status"] == "different" and doc["raw"]["mismatches"] is None
    assert (doc["raw"]["stored_type_a"], doc["raw"]["stored_type_b"]) == ("Q8_1", "Q8_1")
    assert doc["w"]["status"] == "different" and doc["w"]["mismatches"] > 0
    assert (doc["w"]["stored_type_a"], doc["w"]["stored_type_b"]) == ("Q8_0", "Q4_0")
    assert doc["norm"]["status"] == "same" and "stored_type_a" not in doc["norm"]
    assert main(["diff", a, c]) == 1
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("w "))
    assert "Q8_0[4,64]" in row and "Q4_0[4,64]" in row
    # against a dequantised export: values compared as before, the GGUF side named
    out = tmp_path / "a.safetensors"
    assert main(["convert", "--exclude", "raw", a, str(out)]) == 0
    capsys.readouterr()
    assert main(["diff", "--exclude", "raw", a, str(out)]) == 0


def test_inspect_stats_of_a_type_nothing_dequantises(tmp_path, capsys):
    """inspect --stats of a GGUF holding one Q8_1 tensor failed as a whole (status 2); now
    that tensor's stats are '-' with the reason, the others computed; the total line gives
    the stored size (what the file holds) besides the size as read (float32)."""
    import json

    from tensorbridge.cli import main

    a = _two_quantisations(tmp_path)[0]
    assert main(["inspect", "--stats", a]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("raw "))
    assert row.split()[-6:] == ["-"] * 6
    assert "no stats: raw:" in text and "no known dequantisation" in text
    stored = 4 * 2 * 34 + 2 * 2 * 40 + 64 * 4
    read = 4 * 64 * 4 + 2 * 64 * 4 + 64 * 4
    assert (stored, read) == (688, 1792)
    assert "total: 3 tensors, 688 B stored (688 bytes), 1.8 KiB as read" in text
    assert main(["inspect", "--json", "--stats", a]) == 0
    doc = json.loads(capsys.readouterr().out)["files"][0]
    t = {e["name"]: e for e in doc["tensors"]}
    assert t["raw"]["stats"] is None and "Q8_1" in t["raw"]["stats_error"]
    assert t["w"]["stats"]["finite"] == 256
    assert (doc["total_stored_nbytes"], doc["total_nbytes"]) == (stored, read)


def test_a_tensor_name_too_long_to_read_back_is_refused_on_write(tmp_path):
    """tb.save wrote a 70,000-byte tensor name that its own reader (names up to 65535
    bytes, as keys) then refused: the writer refuses it first, and leaves no file."""
    from tensorbridge.errors import ConversionError

    p = tmp_path / "x.gguf"
    ok = "é" * 32767  # 65534 bytes: still written and read back
    tbf.save({ok: np.ones(2, np.float32)}, p)
    assert list(tbf.load(p)) == [ok]
    assert [t.name for t in gguf.GGUFReader(str(p)).tensors] == [ok]
    p.unlink()
    with pytest.raises(ConversionError, match="70000 bytes; GGUF readers take at most 65535"):
        tbf.save({"x" * 70000: np.ones(2, np.float32)}, p)
    assert not p.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("tid", "name"), [(31, "Q4_0_4_4"), (36, "IQ4_NL_4_4"), (4, "Q4_2")])
def test_removed_repacked_types_are_named(tmp_path, tid, name):
    """Q4_0_4_4 & co. (ARM repacks llama.cpp wrote in 2024, then removed) were reported as
    "unknown ggml type 31 ... from a newer llama.cpp", the opposite of the truth."""
    import struct

    from tensorbridge.errors import FileFormatError

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    head += struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 32, tid, 0)
    p = tmp_path / "old.gguf"
    p.write_bytes(head + bytes(-len(head) % 32) + bytes(64))
    with pytest.raises(FileFormatError, match=f"is {name} \\(ggml type {tid}\\).*removed"):
        tbf.open(p)


def test_unsigned_tensor_refusal_gives_a_fix_that_works(tmp_path, capsys):
    """convert of a uint8 tensor to GGUF said "cast it first (--dtype ...)", but --dtype
    leaves ints alone; the fix now names --exclude (which works) or a cast in Python."""
    from safetensors.numpy import save_file

    from tensorbridge.cli import main

    src = tmp_path / "u.safetensors"
    save_file({"u": np.arange(64, dtype=np.uint8).reshape(2, 32), "w": np.ones((2, 32))}, src)
    dst = tmp_path / "u.gguf"
    assert main(["convert", "--dtype", "q8_0", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "'uint8', which GGUF cannot store" in err and "--exclude NAME" in err
    assert "--dtype" not in err.split("Fix:")[1] and not dst.exists()
    assert main(["convert", "--dtype", "q8_0", "--exclude", "u", str(src), str(dst)]) == 0
    assert [t.tensor_type.name for t in gguf.GGUFReader(str(dst)).tensors] == ["Q8_0"]


def test_a_huge_alignment_is_not_written(tmp_path, capsys):
    """A 90-byte GGUF declaring general.alignment 2**30 (valid to read: nothing is
    allocated) converted to GGUF made a 1 GiB file, padding the header to the alignment
    (and tb.save with it, 1 GiB of memory): writing refuses alignments over 2**20."""
    import struct

    from tensorbridge.cli import main
    from tensorbridge.errors import ConversionError
    from tensorbridge.formats.gguf import value

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    src = tmp_path / "a.gguf"
    kv = s("general.alignment") + struct.pack("<II", 4, 2**30)
    src.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + s("z") + struct.pack("<IQIQ", 1, 0, 0, 0)
    )
    with tbf.open(src) as r:
        assert r.alignment == 2**30 and r.read("z").shape == (0,)
    dst = tmp_path / "b.gguf"
    assert main(["convert", str(src), str(dst)]) == 2
    assert "general.alignment 1073741824 is not a power of two up to 1048576" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]
    with pytest.raises(ConversionError, match="up to 1048576"):
        tbf.save(
            {"a": np.ones(3, np.float32)},
            dst,
            metadata={"general.alignment": value(2**21, "uint32")},
        )
    tbf.save(
        {"a": np.ones(3, np.float32)}, dst, metadata={"general.alignment": value(2**20, "uint32")}
    )
    assert dst.stat().st_size == 2 * 2**20 and tbf.load(dst)["a"].tolist() == [1.0] * 3


def test_a_quantised_tensor_without_dimensions_is_refused(tmp_path):
    """A Q8_0 tensor with n_dims 0 was taken as one element stored in 0 bytes: read()
    returned an uninitialised float and read_raw() read 34 bytes it does not own."""
    import struct

    from tensorbridge.errors import FileFormatError

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    head += struct.pack("<Q", 1) + b"q" + struct.pack("<IIQ", 0, 8, 0)
    p = tmp_path / "q.gguf"
    p.write_bytes(head + bytes(-len(head) % 32) + b"\x11" * 64)
    with pytest.raises(FileFormatError, match="Q8_0 with no dimensions"):
        tbf.open(p)


def test_key_and_tensor_counts_are_capped_before_anything_is_read(tmp_path):
    """Each key or tensor costs hundreds of bytes of memory for a few bytes of file: the
    header's counts are refused past the caps, before the entries are parsed."""
    import struct

    from tensorbridge.errors import ConversionError, UnsafeContentError
    from tensorbridge.formats.gguf_meta import MAX_KEYS, MAX_TENSORS

    def header(n_tensors: int, n_kv: int) -> bytes:
        return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)

    for n_tensors, n_kv in [(0, MAX_KEYS + 1), (MAX_TENSORS + 1, 0)]:
        p = tmp_path / f"many-{n_tensors}-{n_kv}.gguf"
        p.write_bytes(header(n_tensors, n_kv) + bytes(n_kv * 13 + n_tensors * 24))
        with pytest.raises(UnsafeContentError, match="at most"):
            tbf.open(p)
    many = {f"k{i}": "v" for i in range(MAX_KEYS + 1)}
    with pytest.raises(ConversionError, match="at most"):
        tbf.save({"w": np.zeros(2, np.float32)}, tmp_path / "w.gguf", metadata=many)
    assert not (tmp_path / "w.gguf").exists()
