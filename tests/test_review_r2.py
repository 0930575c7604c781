"""Inputs a new user tries that the GGUF and MLX/array-protocol tests did not cover."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tensorbridge as tb


def test_quantize_overflowing_block_like_gguf_py_without_warnings(tmp_path):
    """A weight past float16's range times 127 overflows the Q8_0 scale to inf (as in
    gguf-py); with warnings as errors (pytest's filterwarnings=error, or -W error) the
    save must not fail on NumPy's RuntimeWarning, and the blocks stay gguf-py's."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    x = np.ones((2, 64), np.float32)
    x[0, :32] = 1e7  # scale 1e7/127 > float16 max: inf in gguf-py too
    x[1, 5] = np.nan
    for qt in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
        p = tmp_path / f"{qt}.gguf"
        tb.save({"w": x}, p, quantize=qt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = quantize(x, gguf.GGMLQuantizationType[qt.upper()])
        (t,) = gguf.GGUFReader(p).tensors
        assert t.data.tobytes() == ref.tobytes(), qt


def test_read_slice_other_index_says_what_it_takes(tmp_path):
    """A tuple or list index is not 'out of range': it is an index read_slice does not take,
    and a long list is not echoed back whole in the message."""
    p = tmp_path / "x.safetensors"
    tb.save({"w": np.arange(12, dtype=np.float32).reshape(4, 3)}, p)
    with tb.open(p) as r:
        for index in [(slice(1, 3), slice(0, 2)), list(range(100_000)), (Ellipsis, 1), 1.0]:
            with pytest.raises(tb.ConversionError, match=r"takes an int or a slice of ints") as exc:
                r.read_slice("w", index)
            assert "out of range" not in str(exc.value) and len(str(exc.value)) < 400
        with pytest.raises(tb.ConversionError, match="out of range.*with 4 rows"):
            r.read_slice("w", 4)
        assert r.read_slice("w", np.int64(-1)).tolist() == [9, 10, 11]


@pytest.mark.parametrize(
    "args",
    [
        (1e40, "float32"),
        ([1, "x"], "array", "int32"),
        ([300], "array", "uint8"),
        ([1e40], "array", "float32"),
        ([[1, 2], [3]], "array", "int32"),
    ],
)
def test_gguf_value_out_of_its_type_is_a_conversion_error(args):
    """Like value(300, 'uint8'): a typed GGUF value that its type cannot hold is refused
    with tensorbridge's error and a fix, not a bare OverflowError/ValueError (or inf)."""
    from tensorbridge.formats.gguf import value

    with pytest.raises(tb.ConversionError, match="cannot be stored as GGUF.*Fix:"):
        value(*args)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_save_quantize_from_a_half_precision_checkpoint(tmp_path, dtype):
    """save(tree, 'x.gguf', quantize='q8_0') of a bfloat16/float16 state dict (the usual
    Hugging Face checkpoint) quantises it as gguf-py does from its float32 values; it used
    to fail with 'announced as float32 but fetch() returned bfloat16'."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    from tensorbridge.dtypes import lookup

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 64)).astype(lookup(dtype).numpy)
    norm = np.ones(64, lookup(dtype).numpy)  # a vector stays as it is
    for qt in ("q8_0", "q4_1"):
        p = tmp_path / f"{qt}.gguf"
        tb.save({"w": x, "norm": norm}, p, quantize=qt)
        ts = {t.name: t for t in gguf.GGUFReader(p).tensors}
        want = quantize(x.astype(np.float32), gguf.GGMLQuantizationType[qt.upper()])
        assert ts["w"].tensor_type.name == qt.upper()
        assert ts["w"].data.tobytes() == want.tobytes()
        assert tb.load(p)["norm"].dtype == norm.dtype


def test_writer_quantize_from_bfloat16_batches(tmp_path):
    """The streaming Writer (quantize='q8_0') takes bfloat16 batches like save() does."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    from tensorbridge.writer import Writer

    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((2, 32)).astype(ml_dtypes.bfloat16) for _ in range(3)]
    p = tmp_path / "w.gguf"
    with Writer(p, quantize="q8_0") as w:
        for b in batches:
            w.append(x=b)
    (t,) = gguf.GGUFReader(p).tensors
    want = quantize(np.concatenate(batches).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    assert t.data.tobytes() == want.tobytes()


def test_a_key_gguf_py_uses_for_the_header_is_refused_on_write(tmp_path):
    import numpy as np
    import pytest

    import tensorbridge as tb
    from tensorbridge.errors import ConversionError

    for key in ("GGUF.version", "GGUF.kv_count"):
        with pytest.raises(ConversionError, match="rename the key"):
            tb.save({"w": np.ones(4, np.float32)}, tmp_path / "x.gguf", metadata={key: "1"})
    assert not (tmp_path / "x.gguf").exists()
    tb.save({"w": np.ones(4, np.float32)}, tmp_path / "x.gguf", metadata={"GGUF.note": "ok"})
    import gguf

    assert "GGUF.note" in gguf.GGUFReader(tmp_path / "x.gguf").fields
