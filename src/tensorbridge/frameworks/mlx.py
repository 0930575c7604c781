"""MLX: lazy arrays, computed (``mx.eval``) before their memory is read.

What MLX does, measured with mlx 0.32 on a Linux CPU (tests/core/test_mlx.py):

- Export is zero-copy. ``np.asarray(x)`` views the array's buffer, writable, so a write
  through it changes every MLX array sharing that buffer (``x.reshape``, ``x.view``):
  tensorbridge marks its NumPy views read-only, as for JAX. ``torch.from_dlpack(x)``
  shares the buffer too, writable, so torch gets a copy (the rule for immutable
  frameworks, :mod:`tensorbridge.plan`). bfloat16 has no buffer-protocol format and
  NumPy's DLPack import refuses it, so its DLPack capsule is read by
  :mod:`.dlpack_reader` (the same buffer, as ``ml_dtypes.bfloat16``; where MLX has a
  GPU, its bits are viewed as uint16 instead, ``x.view(mx.uint16)``). uint64 comes
  out as ``np.ulonglong``, which torch refuses: it is viewed as ``np.uint64``.
- Import always copies: ``mx.array(a)`` and ``mx.from_dlpack`` copy CPU memory, and
  ``mx.from_dlpack(a, copy=False)`` refuses. Both narrow float64 to float32 and
  complex128 to complex64 silently unless told the dtype, and refuse negative strides
  (torch.from_dlpack of an MLX array with negative strides aborts the process).
- MLX has no complex128 and no float8; float64 runs on the CPU only.
- Arrays have no device of their own (memory is unified; a stream picks where an
  operation runs), so ``device=`` takes only the host.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..dtypes import NUMPY_NATIVE, numpy_dtype
from ..errors import ConversionError, DeviceError, message
from .base import Backend, Facts, Step, normalize_device
from .dlpack_reader import host_view

__all__ = ["MlxBackend", "BACKEND"]

# DLPack device types whose memory is not host-addressable (CUDA, CUDA managed).
_CUDA_CODES = {2: "cuda", 13: "cuda"}


class MlxBackend(Backend):
    name = "mlx"
    module = "mlx.core"
    extra = "mlx"
    DTYPES = {
        "bool": "bool_",
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
    }

    def __init__(self) -> None:
        self._canonical: dict[Any, str] | None = None
        self._gpu: bool | None = None

    def owns(self, tp: type) -> bool:
        mx = sys.modules.get("mlx.core")
        return mx is not None and issubclass(tp, mx.array)

    def express(
        self, tp: type, target: str, learn: Callable[[Any], Callable[[Any], Any]]
    ) -> Callable[[Any], Any] | None:
        mx = self.load()
        if tp is not mx.array or target != "numpy":
            return None
        # kind() for NumPy: (type, dtype, device). Tables by dtype; by device first when
        # this MLX build has a GPU (a CPU-only build has host memory only)
        table: dict[Any, Any] = {}
        self._device(mx.zeros(0))  # learns whether there is a GPU
        if not self._gpu:
            # Item sizes whose every MLX dtype this table's plan views with _host_view
            # (without dtype=/copy=True: 1 and 4 bytes, not 2, which holds bfloat16, nor 8,
            # which holds int64/uint64): once the planner has given _host_view for every
            # dtype of such a size, arrays of that size skip the dtype lookup (reading and
            # hashing an MLX dtype costs as much as the view). The plans are asked, not
            # assumed: with dtype= (a cast table) or copy=True they are other steps for
            # some dtypes, and a dtype MLX adds later is asked too.
            by_size: dict[int, list[Any]] = {}
            for d in vars(mx).values():
                if isinstance(d, mx.Dtype) and d not in by_size.setdefault(d.size, []):
                    by_size[d.size].append(d)
            fast: set[int] = set()

            def viewed(d: Any) -> bool:
                """True when this table's plan for MLX dtype ``d`` is _host_view."""
                fn = table.get(d)
                if fn is None:
                    try:
                        fn = table[d] = learn(mx.zeros((0,), dtype=d))  # a kind: type, dtype
                    except Exception:  # noqa: BLE001 - refused: the ordinary path words it
                        return False
                return fn is _host_view

            def host(x: Any) -> Any:
                if x.itemsize in fast:
                    try:
                        return np.asarray(memoryview(x).toreadonly())  # _host_view, inlined
                    except ValueError:
                        return None  # the ordinary path words it
                fn = table.get(x.dtype)
                if fn is None:
                    fn = table[x.dtype] = learn(x)
                    if fn is _host_view and all(map(viewed, by_size.get(x.itemsize, ()))):
                        fast.add(x.itemsize)
                return fn(x)

            return host
        tables: dict[str, dict[Any, Any]] = {}
        device = self._device

        def run(x: Any) -> Any:
            dev = device(x)
            by_dtype = tables.get(dev)
            if by_dtype is None:
                by_dtype = tables[dev] = {}
            fn = by_dtype.get(x.dtype)
            if fn is None:
                fn = by_dtype[x.dtype] = learn(x)
            return fn(x)

        return run

    def kind(self, x: Any, target: str) -> tuple | None:
        dtype = x.dtype
        if target in ("numpy", "mlx"):  # the route reads only the dtype (and the device)
            return (type(x), dtype, self._device(x))
        try:
            f = self.facts(x)  # the layout exists once computed; facts copy nothing
        except ConversionError:
            return None  # refused: a fresh plan words the error
        return (
            type(x),
            dtype,
            f.device,
            f.contiguous,
            f.negative_strides,
            f.unit_flip,
            f.aligned,
            f.small,
        )

    def canonical(self, dtype: Any) -> str:
        if self._canonical is None:
            self._canonical = {self.native_dtype(n): n for n in self.DTYPES}
        name = self._canonical.get(dtype)
        if name is None:
            raise ConversionError(
                message(
                    f"an MLX array of dtype {dtype}",
                    "no other framework or file format has this dtype",
                    "cast it first, e.g. x.astype(mx.float32)",
                )
            )
        return name

    def _device(self, x: Any) -> str:
        if self._gpu is None:
            mx = self.load()
            cuda = getattr(mx, "cuda", None)
            self._gpu = bool(mx.metal.is_available() or (cuda is not None and cuda.is_available()))
        if not self._gpu:  # a CPU-only build: every buffer is host memory
            return "cpu"
        code, index = x.__dlpack_device__()
        kind = _CUDA_CODES.get(int(code))
        # Metal (Apple) memory is unified: the buffer protocol hands out host memory.
        return "cpu" if kind is None else f"{kind}:{index}"

    def facts(self, x: Any) -> Facts:
        name = self.canonical(x.dtype)
        _evaluate(x)  # the memory layout is only known once the values exist
        f = Facts("mlx", name, tuple(x.shape), device=self._device(x), writable=False)
        if f.device_type != "cpu":
            f.dlpack = False  # untested: go through MLX's own copy to the host
            return f
        a = _host_array(x, name)
        f.contiguous = a.flags.c_contiguous
        f.negative_strides = any(s < 0 and n > 1 for s, n in zip(a.strides, a.shape, strict=True))
        f.unit_flip = any(s < 0 and n <= 1 for s, n in zip(a.strides, a.shape, strict=True))
        f.aligned = a.ctypes.data % 64 == 0
        f.nbytes = a.nbytes
        # torch aborts the process on DLPack memory with negative strides
        f.dlpack = not (f.negative_strides or f.unit_flip)
        return f

    def prepare_steps(self, facts: Facts) -> list[Step]:
        return [
            Step("mx.eval (MLX is lazy: pending operations are computed now)", False, _evaluate)
        ]

    def to_host_steps(self, x: Any, facts: Facts) -> list[Step]:
        steps = self.prepare_steps(facts)
        if facts.device_type != "cpu":
            steps.append(
                Step(
                    f"copy {facts.device} -> host (np.array)",
                    True,
                    lambda a: np.array(_bits(a, facts.dtype)).view(numpy_dtype(facts.dtype)),
                    "device memory is not addressable from NumPy",
                )
            )
        elif facts.dtype in NUMPY_NATIVE:
            # the buffer protocol evaluates pending operations itself (no mx.eval step)
            return [
                Step(
                    "np.asarray view of the buffer, read-only (reading it computes pending "
                    "MLX operations; MLX arrays are immutable)",
                    False,
                    _host_view if facts.dtype not in ("int64", "uint64") else _host_view_long,
                )
            ]
        else:
            if self._gpu is False:  # a CPU-only build: its DLPack capsules are host memory
                steps.append(
                    Step(
                        f"view the buffer through DLPack as ml_dtypes.{facts.dtype}, read-only "
                        "(MLX arrays are immutable)",
                        False,
                        _dlpack_view,
                        f"NumPy has no native {facts.dtype}, and its own DLPack import refuses it",
                    )
                )
            else:  # Metal's capsules name the GPU, although its memory is unified
                steps.append(
                    Step(
                        f"view the {facts.dtype} bits as uint16, then as "
                        f"ml_dtypes.{facts.dtype}, read-only (MLX arrays are immutable)",
                        False,
                        lambda a: _host_array(a, facts.dtype),
                        f"NumPy has no native {facts.dtype}",
                    )
                )
        return steps

    def fresh_host_step(self, facts: Facts) -> Step | None:
        if facts.device_type != "cpu" or facts.dtype not in NUMPY_NATIVE:
            return None  # the route already copies, or views bits through another step
        return Step("np.array copy, computing pending MLX operations", True, _host_copy)

    def from_host_steps(self, facts: Facts, *, device: str | None, copy: bool | None) -> list[Step]:
        mx = self.load()
        self._check_device(device)
        target = self.native_dtype(facts.dtype) if facts.dtype in self.DTYPES else None
        if target is None:
            raise ConversionError(
                message(
                    f"an array of dtype {facts.dtype}",
                    f"MLX has no {facts.dtype}",
                    "pass dtype='complex64' to cast"
                    if facts.dtype == "complex128"
                    else "pass dtype='bfloat16' or 'float16' to cast, or keep the raw bits "
                    "(dtype-preserving: a.view(np.uint8), and mx.from_fp8 in MLX)",
                )
            )
        steps: list[Step] = []
        if facts.negative_strides or facts.unit_flip:
            steps.append(
                Step(
                    "copy to positive strides",
                    True,
                    lambda a: np.array(a, order="C"),
                    "MLX refuses negative strides",
                )
            )
        elif not facts.whole_items:
            steps.append(
                Step(
                    "copy to strides of whole items",
                    True,
                    lambda a: np.array(a, order="C"),
                    "MLX counts strides in items, and this view steps by part of one "
                    "(a field of a packed record array)",
                )
            )
        why = "MLX copies host memory on import (it never shares a CPU buffer)"
        if facts.dtype in _NARROWED:
            # dtype= for these: without it, MLX narrows float64 to float32 silently
            steps.append(Step("mx.array", True, lambda a: mx.array(a, dtype=target), why))
        elif facts.dtype in NUMPY_NATIVE:
            steps.append(Step("mx.array", True, mx.array, why))  # infers the same dtype
        else:
            bits = np.dtype(f"u{numpy_dtype(facts.dtype).itemsize}")
            steps.append(
                Step(
                    f"mx.array of the raw bits, viewed as mx.{facts.dtype}",
                    True,
                    lambda a: mx.array(a.view(bits)).view(target),
                    why,
                )
            )
        return steps

    def _check_device(self, device: str | None) -> None:
        if device is None or normalize_device(device) == "cpu":
            return
        raise DeviceError(
            message(
                f"device={device!r} for MLX",
                "MLX arrays have no device of their own (the memory is unified; each operation "
                "runs on the default device or the stream it is given)",
                "leave device unset (or 'cpu'), and choose where MLX computes with "
                "mx.set_default_device(mx.gpu) or stream=mx.gpu",
            )
        )

    def dlpack_import(self, facts: Facts) -> str | None:
        return "MLX copies every CPU import (mx.from_dlpack(copy=False) refuses)"

    def from_dlpack(self, x: Any) -> Any:
        return self.load().from_dlpack(x)

    def clone(self, x: Any) -> Any:
        return self.load().array(x)  # a new buffer (measured: mx.array(mx_array) copies)

    def cast_steps(self, facts: Facts, dtype: str) -> list[Step]:
        target = self.native_dtype(dtype)
        if target is None:
            raise ConversionError(
                message(
                    f"dtype={dtype!r}",
                    "MLX has no such dtype",
                    "pick one of " + ", ".join(self.DTYPES),
                )
            )
        return [Step(f"cast {facts.dtype} -> {dtype} (x.astype)", True, lambda x: x.astype(target))]

    def to_device_steps(self, facts: Facts, device: str) -> list[Step]:
        self._check_device(device)
        return []

    def host_view(self, x: Any) -> np.ndarray | None:
        try:
            name = self.canonical(x.dtype)
            _evaluate(x)
        except ConversionError:
            return None
        if self._device(x) != "cpu":
            return None
        return _host_array(x, name)


def _evaluate(x: Any) -> Any:
    """``mx.eval(x)``, with MLX's refusal inside a transform said as ours."""
    try:
        sys.modules["mlx.core"].eval(x)
    except ValueError as exc:
        if "transformation" not in str(exc):
            raise
        raise ConversionError(
            message(
                f"an MLX array {x.dtype}{list(x.shape)} inside mx.compile or mx.vmap",
                "inside a function transformation arrays are placeholders without values",
                "convert the array the transformed function returns, outside it",
            )
        ) from exc
    return x


def _bits(x: Any, dtype: str) -> Any:
    """``x`` itself, or for dtypes NumPy lacks its bits as unsigned ints (same buffer)."""
    if dtype in NUMPY_NATIVE:
        return x
    mx = sys.modules["mlx.core"]
    return x.view(getattr(mx, f"uint{numpy_dtype(dtype).itemsize * 8}"))


#: NumPy dtypes that mx.array(a) does not keep unless told (it infers float32)
_NARROWED = frozenset(("float64",))

#: the buffer protocol's 64-bit integer codes ('q', 'Q': long long) -> NumPy's own
#: int64/uint64 ('l', 'L'), which np.from_dlpack gives and torch takes
_LONG = {"q": np.dtype(np.int64), "Q": np.dtype(np.uint64)}


def _host_view(x: Any) -> np.ndarray:
    """A read-only NumPy view of a host MLX array of a NumPy-native dtype (no copy; the
    buffer protocol evaluates the array first, and keeps it alive)."""
    try:
        return np.asarray(memoryview(x).toreadonly())  # (cheaper than a.setflags afterwards)
    except ValueError:
        _evaluate(x)  # says a refusal inside mx.compile/mx.vmap as ours
        raise


def _numpy_long(a: np.ndarray) -> np.ndarray:
    """``a`` with NumPy's own int64/uint64 dtype where the buffer protocol said long long."""
    wide = _LONG.get(a.dtype.char)
    return a if wide is None else a.view(wide)


def _host_view_long(x: Any) -> np.ndarray:
    """:func:`_host_view` of int64/uint64, with NumPy's own dtype for them."""
    return _numpy_long(_host_view(x))


def _host_copy(x: Any) -> np.ndarray:
    """A writable NumPy copy of a host MLX array of a NumPy-native dtype."""
    try:
        a = np.array(x)
    except ValueError:
        _evaluate(x)  # says a refusal inside mx.compile/mx.vmap as ours
        raise
    return _numpy_long(a)


def _dlpack_view(x: Any) -> np.ndarray:
    """A read-only NumPy view of an evaluated host MLX array of a dtype NumPy lacks
    (bfloat16), read from its DLPack capsule: 3x cheaper than viewing it as uint16 first,
    which makes a new MLX array (measured 4.6 us against 13.9 us for 256 items)."""
    a = host_view(x, f"an MLX array {x.dtype}{list(x.shape)}")
    a.setflags(write=False)
    return a


def _host_array(x: Any, dtype: str) -> np.ndarray:
    """A read-only NumPy view of an evaluated host MLX array (no copy)."""
    a = np.asarray(_bits(x, dtype))
    want = numpy_dtype(dtype)
    if a.dtype.type is not want.type:  # bfloat16 bits, np.ulonglong for uint64
        a = a.view(want)
    a.setflags(write=False)
    return a


BACKEND = MlxBackend()
