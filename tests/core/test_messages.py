"""Messages that say what is wrong and how to fix it, and no raw warnings or exceptions."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

import tensorbridge as tb

jax = pytest.importorskip("jax")


@pytest.mark.parametrize(
    "name,bits,kind",
    [
        ("int4", 4, "integer"),
        ("uint4", 4, "integer"),
        ("int2", 2, "integer"),
        ("float4_e2m1fn", 4, "float"),
        ("float6_e2m3fn", 6, "float"),
        ("float6_e3m2fn", 6, "float"),
    ],
)
def test_sub_byte_ml_dtypes_are_named_as_what_they_are(name, bits, kind):
    a = np.zeros(2, getattr(ml_dtypes, name))
    with pytest.raises(tb.ConversionError) as err:
        tb.to_torch(a)
    text = str(err.value)
    assert (
        f"{name} (ml_dtypes): it is a {bits}-bit {kind} type" in text and "not numeric" not in text
    )
    assert ("np.float32" if kind == "float" else "np.int8") in text


def test_jax_float0_is_explained():
    with pytest.raises(tb.ConversionError, match="float0 is the dtype JAX gives gradients"):
        tb.to_torch(np.zeros(2, jax.dtypes.float0))


def test_the_fix_for_complex32_keeps_the_imaginary_part():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        z = torch.tensor([1 + 2j], dtype=torch.complex64).to(torch.complex32)
    with pytest.raises(tb.ConversionError, match=r"t\.to\(torch\.complex64\)") as err:
        tb.to_numpy(z)
    assert "float32" not in str(err.value)


def test_load_to_jax_names_the_tensor_it_cannot_convert(tmp_path):
    p = tmp_path / "m.safetensors"
    tb.save({"ok": np.ones(2, np.float32), "w64": np.ones(2)}, p)
    was = jax.config.jax_enable_x64  # the suite turns 64-bit types on (conftest)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(
            tb.ConversionError, match=r"^at \['w64'\]: Cannot handle a float64 array for JAX"
        ):
            tb.load(p, to="jax")
    finally:
        jax.config.update("jax_enable_x64", was)


def test_explain_of_a_python_scalar_says_it_is_a_new_tensor():
    for to in ("torch", "numpy", "jax"):
        plan = tb.explain(2.5, to=to)
        assert plan.independent and "shares memory" not in str(plan), to
        assert str(plan).startswith("Python float 2.5 as "), str(plan)


def test_tree_plans_say_whether_they_copy():
    shared = tb.explain({"a": torch.ones(2), "b": [np.ones(2)]}, to="numpy")
    assert shared.copies is False and shared.independent is False
    copied = tb.explain({"a": torch.ones(2), "b": [np.ones(2)]}, to="numpy", copy=True)
    assert copied.copies is True and copied.independent is True
    mixed = tb.explain(
        {"a": torch.ones(2, requires_grad=True), "b": torch.ones(2).to_sparse()}, to="numpy"
    )
    assert mixed.copies is True and mixed.independent is False


@pytest.mark.parametrize("src", ["numpy", "torch"])
def test_casting_nan_and_out_of_range_values_prints_no_warning(src):
    a = np.array([np.nan, np.inf, 1e10, -1e10, 1.5])
    x = a if src == "numpy" else torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in ("int32", "int8", "uint8", "float16", "float8_e4m3fn", "bfloat16"):
            out = tb.to_numpy(x, dtype=dtype)
            assert out.dtype == tb.dtypes.numpy_dtype(dtype) and out.shape == (5,)
            assert tb.to_torch(a, dtype=dtype).shape == (5,)


def _odd_inputs():
    import tensorflow as tf

    jnp = jax.numpy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant = torch.quantize_per_tensor(torch.ones(2), 0.5, 0, torch.qint8)
        nested = torch.nested.nested_tensor([torch.ones(1), torch.ones(2)])
        c32 = torch.ones(2, dtype=torch.complex32)
    deleted = jnp.ones(2)
    deleted.delete()
    return {
        "np float64": np.arange(3.0),
        "np int4": np.zeros(2, ml_dtypes.int4),
        "np record": np.zeros(2, [("a", "i4")]),
        "np str": np.array(["x"]),
        "np datetime": np.array(["2020-01-01"], "datetime64[D]"),
        "np object": np.array([None]),
        "np masked": np.ma.masked_array([1.0, 2.0], [True, False]),
        "np big-endian": np.ones(2, ">f8"),
        "np read-only": np.frombuffer(b"\0" * 8, np.float32),
        "np empty": np.zeros((0, 3), np.float32),
        "np bool": np.array([True]),
        "np uint64": np.array([2**64 - 1], np.uint64),
        "np longdouble": np.ones(2, np.longdouble),
        "np float0": np.zeros(2, jax.dtypes.float0),
        "torch grad": torch.ones(2, requires_grad=True),
        "torch conj": torch.ones(2, dtype=torch.complex64).conj(),
        "torch meta": torch.empty(2, device="meta"),
        "torch quantized": quant,
        "torch nested": nested,
        "torch complex32": c32,
        "torch int4": torch.empty(2, dtype=torch.int4),
        "torch sparse": torch.ones(2).to_sparse(),
        "torch bf16": torch.ones(2, dtype=torch.bfloat16),
        "jax deleted": deleted,
        "jax int4": jnp.zeros(2, jnp.int4),
        "jax bf16": jnp.ones(2, jnp.bfloat16),
        "tf string": tf.constant([b"a"]),
        "tf ragged": tf.ragged.constant([[1], [2, 3]]),
        "tf sparse": tf.sparse.from_dense(tf.constant([[0.0, 1.0]])),
        "tf variable": tf.Variable([1.0]),
        "tf resource": tf.Variable([1.0]).handle,
        "python big int": 2**70,
        "python complex": 1 + 2j,
    }


def test_no_raw_exception_or_warning_escapes_any_route():
    """Every input above, to every framework, with every copy mode, a cast and a device that
    may not exist: a result, or a tensorbridge error that says how to fix it."""
    failures = []
    for name, x in _odd_inputs().items():
        for to in ("numpy", "torch", "jax", "tensorflow"):
            for copy in (None, True, False):
                for dtype, device in (
                    (None, None),
                    ("float16", None),
                    (None, "cpu:1"),
                    ("bogus", "cpu"),
                ):
                    for call in (tb.convert, tb.explain):
                        with warnings.catch_warnings():
                            warnings.simplefilter("error")
                            try:
                                call(x, to=to, copy=copy, dtype=dtype, device=device)
                            except tb.TensorBridgeError as exc:
                                if "Fix: " not in str(exc):
                                    failures.append(
                                        (name, to, copy, dtype, device, f"no fix: {exc}")
                                    )
                            except BaseException as exc:  # noqa: BLE001 - the assertion reports it
                                failures.append((name, to, copy, dtype, device, repr(exc)[:300]))
        for other in (np.ones(1), x):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    assert isinstance(tb.shares_memory(x, other), bool)
                except BaseException as exc:  # noqa: BLE001
                    failures.append((name, "shares_memory", repr(exc)[:300]))
    assert not failures, "\n".join(map(str, failures[:30])) + f"\n({len(failures)} in all)"
