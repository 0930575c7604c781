"""Converting to the framework a value is already in is the identity (a copy with
copy=True), whatever it holds: strings, ragged, sparse, meta, quantized, nested, complex32,
int4, records, datetimes..."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

import tensorbridge as tb

tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
jnp = jax.numpy


def _quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized creation functions
        return torch.quantize_per_tensor(torch.arange(4.0), 0.5, 0, torch.qint8)


def _nested():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prototype-stage warning
        return torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)])


def _complex32():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        return torch.tensor([1 + 2j, -3j], dtype=torch.complex64).to(torch.complex32)


CASES = {
    "tf string": ("tensorflow", lambda: tf.constant([b"a", b"bc"])),
    "tf ragged": ("tensorflow", lambda: tf.ragged.constant([[1], [2, 3]])),
    "tf sparse": ("tensorflow", lambda: tf.sparse.from_dense(tf.constant([[0, 1.5]]))),
    "torch meta": ("torch", lambda: torch.empty(3, device="meta")),
    "torch quantized": ("torch", _quantized),
    "torch nested": ("torch", _nested),
    "torch complex32": ("torch", _complex32),
    "torch int4": (
        "torch",
        lambda: (
            torch.tensor([1, 2, 3, 4], dtype=torch.uint8).view(torch.int4)
            if hasattr(torch, "int4")
            else pytest.skip("no torch.int4")
        ),
    ),
    "jax int4": ("jax", lambda: jnp.array([1, -2, 7], dtype=jnp.int4)),
    "numpy record": ("numpy", lambda: np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")])),
    "numpy str": ("numpy", lambda: np.array(["a", "bc"])),
    "numpy datetime": ("numpy", lambda: np.array(["2020-01-01"], dtype="datetime64[D]")),
    "numpy object": ("numpy", lambda: np.array([1, "a"], dtype=object)),
    "numpy int4": ("numpy", lambda: np.array([1, -2], dtype=ml_dtypes.int4)),
    "numpy long double": ("numpy", lambda: np.array([1.5], dtype=np.longdouble)),
}


def _bytes(x) -> bytes:
    """The value as bytes, for every kind above."""
    if isinstance(x, np.ndarray):
        return x.tobytes() if x.dtype != object else repr(x.tolist()).encode()
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":
            return repr((x.shape, x.dtype)).encode()
        if x.is_quantized:
            return x.int_repr().numpy().tobytes()
        if x.is_nested:
            return b"".join(t.numpy().tobytes() for t in x.unbind())
        return bytes(x.untyped_storage())
    if isinstance(x, tf.SparseTensor):
        return b"|".join(t.numpy().tobytes() for t in (x.indices, x.values, x.dense_shape))
    if isinstance(x, tf.RaggedTensor):
        return repr(x.to_list()).encode()
    if hasattr(x, "dtype") and x.dtype == tf.string:
        return repr(x.numpy().tolist()).encode()
    return np.asarray(x).tobytes()


@pytest.mark.parametrize("name", list(CASES))
def test_a_value_already_in_the_target_framework_is_returned_as_it_is(name):
    to, make = CASES[name]
    x = make()
    assert tb.convert(x, to=to) is x
    assert tb.convert(x, to=to, copy=False) is x
    assert tb.convert({"batch": [x]}, to=to)["batch"][0] is x
    plan = tb.explain(x, to=to)
    assert not plan.steps and "nothing to do" in str(plan)
    c = tb.convert(x, to=to, copy=True)
    assert c is not x and type(c) is type(x) and _bytes(c) == _bytes(x)
    if to in ("torch", "numpy") and name not in ("torch meta", "numpy object"):
        assert not tb.shares_memory(c, x)


def test_torch_int4_copy_true_is_a_real_copy():
    if not hasattr(torch, "int4"):
        pytest.skip("no torch.int4 in this torch")
    x = torch.tensor([1, 2, 3, 4], dtype=torch.uint8).view(torch.int4)
    c = tb.to_torch(x, copy=True)
    assert c.dtype == torch.int4 and bytes(c.untyped_storage()) == bytes(x.untyped_storage())
    assert c.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    x.view(torch.uint8)[0] = 99
    assert bytes(c.untyped_storage())[0] == 1


def test_a_tf_data_batch_with_a_text_feature_goes_to_tf():
    ds = tf.data.Dataset.from_tensor_slices({"text": [b"a", b"b"], "x": [[1.0], [2.0]]}).batch(2)
    batch = next(iter(ds))
    out = tb.to_tf(batch)
    assert out["text"] is batch["text"] and out["x"] is batch["x"]
    r = tf.ragged.constant([[1], [2, 3]])
    assert tb.convert({"r": r}, to="tf", ragged="list")["r"] is r


def test_casts_and_other_frameworks_still_say_why_they_cannot():
    with pytest.raises(tb.ConversionError, match="string"):
        tb.to_torch(tf.constant([b"a"]))
    with pytest.raises(tb.ConversionError, match="meta"):
        tb.to_numpy(torch.empty(2, device="meta"))
    with pytest.raises(tb.ConversionError, match="string"):
        tb.to_tf(tf.constant([b"a"]), dtype="float32")


def test_numpy_scalars_of_any_dtype_become_zero_d_arrays():
    rec = np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")])[0]
    out = tb.to_numpy(rec)
    assert type(out) is np.ndarray and out.shape == () and out.tobytes() == rec.tobytes()


def test_shares_memory_of_a_deleted_jax_array_is_false_not_an_error():
    j = jnp.ones(3)
    k = j + 1
    j.delete()
    assert tb.shares_memory(j, k) is False and tb.shares_memory(j, j) is False


def test_ragged_list_gives_lists_for_other_targets_alone_and_in_trees():
    r = tf.ragged.constant([[1], [2, 3]])
    for to in ("torch", "jax", "numpy"):
        assert tb.convert(r, to=to, ragged="list") == [[1], [2, 3]]
        assert tb.convert({"r": r}, to=to, ragged="list") == {"r": [[1], [2, 3]]}
