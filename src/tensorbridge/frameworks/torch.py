"""PyTorch: detach, resolve conj/neg bits, densify sparse, move devices, and
reinterpret bfloat16/float8 bits so NumPy (ml_dtypes) can share them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..dtypes import BITS, NUMPY_NATIVE, lookup, numpy_dtype
from ..errors import ConversionError, DeviceError, message
from .base import SHARE_MIN_BYTES, Backend, Facts, Step

__all__ = ["TorchBackend", "BACKEND"]


class TorchBackend(Backend):
    name = "torch"
    module = "torch"
    extra = "torch"
    DTYPES = {
        "bool": "bool",
        "int8": "int8",
        "int16": "int16",
        "int32": "int32",
        "int64": "int64",
        "uint8": "uint8",
        "uint16": "uint16",
        "uint32": "uint32",
        "uint64": "uint64",
        "float16": "float16",
        "bfloat16": "bfloat16",
        "float32": "float32",
        "float64": "float64",
        "complex64": "complex64",
        "complex128": "complex128",
        "float8_e4m3fn": "float8_e4m3fn",
        "float8_e5m2": "float8_e5m2",
        "float8_e4m3fnuz": "float8_e4m3fnuz",
        "float8_e5m2fnuz": "float8_e5m2fnuz",
        "float8_e8m0fnu": "float8_e8m0fnu",
    }

    copy_small = True  # torch.from_dlpack costs ~3 µs; a small copy through NumPy less

    def __init__(self) -> None:
        self._canonical: dict[Any, str] | None = None
        self._strided: Any = None

    def owns(self, tp: type) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and issubclass(tp, torch.Tensor)

    def canonical(self, dtype: Any) -> str:
        if self._canonical is None:
            self._canonical = {}
            for canonical in self.DTYPES:
                d = self.native_dtype(canonical)
                if d is not None:
                    self._canonical[d] = canonical
        name = self._canonical.get(dtype)
        if name is None:
            quantized = "q" in str(dtype).rpartition(".")[2][:2]  # torch.qint8, quint8, ...
            raise ConversionError(
                message(
                    f"a torch tensor of dtype {dtype}",
                    "no other framework or file format has this dtype",
                    "dequantize it first (t.dequantize()), or keep its integer representation "
                    "(t.int_repr()) with its scale and zero point"
                    if quantized
                    else _cast_hint(dtype),
                )
            )
        return name

    def express(
        self, tp: type, target: str, learn: Callable[[Any], Callable[[Any], Any]]
    ) -> Callable[[Any], Any] | None:
        torch = self.load()
        if tp not in (torch.Tensor, torch.nn.Parameter) or target != "numpy":
            return None
        strided = torch.strided
        # kind() for NumPy: (type, dtype, is_cpu, requires_grad, conj bit, neg bit) of a
        # strided, non-nested tensor. Host tensors only, without either bit (a real tensor
        # cannot carry the conj bit, so only complex ones are asked); keyed by dtype (torch
        # dtypes are singletons): [plan without grad, plan with grad, complex?]
        table: dict[Any, list[Any]] = {}

        def run(t: Any) -> Any:
            if not t.is_cpu or t.layout is not strided or t.is_nested or t.is_neg():
                return None
            dt = t.dtype
            e = table.get(dt)
            if e is None:
                e = table[dt] = [None, None, dt.is_complex]
            if e[2] and t.is_conj():
                return None
            grad = t.requires_grad
            fn = e[grad]
            if fn is None:
                fn = e[grad] = learn(t)
            return fn(t)

        return run

    def kind(self, x: Any, target: str) -> tuple | None:
        strided = self._strided
        if strided is None:
            strided = self._strided = self.load().strided
        if x.layout is not strided or x.is_nested:
            return None  # sparse, nested: planned (or refused) afresh
        key = (type(x), x.dtype, x.is_cpu or x.device, x.requires_grad, x.is_conj(), x.is_neg())
        if target == "numpy":
            return key  # the host route reads nothing else
        return key + (x.is_contiguous(), x.data_ptr() % 64 == 0, x.nbytes < SHARE_MIN_BYTES)

    def unstaged(self, x: Any) -> bool:
        return x.is_cpu

    def to_dlpack_source(self, x: Any) -> Any:
        """``x``, with the strides of its size-1 dims rewritten to row-major ones (a view:
        torch keeps whatever ``permute``/``as_strided`` gave them). JAX shares such memory,
        but copies it on every later ``np.asarray``, so a route back to NumPy that
        explain calls a view would copy."""
        shape, strides = x.shape, x.stride()
        want = list(strides)
        for i in range(len(shape) - 1, -1, -1):
            if shape[i] == 1:
                want[i] = want[i + 1] * shape[i + 1] if i + 1 < len(shape) else 1
        return x if tuple(want) == strides else x.as_strided(shape, want)

    def facts(self, x: Any) -> Facts:
        dev = x.device
        if dev.type == "meta":
            raise ConversionError(
                message(
                    "a torch tensor on the 'meta' device",
                    "meta tensors carry a shape and dtype but no data",
                    "materialise it first (e.g. module.to_empty(device='cpu') and load weights)",
                )
            )
        if x.is_nested:
            raise ConversionError(
                message(
                    "a torch nested tensor",
                    "its components have different shapes, so it is not one rectangular array",
                    "pad it (x.to_padded_tensor(0.0)), or convert its parts (list(x.unbind()))",
                )
            )
        device = "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index or 0}"
        f = Facts("torch", self.canonical(x.dtype), tuple(x.shape), device=device)
        sparse = x.layout != self.load().strided
        if x.requires_grad:
            f.notes.append("requires_grad")
        if sparse:
            f.notes.append("sparse")
        if x.is_conj():
            f.notes.append("conj")
        if x.is_neg():
            f.notes.append("neg")
        if not sparse:
            f.contiguous = x.is_contiguous()
            f.aligned = x.data_ptr() % 64 == 0
            f.nbytes = x.nbytes
        f.dlpack = not (sparse or "conj" in f.notes or "neg" in f.notes)
        return f

    def prepare_steps(self, facts: Facts) -> list[Step]:
        """Detach, densify, resolve bits: what every route out of torch needs first."""
        steps = []
        if "requires_grad" in facts.notes:
            steps.append(
                Step(
                    "detach from the autograd graph",
                    False,
                    self.load().Tensor.detach,
                    "the values are shared; gradients are not",
                )
            )
        if "sparse" in facts.notes:
            steps.append(
                Step(
                    "densify the sparse tensor",
                    True,
                    lambda t: t.to_dense(),
                    "sparse layouts have no dense memory to share",
                )
            )
        if "conj" in facts.notes:
            steps.append(
                Step(
                    "resolve the lazy conjugate bit",
                    True,
                    lambda t: t.resolve_conj(),
                    "the stored values are not yet conjugated",
                )
            )
        if "neg" in facts.notes:
            steps.append(
                Step(
                    "resolve the lazy negation bit",
                    True,
                    lambda t: t.resolve_neg(),
                    "the stored values are not yet negated",
                )
            )
        return steps

    def to_host_steps(self, x: Any, facts: Facts) -> list[Step]:
        steps = self.prepare_steps(facts)
        if facts.device_type != "cpu":
            steps.append(
                Step(
                    f"copy {facts.device} -> host",
                    True,
                    _to_host,
                    "device memory is not addressable from NumPy",
                )
            )
        if facts.dtype in NUMPY_NATIVE:
            steps.append(Step("Tensor.numpy() view", False, self.load().Tensor.numpy))
        else:
            torch = self.load()
            bits = getattr(torch, BITS[lookup(facts.dtype).itemsize])
            np_dtype = numpy_dtype(facts.dtype)
            steps.append(
                Step(
                    f"reinterpret {facts.dtype} bits as ml_dtypes.{facts.dtype}",
                    False,
                    lambda t: t.view(bits).numpy().view(np_dtype),
                    "NumPy has no native bfloat16/float8",
                )
            )
        return steps

    def from_host_steps(self, facts: Facts, *, device: str | None, copy: bool | None) -> list[Step]:
        torch = self.load()
        steps: list[Step] = []
        if facts.negative_strides:
            steps.append(
                Step(
                    "copy to positive strides",
                    True,
                    np.ascontiguousarray,
                    "torch has no negative strides",
                )
            )
        elif not facts.whole_items:
            steps.append(
                Step(
                    "copy to strides of whole items",
                    True,
                    _whole_copy,
                    "torch counts strides in items, and this view steps by part of one "
                    "(a field of a packed record array)",
                )
            )
        elif facts.unit_flip:
            steps.append(
                Step("rewrite the strides of flipped size-1 dims", False, _positive_unit_strides)
            )
        if not facts.native_order:
            steps.append(
                Step(
                    "byte-swap to native order",
                    True,
                    lambda a: a.astype(a.dtype.newbyteorder("=")),
                    "torch only holds native byte order",
                )
            )
        if not facts.writable and not any(s.copies for s in steps):
            steps.append(
                Step(
                    "copy the read-only array",
                    True,
                    lambda a: np.array(a, copy=True),
                    "torch tensors are always writable, and a write into read-only memory "
                    "(a read-only memmap, bytes, an immutable framework's buffer) would "
                    "crash the process or change data that must not change",
                )
            )
        make = torch.from_numpy
        how = "torch.from_numpy"
        if facts.dtype in NUMPY_NATIVE:
            steps.append(Step(how, False, make))
        else:
            target = self.native_dtype(facts.dtype)
            if target is None:
                raise ConversionError(
                    message(
                        f"an array of dtype {facts.dtype}",
                        f"torch {torch.__version__} has no {facts.dtype}",
                        "pass dtype='float32' (or another dtype torch has) to cast",
                    )
                )
            bits = BITS[lookup(facts.dtype).itemsize]
            np_bits = np.dtype(bits)
            steps.append(
                Step(
                    f"{how} of the raw bits, viewed as torch.{facts.dtype}",
                    False,
                    lambda a: make(a.view(np_bits)).view(target),
                )
            )
        if device not in (None, "cpu"):
            steps.extend(self.to_device_steps(facts, device))
        return steps

    def dlpack_import(self, facts: Facts) -> str | None:
        if facts.device_type not in ("cpu", "cuda"):
            return f"torch cannot import DLPack memory on {facts.device}"
        if facts.dtype not in self.DTYPES or self.native_dtype(facts.dtype) is None:
            return f"torch has no {facts.dtype}"
        return None

    def from_dlpack(self, x: Any) -> Any:
        return self.load().from_dlpack(x)

    def clone(self, x: Any) -> Any:
        try:
            return x.clone()
        except NotImplementedError:  # int4/uint4...: torch has no copy kernel, copy the bytes
            torch = self.load()
            storage = x.untyped_storage().clone()
            return torch.empty((0,), dtype=x.dtype, device=x.device).set_(
                storage, x.storage_offset(), x.size(), x.stride()
            )

    def cast_steps(self, facts: Facts, dtype: str) -> list[Step]:
        target = self.native_dtype(dtype)
        if target is None:
            raise ConversionError(
                message(
                    f"dtype={dtype!r}",
                    "torch has no such dtype",
                    "pick one of " + ", ".join(self.DTYPES),
                )
            )
        return [Step(f"cast {facts.dtype} -> {dtype}", True, lambda t: t.to(target))]

    def to_device_steps(self, facts: Facts, device: str) -> list[Step]:
        torch = self.load()
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise DeviceError(
                message(f"device={device!r}", str(exc), "use 'cpu', 'cuda', 'cuda:1' or 'mps'")
            ) from exc
        if dev.type == "cpu" and dev.index not in (None, 0):
            raise DeviceError(
                message(
                    f"device={device!r} for torch", "torch has one CPU device", "use device='cpu'"
                )
            )
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(
                message(
                    f"device={device!r}",
                    "this machine has no CUDA device torch can use",
                    "leave device unset (the result stays on the CPU)",
                )
            )
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise DeviceError(
                message(
                    f"device={device!r}",
                    f"this machine has {n} CUDA device(s)",
                    f"use 'cuda:0' to 'cuda:{n - 1}'",
                )
            )
        mps = getattr(torch.backends, "mps", None)
        if dev.type == "mps" and not (mps is not None and mps.is_available()):
            raise DeviceError(
                message(
                    f"device={device!r}",
                    "this machine has no MPS (Apple GPU) device torch can use",
                    "leave device unset (the result stays on the CPU)",
                )
            )
        if dev.type == "mps" and facts.dtype in ("float64", "complex128"):
            raise ConversionError(
                message(
                    f"a {facts.dtype} tensor for device 'mps'",
                    "Apple's MPS backend has no 64-bit floats",
                    "pass dtype='float32' to cast first",
                )
            )
        return [
            Step(
                f"copy -> {device}",
                True,
                lambda t: t.to(dev),
                "the data must live in the target device's memory",
            )
        ]

    def host_view(self, x: Any) -> np.ndarray | None:
        if x.device.type != "cpu" or x.layout != self.load().strided or x.is_nested:
            return None
        if (
            x.is_quantized
            or x.element_size() not in BITS
            or x.dtype.is_complex
            and x.element_size() == 4
        ):  # complex32: view_as_real has no kernel for it
            return _storage_view(x)
        t = x.detach()
        if t.is_conj():
            t = t.conj()  # clears the lazy bit, same memory
        if t.is_neg():
            return None
        if t.is_complex():
            t = self.load().view_as_real(t)
        bits = getattr(self.load(), BITS[t.element_size()])
        return t.view(bits).numpy()

    def device_span(self, x: Any) -> tuple[str, int, int] | None:
        if x.layout != self.load().strided:
            return None
        storage = x.untyped_storage()
        start = storage.data_ptr()
        return str(x.device), start, start + storage.nbytes()


def _storage_view(x: Any) -> np.ndarray | None:
    """The bytes of ``x``'s whole storage (for dtypes NumPy cannot view: int4, quantized...)."""
    storage = x.untyped_storage()
    if storage.nbytes() == 0:
        return None
    import ctypes

    buf = (ctypes.c_uint8 * storage.nbytes()).from_address(storage.data_ptr())
    return np.frombuffer(buf, np.uint8)


def _cast_hint(dtype: Any) -> str:
    """How to cast a torch dtype no other framework has, without losing part of the values."""
    if dtype.is_complex:  # complex32: both halves kept
        return "cast it first, e.g. t.to(torch.complex64) (keeps the imaginary part)"
    if dtype.is_floating_point:
        return "cast it first, e.g. t.to(torch.float32) (holds every value of smaller float types)"
    if str(dtype).rpartition(".")[2].startswith(("int", "uint", "bits")):  # int4, uint4, bits8...
        return (
            "torch cannot cast these packed types either: convert their bytes "
            "(t.view(torch.uint8)) and unpack them where they are used"
        )
    return "cast it first, e.g. t.to(torch.float32)"


def _to_host(t: Any) -> Any:
    return t.cpu()


def _whole_copy(a: np.ndarray) -> np.ndarray:
    # always a copy: np.ascontiguousarray returns a size-1 view as it is (NumPy calls it
    # C-contiguous, whatever the stride of its size-1 dims)
    return np.array(a, order="C")


def _positive_unit_strides(a: np.ndarray) -> np.ndarray:
    """A size-1 dimension's stride is never used: rewrite negative ones to 0 (no copy)."""
    if a.dtype.type.__module__ != "numpy":  # ml_dtypes: as_strided would lose the dtype
        return _positive_unit_strides(a.view(f"u{a.dtype.itemsize}")).view(a.dtype)
    strides = tuple(0 if n <= 1 else s for s, n in zip(a.strides, a.shape, strict=True))
    return np.lib.stride_tricks.as_strided(a, a.shape, strides, writeable=a.flags.writeable)


def gather_device_leaves(
    tree: Any, *, copy: bool | None, dtype: str | None, pinned: bool = False
) -> dict[int, np.ndarray]:
    """Copy every CUDA tensor in ``tree`` to the host in one coalesced transfer.

    Returns ``{id(leaf): host array}``; the arrays are fresh host memory in
    the tensor's own dtype, bit-exact (see :mod:`.torch_staging`: a pinned
    staging ring, one host wait per ring block used, so one for a tree of up to
    64 MiB per device). With ``pinned=True`` the arrays view page-locked memory
    instead (one wait per device). JAX and CuPy arrays on a CUDA device join
    the same transfer through DLPack (see :mod:`.foreign_cuda`). Empty when no
    CUDA array can exist yet (torch's CUDA never initialised, JAX's CUDA backend
    not running, CuPy not imported), or when ``copy=False`` (the plan refuses
    instead) or ``dtype=`` is given (the planned route casts on the host).

    Every torch tensor's dtype is checked before anything is copied: an
    unsupported one raises :class:`ConversionError` with the leaf's path. A
    CUDA error during the transfer (out of memory, ...) is raised as a
    ConversionError; JAX/CuPy arrays then take their own path instead.
    """
    if copy is False or dtype is not None:
        return {}
    from . import foreign_cuda

    torch: Any = sys.modules.get("torch")
    torch_live = torch is not None and torch.cuda.is_initialized()
    others = foreign_cuda.live_types()
    if not torch_live and not others:
        return {}
    from ..errors import TensorBridgeError
    from ..tree import format_path, tree_leaves, tree_leaves_with_path
    from .torch_staging import _numpy_dtype

    found, seen, rest = [], set(), []
    tensor = torch.Tensor if torch_live else ()
    for leaf in tree_leaves(tree):
        if isinstance(leaf, tensor):
            if leaf.is_cuda and id(leaf) not in seen:
                seen.add(id(leaf))
                try:
                    _numpy_dtype(leaf.dtype)  # before any transfer
                except TensorBridgeError as exc:  # say where the leaf is
                    path = next(p for p, x in tree_leaves_with_path(tree) if x is leaf)
                    raise exc.at(format_path(path)) from exc.__cause__
                found.append(leaf)
        elif others:
            rest.append(leaf)
    wrapped = foreign_cuda.wrap(foreign_cuda.cuda_arrays(rest, others)) if rest else []
    if not found and not wrapped:
        return {}
    try:
        hosts = batch_to_host(found + [t for _, t in wrapped], pinned=pinned)
    except RuntimeError as exc:  # CUDA refused: out of memory, a lost device, a forked child...
        if wrapped:  # try again without them: JAX/CuPy arrays have their own way to the host
            return _torch_only(found, pinned)
        raise _refused(found, exc) from exc
    return dict(zip([id(t) for t in found] + [id(a) for a, _ in wrapped], hosts, strict=True))


def _torch_only(found: list[Any], pinned: bool) -> dict[int, np.ndarray]:
    """The torch tensors ``found`` alone, after a transfer that included JAX/CuPy arrays failed."""
    if not found:
        return {}
    try:
        hosts = batch_to_host(found, pinned=pinned)
    except RuntimeError as exc:
        raise _refused(found, exc) from exc
    return dict(zip(map(id, found), hosts, strict=True))


def _refused(found: list[Any], exc: Exception) -> ConversionError:
    nbytes = sum(t.numel() * t.element_size() for t in found)
    return ConversionError(
        message(
            f"{len(found)} CUDA tensor(s) ({nbytes / (1 << 20):.1f} MiB) copied to the host",
            f"CUDA refused the copy: {type(exc).__name__}: {exc}",
            "free GPU memory (e.g. torch.cuda.empty_cache()) or convert fewer tensors at a time; "
            "in a forked child process use the 'spawn' start method",
        )
    )


def batch_to_host(tensors: list[Any], *, pinned: bool = False) -> list[np.ndarray]:
    """CUDA tensors -> host arrays, bit-exact: detached, conj/neg resolved,
    sparse made dense, bfloat16/float8 as ml_dtypes. See :mod:`.torch_staging`."""
    from .torch_staging import batch_to_host as staged

    return staged(tensors, pinned=pinned)


BACKEND = TorchBackend()
