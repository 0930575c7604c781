"""Zero-copy proven by mutation; copy=True proven independent; copy=False refusals.

A pair claims zero-copy when explain() says so. The proof never trusts
tensorbridge: it writes through a writable alias made by the frameworks' own
APIs and reads the change on the other side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorbridge as tb
import tensorbridge.dtypes as D

from .frameworks import FRAMEWORKS, framework_of, make, raw_bytes


def _writable_alias(x):
    """A writable torch tensor over x's memory, made without tensorbridge."""
    fw = framework_of(x)
    if fw == "numpy":
        if x.dtype.kind == "V" or x.dtype.type.__module__.startswith("ml_dtypes"):
            x = x.view(np.uint8)  # torch cannot import ml_dtypes arrays directly
        return torch.from_numpy(x) if x.flags.writeable else torch.from_dlpack(x)
    if fw == "torch":
        return x
    if fw == "jax":
        return torch.from_dlpack(x)
    import tensorflow as tf

    return torch.utils.dlpack.from_dlpack(tf.experimental.dlpack.to_dlpack(x))


def _read(x) -> float:
    fw = framework_of(x)
    if fw == "tensorflow":
        return float(x.numpy().reshape(-1)[0])
    return float(np.asarray(x).reshape(-1)[0]) if fw != "torch" else float(x.reshape(-1)[0])


PAIRS = [(s, t) for s in FRAMEWORKS for t in FRAMEWORKS]


@pytest.mark.parametrize("src,tgt", PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
def test_zero_copy_claims_hold_under_mutation(src, tgt):
    x = make(src, "float32", np.zeros(1024, np.float32).tobytes())
    if src == "numpy":  # 64-byte aligned, as frameworks allocate
        buf = np.zeros(1024 + 16, np.float32)
        off = (-buf.ctypes.data % 64) // 4
        x = buf[off : off + 1024]
    plan = tb.explain(x, to=tgt)
    y = tb.convert(x, to=tgt)
    if plan.copies:
        return  # covered by test_copy_true_is_independent
    assert tb.shares_memory(x, y)
    _writable_alias(x)[0] = 7.0
    assert _read(y) == 7.0, f"{src}->{tgt} claimed zero-copy but did not share:\n{plan}"


@pytest.mark.parametrize("src,tgt", PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
def test_copy_true_is_independent(src, tgt):
    x = make(src, "float32", np.zeros(64, np.float32).tobytes())
    y = tb.convert(x, to=tgt, copy=True)
    assert not tb.shares_memory(x, y)
    _writable_alias(x)[0] = 7.0
    assert _read(y) == 0.0


@pytest.mark.parametrize("src,tgt", PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
def test_copy_false_shares_or_refuses(src, tgt):
    x = make(src, "float32", raw_bytes("float32", 64))
    try:
        plan = tb.explain(x, to=tgt, copy=False)
    except tb.CopyError:
        with pytest.raises(tb.CopyError, match="copy=False.*Fix:"):
            tb.convert(x, to=tgt, copy=False)
    else:
        assert not plan.copies
        assert tb.shares_memory(x, tb.convert(x, to=tgt, copy=False))


def test_torch_cpu_pairs_are_zero_copy():
    """The pairs the docs promise: torch <-> numpy by default; torch -> jax/tf with copy=False
    (by default a copy, so later writes to the torch tensor cannot change the immutable result)."""
    t = torch.zeros(1024)
    assert not tb.explain(t, to="numpy").copies
    for tgt in ("jax", "tensorflow"):
        assert tb.explain(t, to=tgt).copies, tgt
        assert not tb.explain(t, to=tgt, copy=False).copies, tgt
    a = np.zeros(8, np.float32)
    assert not tb.explain(a, to="torch").copies


def test_seed_tutorial_shared_memory_surprise_and_copy_true():
    x = torch.ones((3, 6))
    shared = tb.to_numpy(x)
    shared[0][0] = 20
    assert x[0, 0].item() == 20  # the surprise: tensor changed too
    x = torch.ones((3, 6))
    independent = tb.to_numpy(x, copy=True)
    independent[0][0] = 20
    assert x[0, 0].item() == 1


def test_zero_copy_is_constant_size_work():
    """512 MiB shares like 1 MiB does: the result views the same buffer."""
    big = torch.empty(128 * 1024 * 1024)  # 512 MiB, never touched
    a = tb.to_numpy(big)
    assert a.ctypes.data == big.data_ptr()
    t = tb.to_torch(a)
    assert t.data_ptr() == big.data_ptr()


def test_copy_false_refusal_says_why():
    x = torch.tensor([1 + 2j]).conj()
    with pytest.raises(tb.CopyError) as err:
        tb.to_numpy(x, copy=False)
    assert "conjugate" in str(err.value) and "copy=None" in str(err.value)
    with pytest.raises(tb.CopyError, match="byte order"):
        tb.to_torch(np.zeros(3, ">f4"), copy=False)
    with pytest.raises(tb.CopyError, match="negative strides"):
        tb.to_torch(np.arange(4)[::-1], copy=False)
    with pytest.raises(ValueError):  # CopyError is also a ValueError
        tb.to_torch(np.arange(4)[::-1], copy=False)


def _copy_cases():
    from .frameworks import SUPPORTS

    for src, tgt in PAIRS:
        for dtype in ("float32", "bfloat16", "float8_e4m3fn", "bool", "int8"):
            if src == "tensorflow" and dtype.startswith("float8"):
                continue  # TF has no way to write into (or even locate) float8 memory
            if dtype in SUPPORTS[src] and dtype in SUPPORTS[tgt]:
                for read_only in (False, True) if src == "numpy" else (False,):
                    yield pytest.param(
                        src,
                        tgt,
                        dtype,
                        read_only,
                        id=f"{src}-{tgt}-{dtype}{'-read-only' if read_only else ''}",
                    )


@pytest.mark.parametrize("src,tgt,dtype,read_only", list(_copy_cases()))
def test_a_claimed_copy_is_independent(src, tgt, dtype, read_only):
    """Whatever explain() calls a copy, and whatever copy=True returns, must not change
    when the source's memory is written afterwards (dtype by dtype, read-only too)."""
    from .frameworks import bytes_of

    buf = np.zeros(4096 + 64, np.uint8)
    off = -buf.ctypes.data % 64
    raw = np.zeros(1024 * np.dtype(D.numpy_dtype(dtype)).itemsize, np.uint8)
    if src == "numpy":
        x = buf[off : off + raw.size].view(D.numpy_dtype(dtype))
        if read_only:
            x.flags.writeable = False
    else:
        x = make(src, dtype, raw.tobytes())
    results = [tb.convert(x, to=tgt, copy=True)]
    if tb.explain(x, to=tgt).copies:
        results.append(tb.convert(x, to=tgt))
    before = [bytes_of(y) for y in results]
    alias = _writable_alias(x)
    alias.view(torch.uint8)[0] = 1 if dtype == "bool" else 0x3C
    for y, b in zip(results, before, strict=True):
        assert bytes_of(y) == b, f"{src}->{tgt} {dtype}: a result claimed independent changed"


@pytest.mark.parametrize("bad", [0, 1, "yes", "True"])
def test_copy_accepts_only_none_true_false(bad):
    with pytest.raises(tb.ConversionError, match="copy takes None, True or False"):
        tb.to_numpy(np.ones(1), copy=bad)
