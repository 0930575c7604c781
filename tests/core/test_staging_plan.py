"""The pinned staging ring, without a GPU: the pure-Python planners, and the
whole pipeline rehearsed with CPU tensors standing in for CUDA ones (unpinned
blocks, fake events that record every wait). The real CUDA runs are in
test_gpu.py."""

from __future__ import annotations

import threading
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorbridge.frameworks import torch_staging as ts
from tensorbridge.frameworks.torch_staging import Piece, plan_chunks, plan_packs, split_jobs

KiB, MiB = 1 << 10, 1 << 20


# ------------------------------------------------------------------ plan_chunks


def covered_once(sizes, pieces):
    """Every byte of every item in exactly one piece."""
    by_item: dict[int, list[Piece]] = {}
    for p in pieces:
        assert p.nbytes > 0
        by_item.setdefault(p.item, []).append(p)
    for i, n in enumerate(sizes):
        got = sorted(by_item.get(i, []), key=lambda p: p.src_off)
        assert sum(p.nbytes for p in got) == n, (i, n, got)
        off = 0
        for p in got:
            assert p.src_off == off  # no gap, no overlap
            off += p.nbytes
        assert off == n
    assert set(by_item) <= set(range(len(sizes)))


def check_chunks(sizes, chunks, *, block, nblocks, align, keys=None):
    covered_once(sizes, [p for c in chunks for p in c.pieces])
    for k, c in enumerate(chunks):
        assert c.index == k and c.block == k % nblocks
        assert c.pieces
        spans = sorted((p.stage_off, p.stage_off + p.nbytes) for p in c.pieces)
        for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False):
            assert a1 <= b0  # no two pieces share a staging byte
        for p in c.pieces:
            assert p.stage_off >= 0 and p.stage_off + p.nbytes <= block
            assert p.stage_off % align == 0 and p.src_off % align == 0
            if keys is not None:
                assert keys[p.item] == c.key
        assert c.end <= block
    for i, n in enumerate(sizes):
        parts = [c.index for c in chunks for p in c.pieces if p.item == i]
        if 0 < n <= block:
            assert len(parts) == 1  # an item that fits in a block is never split
        assert parts == sorted(parts) and len(set(parts)) == len(parts)


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [0, 0, 0],
        [1],
        [4096],
        [4097],
        [3 * 4096 + 5],
        [10, 4096, 10],
        [4000, 200, 4096 * 5 + 1, 0, 7, 4096],
        [1] * 1000,
        [64] * 64 + [65] * 64,
    ],
)
def test_plan_chunks_examples(sizes):
    chunks = plan_chunks(sizes, block_bytes=4096, num_blocks=3, align=64)
    check_chunks(sizes, chunks, block=4096, nblocks=3, align=64)


def test_tensor_larger_than_a_block_is_split_across_chunks():
    chunks = plan_chunks([100, 10 * 4096 + 3], block_bytes=4096, num_blocks=4, align=64)
    big = [p for c in chunks for p in c.pieces if p.item == 1]
    assert len(big) == 11
    assert big[0].stage_off == 128 and big[0].nbytes == 4096 - 128  # fills the rest of chunk 0
    assert all(p.nbytes == 4096 for p in big[1:-1])
    assert [c.block for c in chunks] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]


def test_many_tiny_tensors_share_chunks_aligned():
    chunks = plan_chunks([3] * 10_000, block_bytes=64 * KiB, num_blocks=4, align=64)
    assert len(chunks) == -(-10_000 // 1024)  # 1024 aligned slots of 64 bytes per block
    assert all(p.stage_off % 64 == 0 for c in chunks for p in c.pieces)


def test_empty_tensors_get_no_piece():
    chunks = plan_chunks([0, 5, 0], block_bytes=4096, num_blocks=2)
    assert [p.item for c in chunks for p in c.pieces] == [1]


def test_keys_never_share_a_chunk():
    sizes, keys = [10, 10, 10, 10], ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    chunks = plan_chunks(sizes, keys=keys, block_bytes=4096, num_blocks=2)
    assert [c.key for c in chunks] == ["cuda:0", "cuda:1"]
    check_chunks(sizes, chunks, block=4096, nblocks=2, align=64, keys=keys)


def test_default_ring_shape():
    assert 64 * MiB == ts.BLOCK_BYTES and ts.NUM_BLOCKS == 4 and ts.BLOCK_BYTES % ts.ALIGN == 0
    chunks = plan_chunks([1 << 30])  # a 1 GiB tensor: 16 full chunks
    assert len(chunks) == 16 and all(c.end == ts.BLOCK_BYTES for c in chunks)


def test_bad_block_sizes_are_refused():
    with pytest.raises(ValueError):
        plan_chunks([1], block_bytes=100, align=64)
    with pytest.raises(ValueError):
        plan_chunks([-1])
    with pytest.raises(ValueError):
        ts._Ring(pin=False, num_blocks=1)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 200), st.integers(0, 5000), st.integers(0, 20000)), max_size=60
    ),
    block_pow=st.integers(7, 13),
    align_pow=st.integers(0, 7),
    nblocks=st.integers(1, 5),
    nkeys=st.integers(1, 3),
)
def test_plan_chunks_property(sizes, block_pow, align_pow, nblocks, nkeys):
    block, align = 1 << block_pow, 1 << min(align_pow, block_pow)
    keys = sorted(i % nkeys for i in range(len(sizes)))
    chunks = plan_chunks(sizes, keys=keys, block_bytes=block, num_blocks=nblocks, align=align)
    check_chunks(sizes, chunks, block=block, nblocks=nblocks, align=align, keys=keys)


# ------------------------------------------------------------------ plan_packs


def check_packs(sizes, keys, packs, direct, *, small, pack_bytes):
    seen = Counter(direct)
    for p in packs:
        assert len(p.members) >= 2
        assert p.nbytes <= pack_bytes
        off = 0
        for i, o in p.members:
            assert o == off and keys[i] == p.key and 0 < sizes[i] <= small
            off += sizes[i]
            seen[i] += 1
        assert off == p.nbytes
    assert direct == sorted(direct)
    assert seen == Counter(i for i, n in enumerate(sizes) if n > 0)  # each non-empty item once


def test_plan_packs_examples():
    sizes = [8, 8, 2 * MiB, 0, 8, 4, 4]
    keys = ["f32", "f32", "f32", "f32", "bf16", "f32", "bf16"]
    packs, direct = plan_packs(sizes, keys, small_bytes=MiB, pack_bytes=64 * MiB)
    check_packs(sizes, keys, packs, direct, small=MiB, pack_bytes=64 * MiB)
    assert direct == [2]
    assert [(p.key, p.members) for p in packs] == [
        ("f32", ((0, 0), (1, 8), (5, 16))),
        ("bf16", ((4, 0), (6, 8))),
    ]


def test_plan_packs_lone_small_tensor_goes_direct():
    packs, direct = plan_packs([4, 4], ["a", "b"])
    assert packs == [] and direct == [0, 1]


def test_plan_packs_ten_thousand_tiny():
    sizes = [1024] * 10_000
    packs, direct = plan_packs(sizes, ["k"] * 10_000, small_bytes=MiB, pack_bytes=4 * MiB)
    check_packs(sizes, ["k"] * 10_000, packs, direct, small=MiB, pack_bytes=4 * MiB)
    assert len(packs) == 3 and not direct


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), max_size=80),
    nkeys=st.integers(1, 4),
    small=st.integers(1, 2000),
    pack_bytes=st.integers(1, 10000),
)
def test_plan_packs_property(sizes, nkeys, small, pack_bytes):
    keys = [i % nkeys for i in range(len(sizes))]
    pack_bytes = max(pack_bytes, small)
    packs, direct = plan_packs(sizes, keys, small_bytes=small, pack_bytes=pack_bytes)
    check_packs(sizes, keys, packs, direct, small=small, pack_bytes=pack_bytes)


# ------------------------------------------------------------------ split_jobs


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30000), max_size=30),
    threads=st.integers(1, 16),
    min_pow=st.integers(6, 14),
)
def test_split_jobs_property(sizes, threads, min_pow):
    chunks = plan_chunks(sizes, block_bytes=1 << 15, num_blocks=4)
    for c in chunks:
        jobs = split_jobs(c.pieces, threads=threads, min_bytes=1 << min_pow)
        flat = [p for j in jobs for p in j]
        covered_once(
            [
                sum(p.nbytes for p in c.pieces if p.item == i)
                if any(p.item == i for p in c.pieces)
                else 0
                for i in range(len(sizes))
            ],
            [
                Piece(
                    p.item,
                    p.src_off - min(q.src_off for q in c.pieces if q.item == p.item),
                    p.stage_off,
                    p.nbytes,
                )
                for p in flat
            ],
        )
        for p in flat:  # each job piece maps the same src->stage offset as its parent piece
            parent = next(
                q
                for q in c.pieces
                if q.item == p.item and q.src_off <= p.src_off < q.src_off + q.nbytes
            )
            assert p.stage_off - parent.stage_off == p.src_off - parent.src_off
            assert p.src_off + p.nbytes <= parent.src_off + parent.nbytes
            assert (p.src_off - parent.src_off) % 64 == 0  # cuts on aligned boundaries
        assert len(jobs) <= max(1, threads) + 1
        total = sum(p.nbytes for p in c.pieces)
        if total <= (1 << min_pow):
            assert len(jobs) == 1


def test_split_jobs_spreads_a_big_chunk_over_threads():
    jobs = split_jobs([Piece(0, 0, 0, 64 * MiB)], threads=8, min_bytes=MiB)
    assert len(jobs) == 8 and all(sum(p.nbytes for p in j) == 8 * MiB for j in jobs)
    assert split_jobs([], threads=8) == []


# ------------------------------------------------------------------ the pipeline, rehearsed on the CPU

torch = pytest.importorskip("torch")
import tensorbridge as tb  # noqa: E402
from tensorbridge.frameworks.torch import BACKEND  # noqa: E402


class FakeEvent:
    def __init__(self, log, n):
        self.log, self.n, self.synced = log, n, False

    def synchronize(self):
        self.synced = True
        self.log.append(("wait", self.n))


class FakeHooks(ts._Hooks):
    """Events on the CPU: record() returns an event whose waits are logged."""

    pin = False

    def __init__(self, log=None, devices=None):
        self.log, self.events = ([] if log is None else log), []
        self.recorded_on = []  # the device argument of every record()
        self.fake_devices = devices  # {id(tensor): fake device name}, to rehearse several GPUs
        self.lock = threading.Lock()

    def record(self, device):
        with self.lock:
            ev = FakeEvent(self.log, (id(self), len(self.events)))
            self.events.append(ev)
            self.recorded_on.append(device)
            self.log.append(("record", ev.n))
            return ev

    def device(self, t):
        if self.fake_devices is not None:
            return self.fake_devices[id(t)]
        return t.device

    @property
    def waits(self):
        return sum(1 for kind, _ in self.log if kind == "wait")


def ring(block=4096, nblocks=3, job=256):
    return ts._Ring(pin=False, block_bytes=block, num_blocks=nblocks, job_bytes=job)


def raw(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    item = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n * item,), dtype=torch.uint8, generator=g).view(dtype)


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


def reference(t):
    """The exact host bytes of what t means (the slow, obvious way)."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_exact(out, tensors):
    for a, t in zip(out, tensors, strict=True):
        name = BACKEND.canonical(t.dtype)
        assert a.dtype == tb.dtypes.numpy_dtype(name), (a.dtype, t.dtype)
        assert a.shape == tuple(t.shape)
        assert np.ascontiguousarray(a).tobytes() == reference(t)


def tree_of_all_dtypes():
    ts_ = []
    for k, dt in enumerate(ALL):
        ts_.append(raw(37 + k, dt, seed=k))  # odd sizes: misaligned ends
        ts_.append(raw(3000 + k, dt, seed=100 + k).reshape(-1, 1))  # bigger than a test block
    bool_ok = torch.randint(0, 2, (50,), dtype=torch.uint8).bool()
    ts_ += [bool_ok, torch.zeros(0, 3), torch.tensor(2.5), raw(1, torch.bfloat16).reshape(())]
    return ts_


@pytest.mark.parametrize("pinned", [False, True])
def test_rehearsal_every_dtype_bit_exact(pinned):
    tensors = tree_of_all_dtypes()
    hooks = FakeHooks()
    out = ts.batch_to_host(tensors, pinned=pinned, ring=ring(), hooks=hooks)
    assert_exact(out, tensors)
    for a in out:  # fresh memory, never the tensor's
        assert a.size == 0 or not any(
            np.shares_memory(a, t.reshape(-1).view(torch.uint8).numpy())
            for t in tensors
            if t.numel()
        )


def test_rehearsal_prepares_like_the_planned_route():
    c = torch.randn(40, dtype=torch.complex64)
    n = torch.randn(30)
    grad = torch.ones(5, requires_grad=True) * 3
    sparse = torch.randn(20, 30).relu().to_sparse()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta"
        csr = torch.eye(7).to_sparse_csr()
    strided = torch.arange(200.0).reshape(10, 20)[:, ::3].t()
    neg = torch._neg_view(n)
    assert neg.is_neg()
    tensors = [c.conj(), neg, grad, sparse, csr, strided]
    out = ts.batch_to_host(tensors, ring=ring(), hooks=FakeHooks())
    assert_exact(out, tensors)
    np.testing.assert_array_equal(out[0], c.conj().resolve_conj().numpy())
    np.testing.assert_array_equal(out[5], strided.numpy())


def test_rehearsal_every_read_waits_for_its_chunk(monkeypatch):
    """The host reads a block only after that chunk's event was waited for,
    and the GPU refills a block only after its previous event was waited."""
    hooks = FakeHooks()
    calls = []
    real = ts.split_jobs

    def spy(pieces, **kw):
        calls.append([ev.synced for ev in hooks.events])
        return real(pieces, **kw)

    monkeypatch.setattr(ts, "split_jobs", spy)
    tensors = [raw(3000, torch.float32, seed=i) for i in range(5)]  # 60 KB through 4 KiB blocks
    out = ts.batch_to_host(tensors, ring=ring(), hooks=hooks)
    assert_exact(out, tensors)
    assert len(calls) == len(hooks.events) > 10
    for k, synced in enumerate(calls):
        assert synced[k], f"chunk {k} read before its event was waited"
    assert hooks.waits == len(hooks.events)  # each chunk waited exactly once


def test_rehearsal_one_wait_for_a_tree_in_one_block():
    hooks = FakeHooks()
    tensors = [raw(100 + i, torch.float32, seed=i) for i in range(50)]
    out = ts.batch_to_host(tensors, ring=ring(block=64 * KiB), hooks=hooks)
    assert_exact(out, tensors)
    assert len(hooks.events) == 1 and hooks.waits == 1


def test_rehearsal_pinned_one_wait_per_device():
    hooks = FakeHooks()
    tensors = [raw(5000 + i, torch.float32, seed=i) for i in range(10)]
    out = ts.batch_to_host(tensors, pinned=True, ring=ring(), hooks=hooks)
    assert_exact(out, tensors)
    assert hooks.waits == 1


def test_rehearsal_small_tensors_are_packed_into_one_transfer():
    hooks = FakeHooks()
    tensors = [raw(4, torch.float32, seed=i) for i in range(2000)]
    out = ts.batch_to_host(tensors, ring=ring(block=64 * KiB), hooks=hooks)
    assert_exact(out, tensors)
    assert len(hooks.events) == 1  # 32 KB of tiny tensors: one pack, one chunk, one wait
    assert not any(np.shares_memory(a, b) for a, b in zip(out, out[1:], strict=False))


def test_rehearsal_threads_share_the_ring():
    r = ring(block=2048, nblocks=2, job=128)
    errors = []

    def worker(seed):
        try:
            for rep in range(5):
                tensors = [
                    raw(700 + 13 * j, torch.float64, seed=seed * 100 + rep * 10 + j)
                    for j in range(4)
                ]
                assert_exact(ts.batch_to_host(tensors, ring=r, hooks=FakeHooks()), tensors)
                hosts = [raw(900 + j, torch.int16, seed=seed + j).numpy() for j in range(3)]
                got = ts.scatter_host_leaves(hosts, "cpu", ring=r, hooks=FakeHooks())
                for h in hosts:
                    assert got[id(h)].numpy().tobytes() == h.tobytes()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_rehearsal_host_to_device_tree_bit_exact(monkeypatch):
    import ml_dtypes

    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.integers(0, 2**32, 5000, dtype=np.uint32).view(np.float32).reshape(50, 100),
        "bf16": rng.integers(0, 2**16, 77, dtype=np.uint16).view(ml_dtypes.bfloat16),
        "f8": rng.integers(0, 2**8, 9000, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
        "bool": rng.integers(0, 2, 33).astype(bool),
        "u64": rng.integers(0, 2**63, 10, dtype=np.uint64),
        "c128": rng.standard_normal(20) + 1j * rng.standard_normal(20),
        "scalar": np.array(3, np.int8),
        "empty": np.zeros((0, 4), np.float16),
        "ro": np.frombuffer(b"\x01\x02\x03\x04" * 300, np.int32),
        "torch": raw(2000, torch.float16),
        "skip_strided": np.arange(10.0)[::-1],  # not contiguous: left to the planned route
        "skip_swapped": np.arange(4, dtype=">f4"),
        "skip_grad": torch.ones(3, requires_grad=True),
        "text": "kept",
    }
    hooks = FakeHooks()
    calls = []
    real = ts.split_jobs

    def spy(pieces, **kw):
        calls.append([ev.synced for ev in hooks.events])
        return real(pieces, **kw)

    monkeypatch.setattr(ts, "split_jobs", spy)
    r = ring(block=4096, nblocks=2)
    done = ts.scatter_host_leaves(tree, "cpu", ring=r, hooks=hooks)
    assert set(done) == {id(v) for k, v in tree.items() if not k.startswith(("skip", "text"))}
    for v in tree.values():
        if id(v) not in done:
            continue
        t = done[id(v)]
        assert tuple(t.shape) == tuple(v.shape)
        assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == (
            v.numpy().tobytes() if isinstance(v, torch.Tensor) else v.tobytes()
        )
        assert t.dtype == (
            v.dtype
            if isinstance(v, torch.Tensor)
            else BACKEND.native_dtype(tb.dtypes.canonical_name(v.dtype))
        )
    # a block is packed again only after the copies out of its last chunk were waited for
    for k, synced in enumerate(calls):
        if k >= 2:
            assert synced[k - 2], f"block of chunk {k} refilled before chunk {k - 2} was waited"
    assert r.blocks[0].event is not None or r.blocks[1].event is not None  # no wait at the end


def test_rehearsal_fallback_without_pinned_memory(monkeypatch):
    r = ring()

    def refuse(i):
        raise RuntimeError("cudaHostAlloc failed")

    monkeypatch.setattr(r, "block", refuse)
    tensors = [raw(3000, torch.float32, seed=i) for i in range(3)]
    before = ts.stats()["fallbacks"]
    assert_exact(ts.batch_to_host(tensors, ring=r, hooks=FakeHooks()), tensors)
    ro = np.frombuffer(raw(500, torch.int16, seed=7).numpy().tobytes(), np.int16)
    assert not ro.flags.writeable  # torch.from_numpy would warn (an error here): must be avoided
    hosts = [raw(999, torch.int32).numpy(), ro]
    got = ts.scatter_host_leaves(hosts, "cpu", ring=r, hooks=FakeHooks())
    for h in hosts:
        assert got[id(h)].numpy().tobytes() == h.tobytes()
    assert ts.stats()["fallbacks"] == before + 2


def test_rehearsal_error_in_a_copy_thread_surfaces(monkeypatch):
    r = ring(block=4096, nblocks=2, job=128)
    tensors = [raw(5000, torch.float32)]
    real = np.copyto
    n = [0]

    def flaky(dst, src):
        n[0] += 1
        if n[0] == 7:
            raise MemoryError("boom")
        real(dst, src)

    monkeypatch.setattr(ts.np, "copyto", flaky)
    with pytest.raises(MemoryError):
        ts.batch_to_host(tensors, ring=r, hooks=FakeHooks())
    monkeypatch.setattr(ts.np, "copyto", real)
    assert not r.lock.locked()
    assert_exact(
        ts.batch_to_host(tensors, ring=r, hooks=FakeHooks()), tensors
    )  # the ring still works


def test_rehearsal_error_mid_chunk_records_the_blocks_event(monkeypatch):
    """source() fails for the second item of a chunk after the first item's copy was
    queued: the block's event must still be recorded, and waited before the block is reused."""
    r = ring(block=64 * KiB, nblocks=2)
    log = []
    hooks = FakeHooks(log)
    # a lone float32 (copied directly) then two float16 (one pack): both items in one chunk
    tensors = [
        raw(100, torch.float32, seed=1),
        raw(100, torch.float16, seed=2),
        raw(100, torch.float16, seed=3),
    ]

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ts, "_flatten", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        ts.batch_to_host(tensors, ring=r, hooks=hooks)
    monkeypatch.undo()
    assert len(hooks.events) == 1  # recorded although the chunk never finished
    assert r.blocks[0].event is hooks.events[0] and not hooks.events[0].synced
    assert not r.lock.locked()
    later = FakeHooks(log)
    assert_exact(ts.batch_to_host(tensors, ring=r, hooks=later), tensors)  # reuses block 0
    assert hooks.events[0].synced
    assert log.index(("wait", hooks.events[0].n)) < log.index(("record", later.events[0].n))


def test_rehearsal_error_mid_chunk_host_to_device_records_the_blocks_event():
    r = ring(block=64 * KiB, nblocks=2)
    log = []
    hooks = FakeHooks(log)

    class Refusing:  # a device tensor whose copy_ fails (e.g. a device lost part-way)
        def reshape(self, *a):
            return self

        def view(self, *a):
            return self

        def __getitem__(self, k):
            return self

        def copy_(self, *a, **k):
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")

    srcs = [
        raw(100, torch.float32, seed=1).numpy().view(np.uint8),
        raw(100, torch.float32, seed=2).numpy().view(np.uint8),
    ]
    dsts = [torch.empty(100), Refusing()]
    with pytest.raises(RuntimeError, match="illegal"):
        ts.batch_to_device(srcs, dsts, ring=r, hooks=hooks)
    assert len(hooks.events) == 1 and r.blocks[0].event is hooks.events[0]
    assert hooks.recorded_on == [torch.device("cpu")]
    assert not r.lock.locked()
    hosts = [raw(3000, torch.int16, seed=5).numpy()]
    later = FakeHooks(log)
    got = ts.scatter_host_leaves(hosts, "cpu", ring=r, hooks=later)
    assert got[id(hosts[0])].numpy().tobytes() == hosts[0].tobytes()
    assert hooks.events[0].synced
    assert log.index(("wait", hooks.events[0].n)) < log.index(("record", later.events[0].n))


def test_rehearsal_busy_ring_is_never_waited_for():
    """Another thread holds the ring: copy plainly at once (no event, no wait), every dtype."""
    r = ring()
    tensors = tree_of_all_dtypes()
    ro = np.frombuffer(raw(700, torch.float32, seed=3).numpy().tobytes(), np.float32)
    hosts = {"w": raw(3000, torch.float64, seed=4).numpy(), "ro": ro, "t": raw(50, torch.bfloat16)}
    before = ts.stats()
    assert r.lock.acquire(blocking=False)
    try:
        hooks = FakeHooks()
        out = ts.batch_to_host(tensors, ring=r, hooks=hooks)
        got = ts.scatter_host_leaves(hosts, "cpu", ring=r, hooks=hooks)
        assert hooks.events == [] and hooks.log == []  # never touched the ring's blocks
        assert r.blocks == [None] * r.num_blocks
    finally:
        r.lock.release()
    assert_exact(out, tensors)
    for a in out:
        assert a.flags.writeable
    for v in hosts.values():
        want = (
            v.reshape(-1).view(torch.uint8).numpy().tobytes()
            if isinstance(v, torch.Tensor)
            else v.tobytes()
        )
        assert got[id(v)].reshape(-1).view(torch.uint8).numpy().tobytes() == want
    after = ts.stats()
    assert after["contended"] == before["contended"] + 2
    assert after["fallbacks"] == before["fallbacks"]


def test_rehearsal_record_gets_each_chunks_device(monkeypatch):
    """Several (fake) devices: every event is recorded on the device of its chunk's
    pieces, chunks never mix devices, and pinned=True waits once per device."""
    chunks_seen = []
    real = ts.plan_chunks

    def spy(*a, **k):
        got = real(*a, **k)
        chunks_seen.append(got)
        return got

    monkeypatch.setattr(ts, "plan_chunks", spy)
    tensors, devices = [], {}
    for k in range(12):
        t = raw([5, 3000, 40, 1500][k % 4] + k, [torch.float32, torch.int16][k % 2], seed=k)
        tensors.append(t)
        devices[id(t)] = f"cuda:{k % 3}"
    hooks = FakeHooks(devices=devices)
    out = ts.batch_to_host(tensors, ring=ring(block=4096, nblocks=3), hooks=hooks)
    assert_exact(out, tensors)
    (chunks,) = chunks_seen
    assert len(chunks) > 3
    assert [str(d) for d in hooks.recorded_on] == [c.key for c in chunks]
    assert sorted(set(c.key for c in chunks)) == ["cuda:0", "cuda:1", "cuda:2"]
    pinned = FakeHooks(devices=devices)
    assert_exact(ts.batch_to_host(tensors, pinned=True, ring=ring(), hooks=pinned), tensors)
    assert sorted(pinned.recorded_on) == ["cuda:0", "cuda:1", "cuda:2"] and pinned.waits == 3


def test_rehearsal_pinned_falls_back_when_page_locking_is_refused(monkeypatch):
    real = torch.empty

    def refuse_pinned(*a, **k):
        if "pin_memory" in k:
            raise RuntimeError("cudaHostAlloc failed: out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(torch, "empty", refuse_pinned)
    tensors = [raw(5000 + i, torch.float32, seed=i) for i in range(3)] + [raw(3, torch.int8)]
    before = ts.stats()["fallbacks"]
    hooks = FakeHooks()
    out = ts.batch_to_host(tensors, pinned=True, ring=ring(), hooks=hooks)
    monkeypatch.undo()
    assert_exact(out, tensors)
    assert ts.stats()["fallbacks"] == before + len(tensors)
    assert hooks.waits == 0  # plain .cpu() copies have landed on return


def chalf():
    """A tensor of a dtype tensorbridge refuses (torch.complex32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ComplexHalf support is experimental"
        return torch.zeros(4, dtype=torch.complex32)


def test_rehearsal_unsupported_dtype_fails_before_any_copy(monkeypatch):
    hooks = FakeHooks()
    r = ring()
    called = []
    monkeypatch.setattr(ts, "plan_chunks", lambda *a, **k: called.append(1) or [])
    with pytest.raises(tb.ConversionError, match="complex32"):
        ts.batch_to_host([raw(3000, torch.float32), chalf()], ring=r, hooks=hooks)
    assert called == [] and hooks.events == [] and r.blocks == [None] * r.num_blocks


@pytest.fixture
def fake_cuda_leaves(monkeypatch):
    """gather_device_leaves on the CPU: every tensor claims to be a CUDA tensor."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def test_gather_unsupported_dtype_names_the_leaf_before_copying(fake_cuda_leaves, monkeypatch):
    def boom(*a, **k):  # pragma: no cover - must not be called
        raise AssertionError("nothing may be copied before every dtype is checked")

    monkeypatch.setattr(ts, "batch_to_host", boom)
    tree = {"a": [torch.ones(3), {"b": chalf()}]}
    with pytest.raises(tb.ConversionError) as info:
        tb.to_numpy(tree)
    assert "['a'][1]['b']" in str(info.value) and "complex32" in str(info.value)


def test_gather_cuda_runtime_errors_become_conversion_errors(fake_cuda_leaves, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ts, "batch_to_host", oom)
    with pytest.raises(tb.ConversionError, match="out of memory") as info:
        tb.to_numpy({"w": torch.ones(3)})
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "Fix:" in str(info.value)


def test_scatter_gives_up_on_cuda_runtime_errors(monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("CUDA error: invalid device ordinal")

    monkeypatch.setattr(ts, "batch_to_device", refuse)
    r = ring()
    assert ts.scatter_host_leaves({"a": np.ones(3)}, "cpu", ring=r, hooks=FakeHooks()) == {}
    assert not r.lock.locked()


def test_flatten_concatenates_bytes_of_any_dtype():
    parts = [raw(7, torch.float8_e4m3fn, seed=1), raw(5, torch.float8_e5m2, seed=2)]
    flat = ts._flatten(parts, torch)
    assert flat.dtype == torch.uint8
    assert flat.numpy().tobytes() == b"".join(reference(t) for t in parts)


def test_after_fork_keeps_the_parents_ring_alive(monkeypatch):
    import sys

    r = ring()
    blk = r.block(0)
    monkeypatch.setattr(ts, "_RING", r)
    monkeypatch.setattr(ts, "_POOL", None)
    monkeypatch.setattr(ts, "_LEAKED", [])
    old_lock = ts._STATS_LOCK
    before = sys.getrefcount(blk.tensor)
    monkeypatch.setattr(ts, "_GLOBAL_LOCK", ts._GLOBAL_LOCK)  # restored after the test
    monkeypatch.setattr(ts, "_STATS_LOCK", old_lock)
    ts._after_fork()
    assert ts._RING is None and ts._STATS_LOCK is not old_lock
    assert sys.getrefcount(blk.tensor) > before  # a reference that is never dropped (leaks 4 KiB)
    assert ts.stats()["fallbacks"] >= 0  # the fresh stats lock works


# ------------------------------------------------------------------ the public plumbing, CPU only


def test_pinned_is_a_no_op_without_cuda_tensors():
    a = np.arange(3.0)
    t = torch.arange(4.0)
    assert tb.to_numpy(a, pinned=True) is a
    out = tb.to_numpy({"t": t, "a": a}, pinned=True)
    assert np.shares_memory(out["t"], t.numpy()) and out["a"] is a
    assert tb.convert(t, to="numpy", pinned=True).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_pinned_is_for_numpy_results_only():
    with pytest.raises(tb.ConversionError, match="pinned"):
        tb.convert(np.ones(2), to="torch", pinned=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_tree_to_cuda_without_cuda_still_refuses():
    with pytest.raises(tb.DeviceError):
        tb.to_torch({"a": np.ones(3)}, device="cuda")
    assert ts.scatter_host_leaves({"a": np.ones(3)}, "cuda") == {}


def test_copy_false_to_cuda_skips_the_ring(monkeypatch):
    def boom(*a, **k):  # pragma: no cover - must not be called
        raise AssertionError("the ring must not run for copy=False")

    monkeypatch.setattr(ts, "scatter_host_leaves", boom)
    with pytest.raises((tb.CopyError, tb.DeviceError)):
        tb.to_torch({"a": np.ones(3)}, device="cuda", copy=False)
