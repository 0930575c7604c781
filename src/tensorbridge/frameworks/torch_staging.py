"""Pinned staging for whole trees moving between CUDA and the host.

Device -> host (:func:`batch_to_host`): every CUDA tensor of a tree goes
through a small ring of page-locked blocks (4 x 64 MiB, allocated once per
process, on first use). Each block-sized *chunk* is copied with
``copy_(non_blocking=True)`` on the caller's current CUDA stream of the
tensor's device, and a :class:`torch.cuda.Event` is recorded after it. While
later chunks are in flight, a small thread pool copies each landed chunk into
fresh NumPy arrays (``np.copyto`` releases the GIL, and the threads first-touch
the fresh pages in parallel). A block's event is always synchronised before the
block is read, and a block is only refilled after the host has finished
reading it, so no byte is ever read before its copy has landed. Tensors larger
than a block are split across chunks; many small tensors of one dtype are first
packed on the device (one ``cat``), so a tree of 10,000 tiny tensors costs a
handful of copies, not 10,000. A tree that fits in one block costs one
synchronisation.

``pinned=True`` skips the ring: each result (or pack of small results) gets its
own page-locked buffer from torch's caching host allocator, the copies land in
it directly, one event per device is synchronised, and the NumPy arrays view
that page-locked memory (freed back to torch's cache when the arrays go).

Host -> device (:func:`scatter_host_leaves`): NumPy arrays and CPU tensors of a
tree are packed into the ring's blocks by the thread pool while earlier blocks
are copied to the device, into one fresh device tensor per leaf. No host
synchronisation at the end: the copies are ordered on the caller's current
stream, and each block's event is waited before the block is written again.

The ring is guarded by a lock that is never waited for: a thread that finds
the ring busy copies on its own instead (plain ``.cpu()`` per item device ->
host, plain copies host -> device), so no thread ever blocks on another's
event synchronisation (no head-of-line blocking, no deadlock with collectives
that other threads are waiting on). Device temporaries (contiguous copies,
densified sparse tensors, packs) are made one item at a time, when the item is
copied, and dropped after its last chunk. The planning functions at
the top (:func:`plan_chunks`, :func:`plan_packs`, :func:`split_jobs`) are pure
Python and are tested without CUDA; the executors take a ``_Hooks`` object so
the whole pipeline can also be rehearsed with CPU tensors standing in for
device tensors.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import canonical_name, numpy_dtype
from ..errors import ConversionError

__all__ = [
    "ALIGN",
    "BLOCK_BYTES",
    "NUM_BLOCKS",
    "SMALL_BYTES",
    "Piece",
    "Chunk",
    "Pack",
    "plan_chunks",
    "plan_packs",
    "split_jobs",
    "batch_to_host",
    "batch_to_device",
    "scatter_host_leaves",
    "stats",
    "quiesce",
]

KiB, MiB = 1 << 10, 1 << 20
ALIGN = 64  # every piece starts at a multiple of this, in staging and in its source
BLOCK_BYTES = 64 * MiB  # one pinned ring block
NUM_BLOCKS = 4
SMALL_BYTES = 1 * MiB  # tensors up to this size are packed (per device and dtype) before copying
JOB_BYTES = 4 * MiB  # the smallest host memcpy handed to a pool thread
THREADS = max(1, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------ planning (pure Python)


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class Piece:
    """Bytes ``[src_off, src_off + nbytes)`` of item ``item`` at ``stage_off`` in a block."""

    item: int
    src_off: int
    stage_off: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """What one ring block carries in one trip: pieces of one key (device) only."""

    index: int
    block: int
    key: Hashable
    pieces: tuple[Piece, ...]

    @property
    def end(self) -> int:
        """Bytes of the block in use (the end of the last piece)."""
        return max((p.stage_off + p.nbytes for p in self.pieces), default=0)


def plan_chunks(
    sizes: Sequence[int],
    *,
    keys: Sequence[Hashable] | None = None,
    block_bytes: int = BLOCK_BYTES,
    num_blocks: int = NUM_BLOCKS,
    align: int = ALIGN,
) -> list[Chunk]:
    """Lay items of ``sizes`` bytes into block-sized chunks, in order.

    Every byte of every item lands in exactly one piece. Pieces start at
    multiples of ``align`` in the block and in their item. An item that fits
    in a block is never split (it starts a new chunk when the current one is
    too full); a larger one fills the rest of the current chunk and goes on in
    the next ones. Items of different ``keys`` (devices) never share a chunk.
    Empty items get no piece. Chunk ``i`` uses block ``i % num_blocks``.
    """
    if block_bytes <= 0 or block_bytes % align or num_blocks < 1:
        raise ValueError(f"block_bytes={block_bytes} must be a positive multiple of align={align}")
    chunks: list[Chunk] = []
    cur: list[Piece] = []
    used = 0
    cur_key: Any = None

    def flush() -> None:
        nonlocal cur, used
        if cur:
            i = len(chunks)
            chunks.append(Chunk(i, i % num_blocks, cur_key, tuple(cur)))
        cur, used = [], 0

    for i, n in enumerate(sizes):
        if n < 0:
            raise ValueError(f"item {i} has a negative size {n}")
        if n == 0:
            continue
        key = None if keys is None else keys[i]
        if cur and key != cur_key:
            flush()
        cur_key = key
        if n <= block_bytes and align_up(used, align) + n > block_bytes:
            flush()
        off = 0
        while off < n:
            start = align_up(used, align)
            room = block_bytes - start
            if room <= 0:
                flush()
                continue
            take = min(n - off, room)
            cur.append(Piece(i, off, start, take))
            used = start + take
            off += take
            if used >= block_bytes:
                flush()
    flush()
    return chunks


@dataclass(frozen=True)
class Pack:
    """Small items of one key packed back to back: ``members`` is ``(item, byte offset)``."""

    key: Hashable
    members: tuple[tuple[int, int], ...]
    nbytes: int


def plan_packs(
    sizes: Sequence[int],
    keys: Sequence[Hashable],
    *,
    small_bytes: int = SMALL_BYTES,
    pack_bytes: int = BLOCK_BYTES,
) -> tuple[list[Pack], list[int]]:
    """Group the small items of each key into packs of at most ``pack_bytes``.

    Returns ``(packs, direct)``: ``direct`` lists the items copied on their
    own (larger than ``small_bytes``, or alone in their key). Members of a pack
    sit back to back in item order (the device packs them with one ``cat``, so
    there is no padding: items of one key share a dtype, hence an alignment).
    Empty items are in neither: they need no copy.
    """
    groups: dict[Hashable, list[int]] = {}
    direct: list[int] = []
    for i, n in enumerate(sizes):
        if n == 0:
            continue
        if n > small_bytes:
            direct.append(i)
        else:
            groups.setdefault(keys[i], []).append(i)
    packs: list[Pack] = []
    for key, items in groups.items():
        cur: list[tuple[int, int]] = []
        used = 0
        for item in [*items, None]:
            if item is None or (cur and used + sizes[item] > pack_bytes):
                if len(cur) == 1:
                    direct.append(cur[0][0])
                elif cur:
                    packs.append(Pack(key, tuple(cur), used))
                cur, used = [], 0
            if item is not None:
                cur.append((item, used))
                used += sizes[item]
    direct.sort()
    return packs, direct


def split_jobs(
    pieces: Sequence[Piece],
    *,
    threads: int = THREADS,
    min_bytes: int = JOB_BYTES,
    align: int = ALIGN,
) -> list[list[Piece]]:
    """Cut a chunk's pieces into at most about ``threads`` memcpy jobs of similar size.

    Jobs are at least ``min_bytes`` (small chunks are one job). A piece may be
    cut; cuts fall on multiples of ``align``. Every byte of every piece is in
    exactly one job.
    """
    total = sum(p.nbytes for p in pieces)
    if total == 0:
        return []
    target = align_up(max(min_bytes, -(-total // max(1, threads))), align)
    jobs: list[list[Piece]] = [[]]
    room = target
    for p in pieces:
        off = 0
        while off < p.nbytes:
            if room <= 0:
                jobs.append([])
                room = target
            take = min(p.nbytes - off, room)
            if take < p.nbytes - off:  # a cut: keep it on an aligned boundary
                take = max(align, take // align * align)
                take = min(take, p.nbytes - off)
            jobs[-1].append(Piece(p.item, p.src_off + off, p.stage_off + off, take))
            off += take
            room -= take
    return [j for j in jobs if j]


# ------------------------------------------------------------------ the ring

# fallbacks: page-locked memory refused (plain copies instead); contended: the ring was
# busy with another thread's transfer (plain copies instead of waiting for it).
_STATS = {
    "d2h_calls": 0,
    "h2d_calls": 0,
    "chunks": 0,
    "host_waits": 0,
    "bytes": 0,
    "pinned_calls": 0,
    "fallbacks": 0,
    "contended": 0,
}
_STATS_LOCK = threading.Lock()


def stats() -> dict[str, int]:
    """Counters since the process started (for tests and benchmarks)."""
    with _STATS_LOCK:
        return dict(_STATS)


def _count(**kw: int) -> None:
    with _STATS_LOCK:
        for k, v in kw.items():
            _STATS[k] += v


class _Block:
    __slots__ = ("tensor", "array", "event")

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor  # uint8 torch tensor (pinned on CUDA machines)
        self.array = tensor.numpy()  # the same bytes, for the memcpy threads
        self.event: Any = None  # the last GPU use of the block, not yet waited for

    def wait(self) -> None:
        """Block the host until the GPU is done with this block."""
        ev, self.event = self.event, None
        if ev is not None:
            ev.synchronize()
            _count(host_waits=1)


class _Ring:
    """``num_blocks`` staging blocks, allocated on first use, one user at a time."""

    def __init__(
        self,
        *,
        pin: bool,
        block_bytes: int = BLOCK_BYTES,
        num_blocks: int = NUM_BLOCKS,
        align: int = ALIGN,
        job_bytes: int = JOB_BYTES,
    ) -> None:
        if num_blocks < 2:
            raise ValueError("a ring needs at least two blocks to overlap copies")
        if block_bytes <= 0 or block_bytes % align:
            raise ValueError(
                f"block_bytes={block_bytes} must be a positive multiple of align={align}"
            )
        self.pin, self.block_bytes, self.num_blocks, self.align = (
            pin,
            block_bytes,
            num_blocks,
            align,
        )
        self.job_bytes = job_bytes
        self.blocks: list[_Block | None] = [None] * num_blocks
        self.lock = threading.Lock()

    def block(self, i: int) -> _Block:
        b = self.blocks[i]
        if b is None:
            torch = sys.modules["torch"]
            b = self.blocks[i] = _Block(
                torch.empty(self.block_bytes, dtype=torch.uint8, pin_memory=self.pin)
            )
        return b


_RING: _Ring | None = None
_POOL: ThreadPoolExecutor | None = None
_GLOBAL_LOCK = threading.Lock()
_LEAKED: list[Any] = []  # a forked child must never free its parent's pinned blocks


def _ring() -> _Ring:
    global _RING
    if _RING is None:
        with _GLOBAL_LOCK:
            if _RING is None:
                _RING = _Ring(pin=True)
    return _RING


def quiesce() -> None:
    """Wait until the GPU is done with every ring block (a no-op when none is in use)."""
    r = _RING
    if r is not None:
        with r.lock:
            for b in r.blocks:
                if b is not None:
                    b.wait()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        with _GLOBAL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(THREADS, thread_name_prefix="tensorbridge-staging")
    return _POOL


def _keep_forever(obj: Any) -> None:
    """Take a reference that is never dropped, not even at interpreter shutdown."""
    if obj is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _after_fork() -> None:  # CUDA and threads do not survive fork: start afresh in the child
    global _RING, _POOL, _GLOBAL_LOCK, _STATS_LOCK
    # The parent's pinned blocks must never be freed in the child (that would be a CUDA call
    # in a forked process): keep them, and the objects holding them, alive for good.
    if _RING is not None:
        for b in _RING.blocks:
            if b is not None:
                _keep_forever(b.tensor)
                _keep_forever(b)
        _keep_forever(_RING)
    _keep_forever(_POOL)
    _LEAKED.append((_RING, _POOL))
    _RING, _POOL, _GLOBAL_LOCK = None, None, threading.Lock()
    _STATS_LOCK = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class _Done(Future[None]):
    def __init__(self) -> None:
        super().__init__()
        self.set_result(None)


_DONE = _Done()


def _submit(fn: Callable[[list[Piece]], None], jobs: list[list[Piece]]) -> list[Future[None]]:
    if not jobs:
        return []
    if len(jobs) == 1:  # a small chunk: a pool round trip costs more than the copy
        fn(jobs[0])
        return [_DONE]
    pool = _pool()
    return [pool.submit(fn, job) for job in jobs]


def _wait_all(futures: list[Future[None]]) -> None:
    err = None
    for f in futures:
        try:
            f.result()
        except BaseException as exc:  # wait for all of them before raising
            err = err or exc
    if err is not None:
        raise err


def _drain(pending: dict[int, list[Future[None]]]) -> None:
    for futs in pending.values():
        for f in futs:
            try:
                f.result()
            except BaseException:  # the first error is already on its way up
                pass
    pending.clear()


class _Hooks:
    """What a real CUDA run does that a CPU rehearsal (tests) cannot."""

    pin = True

    def record(self, device: Any) -> Any:
        """An event after everything enqueued so far on the caller's current stream."""
        torch = sys.modules["torch"]
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))
        return ev

    def device(self, t: Any) -> Any:
        """The device a tensor's copies are ordered on (tests fake several devices)."""
        return t.device


_CUDA = _Hooks()


# ------------------------------------------------------------------ device -> host


def _prepare(t: Any, torch: Any) -> Any:
    """Detach, densify, resolve conj/neg bits, make contiguous (all on the device)."""
    if t.requires_grad:
        t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def _flatten(tensors: list[Any], torch: Any) -> Any:
    """Contiguous tensors of one device -> one flat uint8 tensor, back to back.

    Concatenates byte views: the same bytes for every dtype, and CUDA ``cat``
    has every dtype for uint8 (it has no float8 before torch 2.6).
    """
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])


_NP_DTYPES: dict[Any, np.dtype] = {}


def _numpy_dtype(dtype: Any) -> np.dtype:
    """The NumPy (ml_dtypes) dtype for a torch dtype, cached."""
    got = _NP_DTYPES.get(dtype)
    if got is None:
        from .torch import BACKEND

        got = _NP_DTYPES[dtype] = numpy_dtype(BACKEND.canonical(dtype))
    return got


def batch_to_host(
    tensors: list[Any], *, pinned: bool = False, ring: _Ring | None = None, hooks: _Hooks = _CUDA
) -> list[np.ndarray]:
    """CUDA tensors -> host arrays, bit-exact, in each tensor's own dtype.

    Fresh pageable NumPy arrays through the pinned ring by default; with
    ``pinned=True``, arrays viewing page-locked memory. Nothing is returned
    before every copy has landed. Every dtype is resolved before anything is
    copied (an unsupported one raises :class:`ConversionError` at once).
    Device temporaries (contiguous copies, packs) are made lazily, one item at
    a time. (``ring`` and ``hooks`` are for tests.)
    """
    torch = sys.modules["torch"]
    dts = [_numpy_dtype(t.dtype) for t in tensors]  # fail before any copy
    sizes = [t.numel() * t.element_size() for t in tensors]  # the originals: nothing prepared yet
    devs = [hooks.device(t) for t in tensors]
    keys = [(d, t.dtype) for d, t in zip(devs, tensors, strict=True)]
    packs, direct = plan_packs(sizes, keys, pack_bytes=(ring.block_bytes if ring else BLOCK_BYTES))
    # Items: what crosses the link. A direct tensor, or a pack of small ones of one device/dtype.
    # where[i] = (item, byte offset in the item) for every non-empty tensor i.
    items: list[tuple[Any, Any]] = []  # (device, source: int tensor index | Pack)
    where: dict[int, tuple[int, int]] = {}
    for i in direct:
        where[i] = (len(items), 0)
        items.append((devs[i], i))
    for p in packs:
        for i, off in p.members:
            where[i] = (len(items), off)
        items.append((p.key[0], p))  # type: ignore[index]  # keys are (device, dtype)
    order = sorted(range(len(items)), key=lambda j: str(items[j][0]))  # group by device
    items = [items[j] for j in order]
    renum = {old: new for new, old in enumerate(order)}
    where = {i: (renum[j], off) for i, (j, off) in where.items()}
    item_sizes = [sizes[src] if isinstance(src, int) else src.nbytes for _, src in items]

    def source(j: int) -> Any:  # the item's bytes on the device, flat uint8, made now
        src = items[j][1]
        if isinstance(src, int):
            return _prepare(tensors[src], torch).reshape(-1).view(torch.uint8)
        return _flatten([_prepare(tensors[i], torch) for i, _ in src.members], torch)

    if pinned:
        hosts = _to_pinned(items, item_sizes, source, hooks, torch)
    else:
        hosts = _through_ring(items, item_sizes, source, ring or _ring(), hooks)
    out = []
    for i, t in enumerate(tensors):
        n = sizes[i]
        if n == 0:
            out.append(np.empty(tuple(t.shape), dts[i]))
            continue
        j, off = where[i]
        out.append(hosts[j][off : off + n].view(dts[i]).reshape(tuple(t.shape)))
    _count(d2h_calls=1, bytes=sum(sizes), pinned_calls=int(pinned))
    return out


def _plain_to_host(item_sizes: list[int], source: Callable[[int], Any]) -> list[np.ndarray]:
    """No ring: one synchronous ``.cpu()`` per item, into fresh pageable memory."""
    return [source(j).cpu().numpy() for j in range(len(item_sizes))]


def _to_pinned(
    items: list[Any], item_sizes: list[int], source: Callable[[int], Any], hooks: _Hooks, torch: Any
) -> list[np.ndarray]:
    """One page-locked buffer per item, one copy each, one wait per device.

    Where page-locking is refused (e.g. a memlock limit), that item is copied
    with a plain ``.cpu()`` into pageable memory instead.
    """
    hosts, events = [], {}
    for j, (dev, _) in enumerate(items):
        try:
            buf = torch.empty(item_sizes[j], dtype=torch.uint8, pin_memory=hooks.pin)
        except RuntimeError:
            _count(fallbacks=1)
            hosts.append(source(j).cpu().numpy())  # synchronous: landed on return
            continue
        buf.copy_(source(j), non_blocking=True)
        hosts.append(buf.numpy())
        events[str(dev)] = dev
    waits = [hooks.record(dev) for dev in events.values()]
    for ev in waits:
        ev.synchronize()
    _count(host_waits=len(waits))
    return hosts


def _through_ring(
    items: list[Any],
    item_sizes: list[int],
    source: Callable[[int], Any],
    ring: _Ring,
    hooks: _Hooks,
) -> list[np.ndarray]:
    chunks = plan_chunks(
        item_sizes,
        keys=[str(d) for d, _ in items],
        block_bytes=ring.block_bytes,
        num_blocks=ring.num_blocks,
        align=ring.align,
    )
    if not ring.lock.acquire(blocking=False):  # another thread's transfer: never wait for it
        _count(contended=1)
        return _plain_to_host(item_sizes, source)
    try:
        try:
            for b in sorted({c.block for c in chunks}):
                ring.block(b)
        except RuntimeError:  # page-locked memory refused (e.g. a memlock limit): plain copies
            _count(fallbacks=1)
            return _plain_to_host(item_sizes, source)
        hosts = [np.empty(n, np.uint8) for n in item_sizes]  # fresh; first touched by the threads
        last_chunk = {}
        for c in chunks:
            for p in c.pieces:
                last_chunk[p.item] = c.index
        reading: dict[int, list[Future[None]]] = {}  # block -> memcpy jobs still reading it
        landed: deque[Chunk] = deque()  # enqueued, not yet handed to the threads
        live: dict[int, Any] = {}  # item -> its flat device source, while pieces remain

        def hand_over(c: Chunk) -> None:
            blk = ring.block(c.block)
            blk.wait()  # the chunk has landed: only now may the host read it

            def copy(job: list[Piece], arr: np.ndarray = blk.array) -> None:
                for p in job:
                    np.copyto(
                        hosts[p.item][p.src_off : p.src_off + p.nbytes],
                        arr[p.stage_off : p.stage_off + p.nbytes],
                    )

            reading[c.block] = _submit(
                copy, split_jobs(c.pieces, align=ring.align, min_bytes=ring.job_bytes)
            )

        try:
            for c in chunks:
                _wait_all(reading.pop(c.block, []))  # the host is done with the block's last chunk
                blk = ring.block(c.block)
                blk.wait()  # and so is the GPU (e.g. an earlier host->device use)
                issued = False
                try:
                    for p in c.pieces:
                        src = live.get(p.item)
                        if src is None:
                            src = live[p.item] = source(p.item)  # prepared now, not before
                        blk.tensor[p.stage_off : p.stage_off + p.nbytes].copy_(
                            src[p.src_off : p.src_off + p.nbytes], non_blocking=True
                        )
                        issued = True
                        if last_chunk[p.item] == c.index:
                            del live[p.item]  # stream-ordered: the allocator may reuse it safely
                finally:
                    # Also after an error part-way (e.g. out of memory preparing the next item):
                    # copies into the block may be in flight, so its next user must wait for them.
                    if issued:
                        blk.event = hooks.record(items[c.pieces[0].item][0])
                while landed:  # overlap: wait for the previous chunk while this one flies
                    hand_over(landed.popleft())
                landed.append(c)
            while landed:
                hand_over(landed.popleft())
            for b in list(reading):
                _wait_all(reading.pop(b))
        finally:
            _drain(reading)  # after an error: never leave a thread reading a block we give up
    finally:
        ring.lock.release()
    _count(chunks=len(chunks))
    return hosts


# ------------------------------------------------------------------ host -> device


def _host_source(leaf: Any, torch: Any) -> tuple[np.ndarray, Any, tuple[int, ...]] | None:
    """``(flat uint8 bytes, torch dtype, shape)`` for a leaf the ring can take, else None."""
    from .torch import BACKEND

    tp = type(leaf)
    if tp is np.ndarray or tp is np.memmap:
        dt = leaf.dtype
        if not (dt.isnative and leaf.flags.c_contiguous) or dt.fields is not None:
            return None
        try:
            name = canonical_name(dt)
        except ConversionError:
            return None
        tdt = BACKEND.native_dtype(name)
        if tdt is None:
            return None
        return np.asarray(leaf).reshape(-1).view(np.uint8), tdt, leaf.shape
    if tp is torch.Tensor:
        if (
            leaf.device.type != "cpu"
            or leaf.layout != torch.strided
            or leaf.requires_grad
            or leaf.is_conj()
            or leaf.is_neg()
            or not leaf.is_contiguous()
        ):
            return None
        try:
            BACKEND.canonical(leaf.dtype)
        except Exception:
            return None
        return leaf.reshape(-1).view(torch.uint8).numpy(), leaf.dtype, tuple(leaf.shape)
    return None


def scatter_host_leaves(
    tree: Any, device: Any, *, ring: _Ring | None = None, hooks: _Hooks = _CUDA
) -> dict[int, Any]:
    """Copy the host leaves of ``tree`` to CUDA ``device`` through the pinned ring.

    Takes C-contiguous native-order NumPy arrays, and CPU tensors without grad
    or conj/neg bits, of dtypes torch has; returns ``{id(leaf): device
    tensor}`` (one fresh tensor per leaf, same dtype and shape). Other leaves
    are left to the planned route. Empty when CUDA is not available, and when
    CUDA refuses (out of memory, an invalid ordinal such as ``"cuda:7"``, CUDA
    re-initialised in a forked child): the planned route then raises its own
    error, with the leaf's path.
    """
    torch = sys.modules["torch"]
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return {}  # the planned route says why
    if hooks is _CUDA and (dev.type != "cuda" or not torch.cuda.is_available()):
        return {}
    from ..tree import tree_leaves_with_path

    srcs, dsts, ids = [], [], []
    seen: set[int] = set()
    try:
        for _, leaf in tree_leaves_with_path(tree):
            if id(leaf) in seen:
                continue
            got = _host_source(leaf, torch)
            if got is None:
                continue
            seen.add(id(leaf))
            flat, tdt, shape = got
            srcs.append(flat)
            dsts.append(torch.empty(shape, dtype=tdt, device=dev))
            ids.append(id(leaf))
        if not srcs:
            return {}
        batch_to_device(srcs, dsts, ring=ring, hooks=hooks)
    except RuntimeError:
        return {}  # CUDA refused: the planned route raises a DeviceError/ConversionError itself
    return dict(zip(ids, dsts, strict=True))


def _plain_to_device(srcs: list[np.ndarray], flats: list[Any], torch: Any) -> None:
    """No ring: one plain (synchronous) copy per array; read-only arrays are copied first
    (``torch.from_numpy`` warns on read-only memory)."""
    for a, f in zip(srcs, flats, strict=True):
        if a.nbytes:
            f.copy_(torch.from_numpy(a if a.flags.writeable else a.copy()))


def batch_to_device(
    srcs: list[np.ndarray], dsts: list[Any], *, ring: _Ring | None = None, hooks: _Hooks = _CUDA
) -> None:
    """Copy flat uint8 host arrays into same-sized device tensors of one device.

    The pool packs chunk ``k + 1`` into its block while chunk ``k`` is copied
    to the device. Returns without a host wait: the copies are ordered on the
    current stream, and each block's event is waited before it is refilled.
    When another thread is using the ring, plain copies instead of waiting.
    """
    torch = sys.modules["torch"]
    ring = ring or _ring()
    sizes = [a.nbytes for a in srcs]
    flats = [d.reshape(-1).view(torch.uint8) for d in dsts]
    chunks = plan_chunks(
        sizes, block_bytes=ring.block_bytes, num_blocks=ring.num_blocks, align=ring.align
    )
    device = hooks.device(dsts[0]) if dsts else None
    if not ring.lock.acquire(blocking=False):  # another thread's transfer: never wait for it
        _count(contended=1)
        _plain_to_device(srcs, flats, torch)
        _count(h2d_calls=1, bytes=sum(sizes))
        return
    try:
        try:
            for b in sorted({c.block for c in chunks}):
                ring.block(b)
        except RuntimeError:  # no page-locked memory: plain copies
            _count(fallbacks=1)
            _plain_to_device(srcs, flats, torch)
            return
        packing: dict[int, list[Future[None]]] = {}

        def start(c: Chunk) -> None:
            blk = ring.block(c.block)
            blk.wait()  # the GPU has finished reading this block's last chunk

            def copy(job: list[Piece], arr: np.ndarray = blk.array) -> None:
                for p in job:
                    np.copyto(
                        arr[p.stage_off : p.stage_off + p.nbytes],
                        srcs[p.item][p.src_off : p.src_off + p.nbytes],
                    )

            packing[c.index] = _submit(
                copy, split_jobs(c.pieces, align=ring.align, min_bytes=ring.job_bytes)
            )

        try:
            if chunks:
                start(chunks[0])
            for k, c in enumerate(chunks):
                if k + 1 < len(chunks):
                    start(chunks[k + 1])  # pack the next block while this one is copied
                _wait_all(packing.pop(k))
                blk = ring.block(c.block)
                issued = False
                try:
                    for p in c.pieces:
                        flats[p.item][p.src_off : p.src_off + p.nbytes].copy_(
                            blk.tensor[p.stage_off : p.stage_off + p.nbytes], non_blocking=True
                        )
                        issued = True
                finally:
                    if (
                        issued
                    ):  # also after an error part-way: copies from the block may be in flight
                        blk.event = hooks.record(device)
        finally:
            _drain(packing)  # after an error: never leave a thread writing a block we give up
    finally:
        ring.lock.release()
    _count(h2d_calls=1, chunks=len(chunks), bytes=sum(sizes))
