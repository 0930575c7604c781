"""GGUF against gguf-py (llama.cpp's own package): files it writes read bit-exact, files we
write read by its GGUFReader, every tensor type, both byte orders, every metadata type."""

from __future__ import annotations

import json
import os
import warnings

import ml_dtypes
import numpy as np
import pytest

import tensorbridge.files as tbf
from tensorbridge.errors import ConversionError, FileFormatError
from tensorbridge.formats import format_for_path
from tensorbridge.formats import gguf as tbg
from tensorbridge.formats import gguf_quants as tbq
from tensorbridge.formats.gguf_types import TYPES, TYPES_BY_NAME

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGUFEndian  # noqa: E402 - after importorskip
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

RNG = np.random.default_rng(12)
PLAIN = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}
#: types gguf-py dequantises (its _type_traits), besides the plain ones
REF_DEQUANTIZED = sorted(t.name for t in gguf.quants._type_traits)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _ref_dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf.quants.dequantize(raw, Q[name])


def _blocks(name: str, rows: int, nblocks: int) -> np.ndarray:
    """Plausible raw blocks: quantised from floats where gguf-py can, else random bytes."""
    t = TYPES_BY_NAME[name]
    if tbq.can_quantize(name):
        x = RNG.standard_normal((rows, nblocks * t.block_size)).astype(np.float32)
        return gguf.quants.quantize(x, Q[name])
    return RNG.integers(0, 256, (rows, nblocks * t.type_size), dtype=np.uint8)


def _writer(path, endian=GGUFEndian.LITTLE):
    w = gguf.GGUFWriter(str(path), "test", endianess=endian)
    return w


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_type_table_is_gguf_pys():
    assert {t.value: t.name for t in Q} == {k: v.name for k, v in TYPES.items()}
    for t in Q:
        assert GGML_QUANT_SIZES[t] == (TYPES[t.value].block_size, TYPES[t.value].type_size)


@pytest.mark.parametrize("name", REF_DEQUANTIZED)
def test_blocks_bit_exact_on_random_bytes(name):
    t = TYPES_BY_NAME[name]
    raw = RNG.integers(0, 256, (5, 3 * t.type_size), dtype=np.uint8)
    ref = _ref_dequantize(raw, name)
    got = tbq.dequantize(raw, name, ref.shape)
    assert got.dtype == np.float32 and _bits(got) == _bits(ref)


@pytest.mark.parametrize("name", sorted(tbq._WHOLE))
def test_piecewise_kernels_bit_exact_across_pieces(name, monkeypatch):
    """The K-quant and Q8_0 kernels work per block on the whole input, then per element in
    pieces: many random blocks (NaN, inf and subnormal scales among them) spanning several
    pieces, from an unaligned buffer, give gguf-py's bytes."""
    t = TYPES_BY_NAME[name]
    monkeypatch.setattr(tbq, "PIECE_ELEMENTS", 8 * t.block_size)
    raw = RNG.integers(0, 256, (3, 29 * t.type_size), dtype=np.uint8)
    ref = _ref_dequantize(raw, name)
    buf = np.empty(raw.size + 1, np.uint8)
    buf[1:] = raw.reshape(-1)
    unaligned = buf[1:].reshape(raw.shape)
    with np.errstate(all="raise"):  # no NumPy warnings escape for NaN/inf scales
        got = tbq.dequantize(unaligned, name, ref.shape)
    assert _bits(got) == _bits(ref)
    monkeypatch.undo()
    assert _bits(tbq.dequantize(raw, name, ref.shape)) == _bits(ref)


def test_every_type_reads_without_gguf_py(tmp_path):
    """Reading needs no gguf-py: every type it dequantises, in a process where importing
    gguf fails."""
    from tests.hostile.bounded import run_bounded

    p = tmp_path / "iq.gguf"
    w = _writer(p)
    for name in REF_DEQUANTIZED:
        if name != "BF16":  # read as stored (bfloat16), checked elsewhere
            w.add_tensor(name, _blocks(name, 2, 1), raw_dtype=Q[name])
    _finish(w)
    expected = {
        t.name: _bits(_ref_dequantize(t.data, t.name)) for t in gguf.GGUFReader(str(p)).tensors
    }
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "import tensorbridge as tb\n"
        "RESULT = {k: v.tobytes().hex() for k, v in tb.load(ARGS[0]).items()}\n"
        "assert 'gguf' not in sys.modules or sys.modules['gguf'] is None"
    )
    r = run_bounded(code, [str(p)], timeout=120, mem_limit=0)
    assert r.outcome == "ok", r.detail
    assert {k: bytes.fromhex(v) for k, v in r.result.items()} == expected


def test_every_gguf_py_type_read_bit_exact(tmp_path):
    """One file from GGUFWriter holding a tensor of every type; tensorbridge reads each
    as gguf-py's reader plus gguf.quants.dequantize does, bit for bit."""
    p = tmp_path / "all.gguf"
    w = _writer(p)
    expected = {}
    for name in REF_DEQUANTIZED:
        t = TYPES_BY_NAME[name]
        if name == "BF16":
            x = RNG.standard_normal((3, 4, 8)).astype(ml_dtypes.bfloat16)
            w.add_tensor(name, x.view(np.uint8), raw_dtype=Q.BF16)
            expected[name] = ("bfloat16", x.shape, _bits(x))
            continue
        raw = _blocks(name, 3, 2)
        w.add_tensor(name, raw, raw_dtype=Q[name])
        expected[name] = ("float32", (3, 2 * t.block_size), None)
    for name, np_type in PLAIN.items():
        x = (RNG.standard_normal((2, 3, 5)) * 100).astype(np_type)
        w.add_tensor(name, x)
        expected[name] = (np.dtype(np_type).name, x.shape, _bits(x))
    _finish(w)
    ref = {t.name: t for t in gguf.GGUFReader(str(p)).tensors}
    with tbf.open(p) as r:
        assert r.keys() == list(ref)
        for name, (dtype, shape, data) in expected.items():
            info = r.info(name)
            got = r.read(name)
            assert (info.dtype, info.shape, r.tensor_type(name)) == (dtype, shape, name)
            assert (str(got.dtype), got.shape) == (dtype, shape)
            if data is None:
                data = _bits(_ref_dequantize(ref[name].data, name))
            assert _bits(got) == data, name
            assert _bits(r.read_raw(name)) == _bits(ref[name].data)
    loaded = tbf.load(p)
    assert set(loaded) == set(expected)


def test_read_slice_reads_rows(tmp_path):
    p = tmp_path / "s.gguf"
    w = _writer(p)
    q = _blocks("Q4_K", 5, 2)
    w.add_tensor("q", q, raw_dtype=Q.Q4_K)
    x = RNG.standard_normal((4, 3, 2)).astype(np.float16)
    w.add_tensor("x", x)
    _finish(w)
    full = _ref_dequantize(q, "Q4_K")
    with tbf.open(p) as r:
        assert _bits(r.read_slice("q", slice(1, 4))) == _bits(full[1:4])
        assert _bits(r.read_slice("q", -1)) == _bits(full[-1]) and r.read_slice("q", 2).shape == (
            512,
        )
        assert _bits(r.read_slice("x", slice(2, None))) == _bits(x[2:])
        assert _bits(r.read_slice("x", 0)) == _bits(x[0]) and r.read_slice("x", 0).shape == (3, 2)
        assert r.read_slice("q", slice(3, 3)).shape == (0, 512)
        with pytest.raises(ConversionError, match="out of range"):
            r.read_slice("q", 5)


def test_concurrent_reads_of_one_reader(tmp_path, monkeypatch):
    """The reader lends its read buffer and work arrays to one read at a time; reads in
    other threads meanwhile use their own (several pieces per tensor, so they overlap)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(tbg, "_READ_CHUNK", 4 * 144)
    p = tmp_path / "c.gguf"
    w = _writer(p)
    raws = {n: _blocks(n, 8, 6) for n in ("Q4_K", "Q6_K", "Q8_0")}
    for n, raw in raws.items():
        w.add_tensor(n, raw, raw_dtype=Q[n])
    _finish(w)
    expected = {n: _bits(_ref_dequantize(raw, n)) for n, raw in raws.items()}
    barrier = threading.Barrier(3)
    with tbf.open(p) as r:

        def read(n):
            barrier.wait()
            return [_bits(r.read(n)) for _ in range(20)]

        with ThreadPoolExecutor(3) as pool:
            got = dict(zip(raws, pool.map(read, raws), strict=True))
    assert all(v == [expected[n]] * 20 for n, v in got.items())


def test_big_endian_file_reads_as_gguf_py_does(tmp_path):
    p = tmp_path / "be.gguf"
    w = _writer(p, GGUFEndian.BIG)
    w.add_uint32("n", 7)
    w.add_array("v", [1.5, -2.0])
    w.add_array("s", ["a", "bé"])
    xs = {
        "f32": RNG.standard_normal((2, 3)).astype(np.float32),
        "f16": RNG.standard_normal((4,)).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(3, 2),
    }
    for k, x in xs.items():
        w.add_tensor(k, x)
    q8 = gguf.quants.quantize(RNG.standard_normal((2, 64)).astype(np.float32), Q.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=Q.Q8_0)
    _finish(w)
    ref = gguf.GGUFReader(str(p))
    assert ref.endianess == GGUFEndian.BIG
    with tbf.open(p) as r:
        assert r.byteorder == "big"
        assert (
            r.metadata["n"].value,
            json.loads(r.metadata["v"]),
            json.loads(r.metadata["s"]),
        ) == (7, [1.5, -2.0], ["a", "bé"])
        for k, x in xs.items():
            got = r.read(k)
            assert got.dtype == x.dtype.newbyteorder("=") and _bits(got) == _bits(x)
            assert r.raw_span(k) is None  # big-endian bytes are not the canonical layout
        assert _bits(r.read("q8")) == _bits(_ref_dequantize(q8, "Q8_0"))


def test_metadata_every_value_type(tmp_path):
    p = tmp_path / "kv.gguf"
    w = _writer(p)
    w.add_uint8("u8", 255)
    w.add_int8("i8", -128)
    w.add_uint16("u16", 65535)
    w.add_int16("i16", -3)
    w.add_uint32("u32", 4_000_000_000)
    w.add_int32("i32", -5)
    w.add_float32("f32", 1e-5)
    w.add_bool("b", True)
    w.add_string("s", "héllo\x1b[31m")
    w.add_uint64("u64", 2**64 - 1)
    w.add_int64("i64", -(2**63))
    w.add_float64("f64", 0.1)
    tokens = [f"tok{i}" for i in range(5000)]
    w.add_array("tokens", tokens)
    w.add_key_value("scores", [0.5, -1.25], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
    w.add_key_value("flags", [True, False], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
    w.add_key_value("nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY)
    w.add_tensor("w", np.zeros((2, 2), np.float32))
    _finish(w)
    ref = gguf.GGUFReader(str(p))
    with tbf.open(p) as r:
        m = r.metadata
    assert m["general.architecture"] == "test"
    assert (m["u8"], m["i8"], m["u16"], m["i16"], m["u32"], m["i32"]) == (
        "255",
        "-128",
        "65535",
        "-3",
        "4000000000",
        "-5",
    )
    assert (m["f32"], m["b"], m["s"], m["u64"], m["i64"], m["f64"]) == (
        "1e-05",
        "true",
        "héllo\x1b[31m",
        str(2**64 - 1),
        str(-(2**63)),
        "0.1",
    )
    assert {k: v.gguf_type for k, v in m.items() if k in ("u8", "f32", "tokens")} == {
        "u8": "UINT8",
        "f32": "FLOAT32",
        "tokens": "ARRAY",
    }
    assert json.loads(m["tokens"]) == tokens == ref.fields["tokens"].contents()
    assert json.loads(m["scores"]) == [0.5, -1.25] and json.loads(m["flags"]) == [True, False]
    assert json.loads(m["nested"]) == [[1, 2], [3]]
    for key in ("u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "f64", "s"):
        assert m[key].value == ref.fields[key].contents(), key
    assert m["f32"].value == ref.fields["f32"].contents()
    assert len(repr(m["tokens"])) < 200 and len(repr(m)) < 4000  # bounded, however long


def test_our_files_read_by_gguf_py(tmp_path):
    p = tmp_path / "ours.gguf"
    tree = {
        name: (RNG.standard_normal((3, 4)) * 50).astype(np_type) for name, np_type in PLAIN.items()
    }
    tree["BF16"] = RNG.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    tree["vec"] = np.arange(5, dtype=np.float32)
    tree["scalar"] = np.float32(3.5)
    meta = {
        "general.architecture": "llama",
        "general.name": "x\ny",
        "ctx": tbg.value(4096, "uint32"),
        "eps": tbg.value(1e-5, "float32"),
        "toks": tbg.value(["a", "b"], "array", "string"),
        "ids": tbg.value([1, -2], "array", "int32"),
        "yes": tbg.value(True, "bool"),
    }
    tbf.save(tree, p, metadata=meta)
    ref = gguf.GGUFReader(str(p))
    by = {t.name: t for t in ref.tensors}
    for name, x in tree.items():
        t = by[name]
        assert t.tensor_type.name == tbg.PLAIN_DTYPES[np.asarray(x).dtype.name].name
        want = np.asarray(x).reshape(-1) if np.ndim(x) else np.asarray(x).reshape(1)
        got = t.data.view(np.uint8) if name == "BF16" else t.data
        assert _bits(got) == _bits(want)
        assert (
            tuple(int(d) for d in reversed(t.shape.tolist())) == (np.shape(x) or (1,))
            or np.ndim(x) == 0
        )
    f = ref.fields
    assert f["general.name"].contents() == "x\ny" and f["ctx"].contents() == 4096
    assert f["ctx"].types == [gguf.GGUFValueType.UINT32]
    assert f["eps"].contents() == np.float32(1e-5) and f["yes"].contents() is True
    assert f["toks"].contents() == ["a", "b"] and f["ids"].contents() == [1, -2]
    back = tbf.load(p)
    for name, x in tree.items():
        assert _bits(back[name]) == _bits(np.asarray(x)) and back[name].shape == np.shape(x)


@pytest.mark.parametrize("qname", tbg.QUANT_TYPES)
def test_quantise_bit_exact_to_gguf_py(tmp_path, qname):
    t = TYPES_BY_NAME[qname]
    x = RNG.standard_normal((4, 2 * t.block_size)).astype(np.float32)
    x[0, : t.block_size] = 0  # an all-zero block
    p = tmp_path / "q.gguf"
    tbf.save({"w": x, "norm": np.ones(8, np.float32)}, p, quantize=qname.lower())
    ref = {r.name: r for r in gguf.GGUFReader(str(p)).tensors}
    assert ref["w"].tensor_type.name == qname and ref["norm"].tensor_type.name == "F32"
    want = gguf.quants.quantize(x, Q[qname])
    assert _bits(ref["w"].data) == _bits(want)
    assert _bits(tbf.load(p)["w"]) == _bits(_ref_dequantize(want, qname))


def test_streaming_writer_quantises(tmp_path):
    import tensorbridge as tb

    p = tmp_path / "w.gguf"
    a, b = (RNG.standard_normal((2, 64)).astype(np.float32) for _ in range(2))
    with tb.Writer(p, metadata={"general.name": "w"}, quantize="q8_0") as w:
        w.append(x=a, n=np.arange(3, dtype=np.int32))
        w.append(x=b, n=np.arange(3, dtype=np.int32))
    ref = {t.name: t for t in gguf.GGUFReader(str(p)).tensors}
    assert _bits(ref["x"].data) == _bits(gguf.quants.quantize(np.concatenate([a, b]), Q.Q8_0))
    assert ref["n"].tensor_type == Q.I32 and ref["n"].data.tolist() == [0, 1, 2, 0, 1, 2]


def test_refusals_when_writing(tmp_path):
    p = tmp_path / "x.gguf"
    with pytest.raises(ConversionError, match="GGUF cannot store"):
        tbf.save({"u": np.zeros(2, np.uint8)}, p)
    with pytest.raises(ConversionError, match="at most 4"):
        tbf.save({"u": np.zeros((1,) * 5, np.float32)}, p)
    with pytest.raises(ConversionError, match="cannot quantise to 'q4_k'"):
        tbf.save({"u": np.zeros((2, 32), np.float32)}, p, quantize="q4_k")
    with pytest.raises(ConversionError, match="power of two"):
        tbf.save(
            {"u": np.zeros(2, np.float32)},
            p,
            metadata={"general.alignment": tbg.value(48, "uint32")},
        )
    assert not p.exists()
    with pytest.raises(ConversionError, match="UINT32"):
        tbg.value(-1, "uint32")


def test_alignment_from_metadata_is_used(tmp_path):
    p = tmp_path / "a.gguf"
    tbf.save(
        {"a": np.ones(3, np.float32), "b": np.ones(5, np.int16)},
        p,
        metadata={"general.alignment": "64"},
    )
    ref = gguf.GGUFReader(str(p))
    assert ref.alignment == 64 and all(t.data_offset % 64 == 0 for t in ref.tensors)
    assert tbf.open(p).metadata["general.alignment"].gguf_type == "UINT32"


def _model(tmp_path):
    """A small 'model': K-quant, Q8_0, F32 norm, F16; GGUFWriter made it."""
    p = tmp_path / "model.gguf"
    w = _writer(p)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hi"])
    w.add_tensor("blk.0.attn_q.weight", _blocks("Q4_K", 2, 1), raw_dtype=Q.Q4_K)
    w.add_tensor("blk.0.ffn.weight", _blocks("Q8_0", 4, 2), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.norm.weight", RNG.standard_normal(64).astype(np.float32))
    w.add_tensor("tok_embd.weight", RNG.standard_normal((3, 8)).astype(np.float16))
    _finish(w)
    return p


def test_gguf_to_gguf_copies_blocks_and_keeps_metadata(tmp_path):
    from tensorbridge.cli.convert_cmd import convert_file

    src = _model(tmp_path)
    dst = tmp_path / "sub.gguf"
    s = convert_file(str(src), str(dst), exclude=["tok_embd.*"])
    assert s["count"] == 3 and s["verified"] == 3
    a = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    b = gguf.GGUFReader(str(dst))
    assert [t.name for t in b.tensors] == [
        "blk.0.attn_q.weight",
        "blk.0.ffn.weight",
        "blk.0.norm.weight",
    ]
    for t in b.tensors:
        assert t.tensor_type == a[t.name].tensor_type and _bits(t.data) == _bits(a[t.name].data)
    assert b.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "</s>", "hi"]
    assert b.fields["general.name"].contents() == "tiny"


def test_gguf_to_gguf_verifies_blocks_without_dequantising(tmp_path, monkeypatch):
    """Copied blocks are checked by their bytes (a CRC of the source's blocks against the
    written ones), never dequantised: a flipped byte in a copy is still caught."""
    from tensorbridge.cli.convert_cmd import convert_file

    src = _model(tmp_path)
    calls = []
    real = tbq.dequantize_into
    monkeypatch.setattr(tbg, "dequantize_into", lambda *a, **k: calls.append(a[1]) or real(*a))
    dst = tmp_path / "copy.gguf"
    s = convert_file(str(src), str(dst), workers=1)
    assert s["verified"] == s["count"] == 4 and calls == []
    pairs = zip(gguf.GGUFReader(str(src)).tensors, gguf.GGUFReader(str(dst)).tensors, strict=True)
    for t, u in pairs:
        assert (t.name, t.tensor_type, _bits(t.data)) == (u.name, u.tensor_type, _bits(u.data))

    real_copy = tbg.copy_span

    def corrupting_copy(src_fd, span, dst_fd, at):
        real_copy(src_fd, span, dst_fd, at)
        byte = os.pread(dst_fd, 1, at + span.nbytes // 2)
        os.pwrite(dst_fd, bytes([byte[0] ^ 0x10]), at + span.nbytes // 2)

    monkeypatch.setattr(tbg, "copy_span", corrupting_copy)
    with pytest.raises(FileFormatError, match="verification failed"):
        convert_file(str(src), str(tmp_path / "bad.gguf"))
    assert calls == []


def test_convert_to_q8_0_and_to_other_formats(tmp_path):
    from tensorbridge.cli.convert_cmd import convert_file

    x = RNG.standard_normal((4, 64)).astype(np.float32)
    src = tmp_path / "src.safetensors"
    tbf.save({"w": x, "b": np.ones(4, np.float32)}, src, metadata={"k": "v"})
    q = tmp_path / "q.gguf"
    s = convert_file(str(src), str(q), dtype="q8_0")
    assert (s["verified"], s["cast"], s["dtype"]) == (2, 1, "q8_0")
    with pytest.raises(ConversionError, match="q8_0, q4_0"):
        convert_file(str(src), str(tmp_path / "k.gguf"), dtype="q4_k")
    ref = {t.name: t for t in gguf.GGUFReader(str(q)).tensors}
    assert _bits(ref["w"].data) == _bits(gguf.quants.quantize(x, Q.Q8_0))
    assert ref["b"].tensor_type == Q.F32
    model = _model(tmp_path)
    for suffix in (".safetensors", ".npz", ".h5", ".pt", ".zarr"):
        out = tmp_path / ("out" + suffix)
        convert_file(str(model), str(out))
        back = tbf.load(out)
        with tbf.open(model) as r:
            for name in r.keys():
                assert _bits(back[name]) == _bits(r.read(name)), (suffix, name)
    out = tmp_path / "bf.safetensors"
    convert_file(str(model), str(out), dtype="bfloat16")
    back = tbf.load(out)
    assert back["blk.0.attn_q.weight"].dtype == ml_dtypes.bfloat16
    meta = tbf.open(tmp_path / "out.safetensors").metadata
    assert json.loads(meta["tokenizer.ggml.tokens"]) == ["<s>", "</s>", "hi"]


def test_inspect_and_diff(tmp_path, capsys):
    from tensorbridge.cli import main
    from tensorbridge.cli.convert_cmd import convert_file

    model = _model(tmp_path)
    assert main(["inspect", "--json", "--stats", str(model)]) == 0
    doc = json.loads(capsys.readouterr().out)["files"][0]
    t = {e["name"]: e for e in doc["tensors"]}["blk.0.attn_q.weight"]
    assert (t["stored_type"], t["shape"], t["stored_nbytes"], t["bits_per_weight"]) == (
        "Q4_K",
        [2, 256],
        288,
        4.5,
    )
    assert (
        t["dtype"] == "float32"
        and t["stats"]["finite"] + t["stats"]["nan"] + t["stats"]["inf"] == 512
    )
    assert json.loads(doc["metadata"]["tokenizer.ggml.tokens"]) == ["<s>", "</s>", "hi"]
    assert main(["inspect", str(model)]) == 0
    text = capsys.readouterr().out
    assert "Q4_K" in text and "4.5" in text
    out = tmp_path / "m.safetensors"
    convert_file(str(model), str(out))
    assert main(["diff", str(model), str(out)]) == 0


def test_format_row_and_errors(tmp_path):
    assert format_for_path("m.gguf").name == "gguf"
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(FileFormatError, match="version 0"):
        tbf.open(p)


def test_long_numeric_arrays_are_summarised_and_kept_whole(tmp_path, monkeypatch):
    """Arrays of numbers stay NumPy arrays; past INLINE_ITEMS items (or the per-file
    budget) their text is a bounded summary, the whole JSON made only by full_text();
    GGUF -> GGUF keeps every item, as gguf-py reads it."""
    from tensorbridge.formats import gguf_meta

    monkeypatch.setattr(gguf_meta, "INLINE_ITEMS", 100)
    monkeypatch.setattr(gguf_meta, "INLINE_BUDGET", 150)
    p = tmp_path / "a.gguf"
    w = _writer(p)
    scores = (np.arange(300, dtype=np.float32) - 7.25) / 3
    A, F32, I32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.INT32
    w.add_key_value("scores", scores.tolist(), A, F32)
    w.add_key_value("small1", list(range(80)), A, I32)  # inline: 80 of the 150
    w.add_key_value("small2", list(range(80)), A, I32)  # past the budget: a summary
    w.add_key_value("nested", [[1, 2], list(range(120))], A, A)
    w.add_tensor("w", np.zeros((2, 2), np.float32))
    _finish(w)
    ref = gguf.GGUFReader(str(p))
    with tbf.open(p) as r:
        m = r.metadata
    s = m["scores"]
    assert not s.complete and len(s) < 300 and s.endswith("(300 FLOAT32 items)")
    assert s.startswith("[-2.4166667461395264, ")  # the first items, as exact float64 text
    assert s.value.dtype == np.dtype("<f4") and _bits(s.value) == _bits(scores)
    assert json.loads(s.full_text()) == ref.fields["scores"].contents()
    assert m["small1"].complete and json.loads(m["small1"]) == list(range(80))
    assert not m["small2"].complete and json.loads(m["small2"].full_text()) == list(range(80))
    assert not m["nested"].complete and m["nested"].endswith("(2 arrays)")
    assert json.loads(m["nested"].full_text()) == [[1, 2], list(range(120))]
    with pytest.raises(json.JSONDecodeError):  # a summary never parses as the value
        json.loads(s)
    q = tmp_path / "b.gguf"
    tbf.save({"w": np.zeros((2, 2), np.float32)}, q, metadata=m)
    got = gguf.GGUFReader(str(q)).fields
    for key in ("scores", "small1", "small2", "nested"):
        assert got[key].contents() == ref.fields[key].contents(), key
        assert got[key].types == ref.fields[key].types, key


def test_inspect_metadata_fits_the_terminal_and_is_whole_in_a_pipe(tmp_path, monkeypatch):
    """Metadata lines use the terminal's width (not a fixed 120 characters), escaped; piped,
    a value is printed whole up to 64k characters, then bounded."""
    from tests.test_cli_output import run_cli

    p = tmp_path / "m.gguf"
    w = _writer(p)
    template = "{% for m in messages %}\x1b[31m" + "x" * 400 + "\n{% endfor %}"
    w.add_string("tokenizer.chat_template", template)
    w.add_string("huge", "y" * 70_000)
    w.add_tensor("w", np.zeros((2, 2), np.float32))
    _finish(w)
    escaped = template.replace("\x1b", "\\x1b").replace("\n", "\\n")
    for columns in (200, 60):
        _, out, _ = run_cli(monkeypatch, ["inspect", p], mode="nocolor", columns=columns)
        line = next(x for x in out.splitlines() if "chat_template" in x)
        assert len(line) == columns and line.endswith("...") and "\x1b" not in line, line
        assert line[len("  tokenizer.chat_template: ") : -3] in escaped
    _, out, _ = run_cli(monkeypatch, ["inspect", p], mode="plain")
    lines = out.splitlines()
    assert f"  tokenizer.chat_template: {escaped}" in lines
    huge = next(x for x in lines if x.startswith("  huge: "))
    assert huge == "  huge: " + "y" * 65536 + "... (70000 characters)"


def test_summarised_arrays_compare_by_value(tmp_path, monkeypatch):
    """Two long arrays with the same first and last items (the same summary text) but a
    different middle are different metadata, for ``==`` and for ``diff``."""
    from tensorbridge.cli.diff_cmd import diff_files
    from tensorbridge.formats import gguf_meta

    monkeypatch.setattr(gguf_meta, "INLINE_ITEMS", 20)
    paths = []
    for i, middle in enumerate((5, 5, 6)):
        p = tmp_path / f"{i}.gguf"
        w = _writer(p)
        items = [1] * 20 + [middle] + [1] * 20
        w.add_key_value("a", items, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        w.add_key_value("n", [items, [2]], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY)
        w.add_tensor("w", np.zeros((2, 2), np.float32))
        _finish(w)
        paths.append(str(p))
    m = [tbf.open(p).metadata for p in paths]
    assert str(m[0]["a"]) == str(m[2]["a"]) and not m[0]["a"].complete  # one summary text
    assert m[0]["a"] == m[1]["a"] and m[0]["a"] != m[2]["a"] and m[0]["n"] != m[2]["n"]
    assert len({m[0]["a"], m[1]["a"]}) == 1  # hashable, equal values hash alike
    assert not diff_files(paths[0], paths[1])["metadata_differs"]
    assert diff_files(paths[0], paths[2])["metadata_differs"]
