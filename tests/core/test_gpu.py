"""CUDA paths. Skipped without a GPU (conftest); run by bench/gpu_check.py on one.

The staging ring's logic is also rehearsed on the CPU in test_staging_plan.py;
these tests check what only a real device can: pinned memory, events, streams.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import tensorbridge as tb  # noqa: E402
from tensorbridge.frameworks import torch_staging as ts  # noqa: E402

pytestmark = pytest.mark.gpu

MiB = 1 << 20

ALL = [
    torch.bool,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def _raw(n: int, dtype=torch.float32, seed: int = 0):
    """n elements of random bit patterns (NaN payloads, -0.0, subnormals) on the host."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(
        0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g
    )
    if dtype == torch.bool:
        t = t % 2
    return t.view(dtype)


def _host_f32(n_floats: int, seed: int) -> np.ndarray:
    """A writable float32 array of random bit patterns (torch.from_numpy warns on read-only ones)."""
    return np.frombuffer(bytearray(_raw(n_floats, seed=seed).numpy().tobytes()), np.float32)


SLEEP = 200_000_000  # torch.cuda._sleep cycles: ~0.1 s of GPU time queued on a stream


def _ring_pinned() -> bool:
    return all(b.tensor.is_pinned() for b in ts._ring().blocks if b is not None)


@pytest.fixture
def no_fallbacks():
    """The test's transfers used the pinned ring: page-locking was never refused."""
    before = ts.stats()["fallbacks"]
    yield
    assert ts.stats()["fallbacks"] == before, "page-locked memory was refused: plain copies ran"
    assert _ring_pinned()


def _bytes(t) -> bytes:
    """The exact host bytes a tensor means (slow and obvious)."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.resolve_conj().resolve_neg().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def waits(monkeypatch):
    """Every host synchronisation tensorbridge makes: device, stream and event waits."""
    ts.quiesce()  # leftover events of earlier tests are not this test's waits
    torch.cuda.synchronize()
    calls: list[str] = []
    real_dev = torch.cuda.synchronize
    real_ev = torch.cuda.Event.synchronize
    real_st = torch.cuda.Stream.synchronize

    def dev(*a, **k):
        calls.append("device")
        return real_dev(*a, **k)

    def ev(self):
        calls.append("event")
        return real_ev(self)

    def st(self):
        calls.append("stream")
        return real_st(self)

    monkeypatch.setattr(torch.cuda, "synchronize", dev)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", ev)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", st)
    return calls


def test_cuda_tensor_to_numpy_bit_exact():
    for k, dt in enumerate(ALL):
        host = _raw((1 << 16) + k, dt, seed=k)
        a = tb.to_numpy(host.cuda())
        assert a.dtype == tb.dtypes.numpy_dtype(tb.frameworks.get_backend("torch").canonical(dt))
        assert a.tobytes() == _bytes(host)


def test_cuda_tree_of_every_dtype_and_shape_through_the_ring_is_bit_exact(no_fallbacks):
    tree = {}
    for k, dt in enumerate(ALL):
        tree[f"small_{dt}"] = _raw(37 + k, dt, seed=k).cuda()
        tree[f"mid_{dt}"] = _raw(300_000 + k, dt, seed=50 + k).cuda().reshape(-1, 1)
    tree["big"] = _raw(100 * MiB // 4 + 3, torch.float32, seed=99).cuda()  # > one 64 MiB block
    tree["empty"] = torch.zeros(0, 5, device="cuda")
    tree["scalar"] = torch.tensor(1.5, device="cuda", dtype=torch.bfloat16)
    tree["grad"] = torch.ones(3, device="cuda", requires_grad=True) * 2
    z = torch.randn(100, dtype=torch.complex64, device="cuda")
    tree["conj"] = z.conj()
    tree["neg"] = torch._neg_view(torch.randn(64, device="cuda"))
    tree["strided"] = torch.arange(10_000.0, device="cuda").reshape(100, 100)[:, ::7].t()
    tree["sparse"] = torch.randn(50, 60, device="cuda").relu().to_sparse()
    out = tb.to_numpy(tree)
    assert list(out) == list(tree)
    for k, v in tree.items():
        assert out[k].shape == tuple(v.shape), k
        assert out[k].tobytes() == _bytes(v), k
        assert out[k].flags.writeable
    np.testing.assert_array_equal(out["conj"], z.conj().resolve_conj().cpu().numpy())


def test_cuda_tree_to_numpy_one_sync_and_exact(waits, no_fallbacks):
    tree = {f"w{i}": _raw(1000 + i, seed=i).cuda().reshape(-1) for i in range(50)}
    tree["grad"] = torch.ones(3, device="cuda", requires_grad=True) * 2
    waits.clear()
    out = tb.to_numpy(tree)
    assert waits == ["event"]  # one wait for the whole tree, no device-wide sync
    for k, v in tree.items():
        assert out[k].tobytes() == _bytes(v)


def test_big_tensor_waits_once_per_chunk(waits, no_fallbacks):
    t = _raw(200 * MiB // 4, seed=3).cuda()  # 200 MiB: 4 chunks of 64 MiB
    waits.clear()
    a = tb.to_numpy(t)
    assert waits == ["event"] * 4
    assert a.tobytes() == _bytes(t)


def test_ten_thousand_tiny_tensors_are_packed(waits, no_fallbacks):
    flat = _raw(10_000 * 256, seed=4).cuda()
    ts_ = [flat[i * 256 : (i + 1) * 256].clone() for i in range(10_000)]
    waits.clear()
    before = ts.stats()["chunks"]
    out = tb.to_numpy(ts_)
    assert waits == ["event"] and ts.stats()["chunks"] - before == 1
    host = flat.cpu().numpy()
    for i, a in enumerate(out):
        assert a.tobytes() == host[i * 256 : (i + 1) * 256].tobytes()


def test_pinned_true_returns_page_locked_arrays(waits, no_fallbacks):
    tree = {
        "big": _raw(3 * MiB, seed=5).cuda(),
        "bias": _raw(100, seed=6).cuda(),
        "bias2": _raw(200, seed=7).cuda(),
        "bf16": _raw(1000, torch.bfloat16, seed=8).cuda(),
    }
    waits.clear()
    out = tb.to_numpy(tree, pinned=True)
    assert waits == ["event"]  # one device: one wait
    for k, v in tree.items():
        assert out[k].tobytes() == _bytes(v)
    for k in ("big", "bias", "bias2"):  # float32 arrays: torch can say where they live
        assert torch.from_numpy(out[k]).is_pinned(), k
    assert torch.from_numpy(out["bf16"].view(np.uint16)).is_pinned()
    single = tb.to_numpy(tree["big"], pinned=True)
    assert torch.from_numpy(single).is_pinned() and single.tobytes() == _bytes(tree["big"])
    assert not torch.from_numpy(tb.to_numpy(tree["big"])).is_pinned()  # the default: pageable


def test_threads_share_the_ring():
    errors = []

    def worker(seed: int) -> None:
        try:
            for rep in range(3):
                tree = [
                    _raw(n, torch.float64, seed=seed * 10 + rep).cuda()
                    for n in (17, 5000, 12 * MiB + seed)
                ]  # 96 MiB+: several chunks
                out = tb.to_numpy(tree)
                for a, t in zip(out, tree, strict=True):
                    assert a.tobytes() == _bytes(t)
                host = {"a": _host_f32(3 * MiB, seed)}
                dev = tb.to_torch(host, device="cuda")
                assert _bytes(dev["a"]) == host["a"].tobytes()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _ring_pinned()


def test_copies_run_on_the_callers_current_stream(no_fallbacks):
    """The producer writes on a side stream after a long sleep; reading on the
    caller's (side) stream must see the written values, never the old ones."""
    side = torch.cuda.Stream()
    src = _raw(80 * MiB // 4, seed=9).cuda()
    dst = torch.zeros_like(src)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the write lands
        dst.copy_(src)
        out = tb.to_numpy({"x": dst, "y": dst[:1000]})
        pinned = tb.to_numpy(dst, pinned=True)
    assert out["x"].tobytes() == _bytes(src)
    assert out["y"].tobytes() == _bytes(src[:1000])
    assert pinned.tobytes() == _bytes(src)


def test_host_to_device_copies_run_on_the_callers_current_stream(no_fallbacks):
    """The twin of the test above, host -> device: the caller's (side) stream is busy, the
    default stream idle. A copy or an event on the wrong stream lets a ring block be refilled
    before its copy to the device ran, which corrupts that chunk every time."""
    side = torch.cuda.Stream()
    host = {f"w{i}": _host_f32(16 * MiB, seed=20 + i) for i in range(6)}  # 384 MiB: 6 chunks
    host["ro"] = np.frombuffer(b"\x05\x06\x07\x08" * 1000, np.int32)
    want = {k: v.tobytes() for k, v in host.items()}
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP)  # the side stream is busy; the default stream is idle
        out = tb.to_torch(host, device="cuda")
        for v in host.values():  # the bytes were staged: the sources may change at once
            if v.flags.writeable:
                v[...] = 0
    side.synchronize()
    for k, b in want.items():
        assert _bytes(out[k]) == b, k


def test_host_to_device_tree_bit_exact_and_no_sync(waits, no_fallbacks):
    import ml_dtypes

    rng = np.random.default_rng(0)
    tree = {
        f"layers.{i}.weight": rng.integers(0, 2**32, 1024 * 2048, dtype=np.uint32)
        .view(np.float32)
        .reshape(1024, 2048)
        for i in range(40)  # 320 MiB: 5 chunks
    }
    tree["bf16"] = rng.integers(0, 2**16, 777, dtype=np.uint16).view(ml_dtypes.bfloat16)
    tree["f8"] = rng.integers(0, 256, 999, dtype=np.uint8).view(ml_dtypes.float8_e5m2)
    tree["bool"] = rng.integers(0, 2, 33).astype(bool)
    tree["u32"] = rng.integers(0, 2**32, 10, dtype=np.uint32)
    tree["c128"] = rng.standard_normal(20) + 1j * rng.standard_normal(20)
    tree["cpu_tensor"] = _raw(5000, torch.float16, seed=1)
    tree["ro"] = np.frombuffer(b"\x01\x02\x03\x04" * 300, np.int32)
    tree["flipped"] = np.arange(10.0)[::-1]  # the planned route: not contiguous
    tree["name"] = "kept"
    want = {
        k: (v.tobytes() if isinstance(v, np.ndarray) else _bytes(v))
        for k, v in tree.items()
        if k != "name"
    }
    waits.clear()
    before = ts.stats()["chunks"]
    torch.cuda._sleep(SLEEP)  # the copies queue behind this: a missing wait would show
    out = tb.to_torch(tree, device="cuda")
    chunks = ts.stats()["chunks"] - before
    assert chunks >= 5
    # stream-ordered: no wait at the end; a block is waited for only before it is refilled
    assert waits == ["event"] * (chunks - ts.NUM_BLOCKS)
    for v in tree.values():  # the sources may change at once: the bytes were already staged
        if isinstance(v, np.ndarray) and v.flags.writeable:
            v[...] = 0
    assert out["name"] == "kept"
    for k, b in want.items():
        assert out[k].is_cuda, k
        assert _bytes(out[k]) == b, k
        assert tuple(out[k].shape) == tuple(tree[k].shape), k
    assert out["bf16"].dtype == torch.bfloat16 and out["f8"].dtype == torch.float8_e5m2
    assert out["u32"].dtype == torch.uint32 and out["bool"].dtype == torch.bool


def test_host_to_device_on_a_side_stream_then_back(no_fallbacks):
    side = torch.cuda.Stream()
    host = {"a": _host_f32(70 * MiB // 4, seed=2), "b": np.arange(5, dtype=np.int64)}
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP)
        dev = tb.to_torch(host, device="cuda")
        back = tb.to_numpy(dev)  # reuses ring blocks whose host->device copies may be in flight
    for k in host:
        assert back[k].tobytes() == host[k].tobytes()


def test_host_to_device_is_faster_path_but_same_result_as_naive():
    a = _host_f32(1 << 20, seed=3)  # writable: torch.from_numpy warns on read-only arrays
    torch.cuda._sleep(SLEEP)
    got = tb.to_torch({"a": a}, device="cuda")["a"]
    assert torch.equal(got.view(torch.int32), torch.from_numpy(a).to("cuda").view(torch.int32))


def test_invalid_cuda_ordinal_is_a_device_error():
    with pytest.raises(tb.DeviceError, match="cuda:99"):
        tb.to_torch({"a": np.ones(3)}, device="cuda:99")


def test_copy_false_from_cuda_is_refused():
    with pytest.raises(tb.CopyError, match="host"):
        tb.to_numpy(torch.ones(2, device="cuda"), copy=False)
    with pytest.raises(tb.CopyError):
        tb.to_torch({"a": np.ones(2)}, device="cuda", copy=False)


def test_from_numpy_to_device():
    a = np.arange(6, dtype=np.float32)
    t = tb.to_torch(a, device="cuda")
    assert t.is_cuda and t.cpu().numpy().tobytes() == a.tobytes()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)
def test_tree_across_two_devices():
    tree = [_raw(1000, seed=i).to(f"cuda:{i % 2}") for i in range(6)]
    out = tb.to_numpy(tree)
    for a, t in zip(out, tree, strict=True):
        assert a.tobytes() == _bytes(t)
    back = tb.to_torch(out, device="cuda:1")
    assert all(t.device == torch.device("cuda:1") for t in back)


@pytest.mark.parametrize("tgt", ["jax", "cupy"])
def test_same_device_switches_are_zero_copy(tgt):
    pytest.importorskip(tgt)
    t = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    # JAX is immutable: sharing a torch buffer with it takes copy=False (docs/guide.md)
    copy = False if tgt == "jax" else None
    y = tb.convert(t, to=tgt, copy=copy)
    assert not tb.explain(t, to=tgt, copy=copy).copies
    assert tb.shares_memory(t, y)
    if tgt == "jax":
        assert tb.explain(t, to=tgt).copies  # by default a copy, made on the device
        back = tb.to_torch(y)  # a writable tensor over JAX memory: a copy on the device
        assert back.device == t.device and not tb.shares_memory(back, y)
        with pytest.raises(tb.CopyError):
            tb.to_torch(y, copy=False)
    else:
        back = tb.to_torch(y)
        assert back.data_ptr() == t.data_ptr()


def _jax_on_cuda():
    jax = pytest.importorskip("jax")
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no CUDA backend here")
    torch.cuda.init()  # torch's CUDA running: small trees take the ring too
    return jax, dev


def test_jax_cuda_arrays_go_through_the_ring_bit_exact(no_fallbacks):
    jax, dev = _jax_on_cuda()
    before = ts.stats()
    tree = {}
    for k, dt in enumerate(
        [torch.float32, torch.bfloat16, torch.int8, torch.float16, torch.complex64, torch.bool]
    ):
        host = _raw((1 << 15) + k, dt, seed=40 + k)
        tree[str(dt)] = jax.device_put(tb.to_numpy(host), dev)
    tree["big"] = jax.device_put(_host_f32(96 * MiB // 4, 7), dev)  # spans two ring blocks
    out = tb.to_numpy(tree)
    for k, x in tree.items():
        want = np.asarray(jax.device_get(x))
        assert out[k].dtype == want.dtype and out[k].shape == want.shape, k
        assert out[k].tobytes() == want.tobytes(), k
    assert ts.stats()["host_waits"] > before["host_waits"]  # the ring ran, not device_get


def test_jax_cuda_array_alone_and_pinned(no_fallbacks):
    jax, dev = _jax_on_cuda()
    x = jax.device_put(_host_f32(8 * MiB // 4, 11), dev)
    want = np.asarray(jax.device_get(x)).tobytes()
    assert tb.to_numpy(x).tobytes() == want
    p = tb.to_numpy(x, pinned=True)
    assert p.tobytes() == want
    assert torch.from_numpy(p).is_pinned()


def test_jax_result_is_ready_before_it_is_read():
    """A JAX result still being computed (tens of ms of queued matmuls) is copied on a
    side torch stream: DLPack must make that stream wait for JAX's work."""
    jax, dev = _jax_on_cuda()
    jnp = pytest.importorskip("jax.numpy")

    @jax.jit
    def slow(m):
        return jax.lax.fori_loop(0, 40, lambda i, v: jnp.tanh(v @ m), m)

    m = jax.device_put(np.random.default_rng(3).standard_normal((4096, 4096), np.float32), dev)
    jax.block_until_ready(slow(m))  # compiled, so the next call only queues work
    side = torch.cuda.Stream()
    x = slow(m)  # dispatched asynchronously: not done when the copy is asked for
    with torch.cuda.stream(side):
        out = tb.to_numpy({"x": x, "small": jnp.ones(7)})
    assert out["x"].tobytes() == np.asarray(jax.device_get(x)).tobytes()
    assert out["small"].tolist() == [1.0] * 7


def test_cupy_arrays_go_through_the_ring_bit_exact(no_fallbacks):
    cp = pytest.importorskip("cupy")
    torch.cuda.init()
    before = ts.stats()
    tree = {
        "a": cp.asarray(_host_f32(1 << 16, 21)),
        "b": cp.asarray(_host_f32(80 * MiB // 4, 22)),
        "c": cp.arange(100, dtype=cp.int16),
    }
    out = tb.to_numpy(tree)
    for k, x in tree.items():
        assert out[k].dtype == x.dtype and out[k].tobytes() == cp.asnumpy(x).tobytes(), k
    assert ts.stats()["host_waits"] > before["host_waits"]
