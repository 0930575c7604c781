"""PyTorch inputs: autograd, lazy bits, sparse layouts, views, devices, errors."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

import tensorbridge as tb


def test_requires_grad_leaf_and_non_leaf():
    leaf = torch.ones(3, 4, requires_grad=True)
    a = tb.to_numpy(leaf)
    assert tb.shares_memory(a, leaf)
    non_leaf = leaf * 2
    b = tb.to_numpy(non_leaf)
    assert b.tolist() == [[2.0] * 4] * 3
    assert leaf.grad is None and non_leaf.grad_fn is not None  # graph untouched


def test_conj_and_neg_bits_are_resolved():
    z = torch.tensor([1 + 2j, 3 - 4j])
    assert tb.to_numpy(z.conj()).tolist() == [1 - 2j, 3 + 4j]
    neg = z.conj().imag  # a view with the negative bit set
    assert neg.is_neg()
    assert tb.to_numpy(neg).tolist() == [-2.0, 4.0]
    assert tb.to_jax(z.conj()).tolist() == [1 - 2j, 3 + 4j]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_becomes_dense(layout):
    dense = torch.tensor([[0.0, 1.5], [2.5, 0.0]])
    s = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    assert tb.to_numpy(s).tolist() == dense.tolist()
    assert "densify" in str(tb.explain(s, to="numpy"))


def test_non_contiguous_views_keep_values():
    base = torch.arange(24.0).reshape(4, 6)
    for view in (base.T, base[:, ::2], base[1:3, 2:5], base.flip(0)):
        assert tb.to_numpy(view).tolist() == view.tolist()
        assert tb.to_jax(view).tolist() == view.tolist()
        assert tb.to_tf(view).numpy().tolist() == view.tolist()


def test_zero_d_gives_zero_d():
    a = tb.to_numpy(torch.tensor(3.5))
    assert a.shape == () and a.item() == 3.5


def test_bfloat16_and_float8_share_memory_with_numpy():
    for dt, mdt in (
        (torch.bfloat16, ml_dtypes.bfloat16),
        (torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
    ):
        t = torch.ones(4, dtype=dt)
        a = tb.to_numpy(t)
        assert a.dtype == mdt
        t[0] = 2
        assert float(a[0]) == 2.0


def test_meta_tensor_is_refused_with_a_fix():
    with pytest.raises(tb.ConversionError, match="meta.*Fix"):
        tb.to_numpy(torch.empty(3, device="meta"))


def test_unknown_device_is_refused():
    with pytest.raises(tb.DeviceError, match="cuda"):
        tb.to_torch(np.ones(2), device="cuda")  # no CUDA on this machine
    with pytest.raises(tb.DeviceError, match="host memory"):
        tb.convert(torch.ones(2), to="numpy", device="cuda")


def test_to_torch_identity_and_copy_true():
    t = torch.ones(3, requires_grad=True)
    assert tb.to_torch(t) is t
    c = tb.to_torch(t, copy=True)
    assert c.data_ptr() != t.data_ptr()
    assert tb.to_torch(t, dtype="float16").dtype == torch.float16


def test_no_warnings_from_any_route():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb.to_numpy(torch.ones(2, requires_grad=True))
        tb.to_torch(np.frombuffer(b"\0" * 8, np.float32))
        tb.to_torch(np.frombuffer(b"\0" * 8, np.float32), copy=True)


def test_cast_with_dtype():
    t = torch.tensor([1.0, 2.5], dtype=torch.float64)
    a = tb.to_numpy(t, dtype="bfloat16")
    assert a.dtype == ml_dtypes.bfloat16 and a.tolist() == [1.0, 2.5]


def test_nested_tensors_are_refused_with_a_way_out():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    for target in ("numpy", "jax"):
        with pytest.raises(tb.ConversionError, match="nested tensor.*to_padded_tensor"):
            tb.convert({"x": nt}, to=target)
