"""JAX: immutable arrays on any device, sharded arrays gathered, tracers refused."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..dtypes import canonical_name, lookup
from ..errors import ConversionError, DeviceError, message
from . import foreign_cuda
from .base import SHARE_MIN_BYTES, Backend, Facts, Step, normalize_device

__all__ = ["JaxBackend", "BACKEND"]

# Tracer class name -> the transform that made it, for error messages.
_TRANSFORMS = {
    "DynamicJaxprTracer": "jax.jit",
    "JaxprTracer": "jax.jit/jax.linearize",
    "JVPTracer": "jax.grad/jax.jvp",
    "LinearizeTracer": "jax.grad/jax.linearize",
    "BatchTracer": "jax.vmap",
    "ShardMapTracer": "shard_map",
}
_WIDE = {"float64", "int64", "uint64", "complex128"}
# jax platform name -> tensorbridge device type
_PLATFORM = {
    "cpu": "cpu",
    "gpu": "cuda",
    "cuda": "cuda",
    "rocm": "rocm",
    "tpu": "tpu",
    "METAL": "mps",
}


class JaxBackend(Backend):
    name = "jax"
    module = "jax"
    extra = "jax"
    # JAX dtypes are NumPy/ml_dtypes dtypes: the table is the identity on what jax.numpy has.
    DTYPES = {
        n: f"numpy.{n}"
        for n in (
            "bool",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "float16",
            "bfloat16",
            "float32",
            "float64",
            "complex64",
            "complex128",
            "float8_e4m3fn",
            "float8_e5m2",
            "float8_e4m3fnuz",
            "float8_e5m2fnuz",
            "float8_e8m0fnu",
            "float8_e4m3",
            "float8_e3m4",
            "float8_e4m3b11fnuz",
        )
    }

    copy_small = True  # jax.dlpack.from_dlpack costs ~30 µs; jnp.array of a small copy less

    def __init__(self) -> None:
        self._arrays: dict[type, bool] = {}  # type -> a concrete array (not a tracer)

    def unstaged(self, x: Any) -> bool:
        return not foreign_cuda.jax_cuda_running()  # then no JAX array is on a CUDA device

    def express(
        self, tp: type, target: str, learn: Callable[[Any], Callable[[Any], Any]]
    ) -> Callable[[Any], Any] | None:
        if target != "numpy":
            return None
        jax = self.load()
        if not issubclass(tp, jax.Array) or issubclass(tp, jax.core.Tracer):
            return None
        if not (hasattr(tp, "aval") and hasattr(tp, "_sharding")):
            return None  # a JAX without the attributes read below: the ordinary path
        # kind() for NumPy: (type, dtype, sharding), and the plan key adds JAX's x64 flag,
        # which routes out of JAX do not read (only imports into JAX check it). The type
        # is fixed; by dtype: (sharding, plan) for the first sharding met (one device, in
        # practice), compared by equality (the objects differ between arrays).
        # x.dtype and x.sharding are Python properties returning x.aval.dtype and
        # x._sharding; those are read directly (half the cost), and checked against the
        # properties once per dtype, when the route is learnt.
        table: dict[Any, tuple[Any, Any]] = {}

        def run(x: Any) -> Any:
            # (a deleted array makes the view raise: the ordinary path then refuses it)
            sharding = x._sharding
            dtype = x.aval.dtype
            e = table.get(dtype)
            if e is None:
                if not self.unstaged(x):
                    return None  # CUDA arrays may be about: to_numpy stages them
                if x.dtype is not dtype or x.sharding is not sharding:
                    return None  # not what the properties say: leave it to the planner
                if len(table) >= 256:
                    table.clear()
                e = table[dtype] = (sharding, learn(x))
            elif e[0] is not sharding and e[0] != sharding:
                return None
            return e[1](x)

        return run

    def kind(self, x: Any, target: str) -> tuple | None:
        tp = type(x)
        concrete = self._arrays.get(tp)
        if concrete is None:
            jax = self.load()
            concrete = self._arrays[tp] = issubclass(tp, jax.Array) and not issubclass(
                tp, jax.core.Tracer
            )
        if not concrete or x.is_deleted():
            return None  # tracers and deleted arrays are refused by the planner
        sharding = x.sharding  # says the devices, and whether it is sharded
        key = (tp, x.dtype, sharding)
        if target == "numpy":
            return key
        return key + (
            (x.unsafe_buffer_pointer() % 64 == 0 if x.size else True)
            if len(sharding.device_set) == 1
            else None,
            x.size * x.dtype.itemsize < SHARE_MIN_BYTES,
        )

    def owns(self, tp: type) -> bool:
        jax = sys.modules.get("jax")
        if jax is None:
            return False
        return issubclass(tp, jax.Array) or issubclass(tp, jax.core.Tracer)

    def _check_x64(self, dtype: str) -> None:
        jax = self.load()
        if dtype in _WIDE and not jax.config.jax_enable_x64:
            raise ConversionError(
                message(
                    f"a {dtype} array for JAX",
                    "JAX runs with 64-bit types disabled and would silently narrow it to 32 bits",
                    "call jax.config.update('jax_enable_x64', True) first, or pass dtype= to cast explicitly",
                )
            )

    def facts(self, x: Any) -> Facts:
        jax = self.load()
        if isinstance(x, jax.core.Tracer):
            name = type(x).__name__
            transform = _TRANSFORMS.get(name, "a JAX transform")
            raise ConversionError(
                message(
                    f"a JAX tracer ({name}) inside {transform}",
                    "it is a placeholder for values that only exist when the compiled function runs",
                    "convert outside the transformed function (return the value, then convert), "
                    "or use jax.debug.callback / jax.pure_callback to get concrete values inside it",
                )
            )
        if x.is_deleted():
            raise ConversionError(
                message(
                    f"a deleted JAX array ({x.dtype}{list(x.shape)})",
                    "its buffer was freed (x.delete(), or donated to a jit-compiled function)",
                    "convert it before deleting or donating it, or keep a copy (jnp.copy(x))",
                )
            )
        devices = x.devices()
        dev = next(iter(devices))
        kind = _PLATFORM.get(dev.platform, dev.platform)
        device = "cpu" if kind == "cpu" and dev.id == 0 else f"{kind}:{dev.id}"
        f = Facts(
            "jax",
            canonical_name(x.dtype),
            tuple(x.shape),
            device=device,
            writable=False,
            nbytes=x.size * x.dtype.itemsize,
        )
        if len(devices) > 1 or not x.is_fully_addressable:
            f.notes.append("sharded")
            f.dlpack = False
        elif kind == "cpu":
            f.aligned = x.unsafe_buffer_pointer() % 64 == 0 if x.size else True
        return f

    def to_host_steps(self, x: Any, facts: Facts) -> list[Step]:
        if "sharded" in facts.notes:
            return [
                Step(
                    f"gather {len(x.devices())} shards to host",
                    True,
                    np.asarray,
                    "a sharded array is spread over several devices",
                    fresh=False,
                )
            ]
        if facts.device_type != "cpu":
            return [
                Step(
                    f"copy {facts.device} -> host",
                    True,
                    _device_get,
                    "device memory is not addressable from NumPy",
                    fresh=False,
                )
            ]
        return [Step("np.asarray view (read-only: JAX arrays are immutable)", False, np.asarray)]

    def fresh_host_step(self, facts: Facts) -> Step | None:
        if facts.device_type != "cpu" or "sharded" in facts.notes:
            return None  # the route already copies
        return Step("np.array copy", True, np.array)  # copy=True is np.array's default

    def from_host_steps(self, facts: Facts, *, device: str | None, copy: bool | None) -> list[Step]:
        self._check_x64(facts.dtype)
        jax = self.load()
        steps: list[Step] = []
        why = self.dlpack_import(facts)
        if facts.dtype in ("bfloat16",) or lookup(facts.dtype).name.startswith("float8"):
            why = why or "NumPy cannot export bfloat16/float8 over DLPack"
        if not facts.writable:
            why = why or "NumPy cannot export read-only arrays over DLPack"
        if copy is not False:
            why = why or (
                "a later write to the NumPy array would change the JAX array, which JAX "
                "users take to be immutable (jnp.asarray copies too); copy=False shares"
            )
        if why is None:
            steps.append(
                Step(
                    "jax.dlpack.from_dlpack (shares the NumPy buffer; do not mutate it "
                    "while JAX uses it)",
                    False,
                    functools.partial(_import_host, jax.dlpack.from_dlpack),
                )
            )
        else:
            # Not jax.device_put: on the CPU it aliases aligned read-only and ml_dtypes
            # buffers, even with may_alias=False. jnp.array(copy=True) always copies.
            steps.append(
                Step("jnp.array(copy=True)", True, lambda a: jax.numpy.array(a, copy=True), why)
            )
        if device is not None and normalize_device(device) != "cpu":  # cpu:N too
            steps.extend(self.to_device_steps(facts, device))
        return steps

    def dlpack_import(self, facts: Facts) -> str | None:
        self._check_x64(facts.dtype)  # JAX's DLPack import narrows 64-bit types silently
        if facts.dtype not in self.DTYPES:
            return f"JAX has no {facts.dtype}"
        if not facts.contiguous or facts.negative_strides:
            return "JAX only imports row-major (C-contiguous) DLPack memory"
        if facts.device_type == "cpu" and not facts.aligned:
            return "JAX copies host memory that is not 64-byte aligned"
        if facts.device_type not in ("cpu", "cuda", "rocm"):
            return f"JAX cannot import DLPack memory on {facts.device}"
        return None

    def from_dlpack(self, x: Any) -> Any:
        return self.load().dlpack.from_dlpack(x)

    def clone(self, x: Any) -> Any:
        return self.load().numpy.array(x, copy=True)

    def cast_steps(self, facts: Facts, dtype: str) -> list[Step]:
        self._check_x64(dtype)
        target = lookup(dtype).numpy
        return [Step(f"cast {facts.dtype} -> {dtype}", True, lambda a: a.astype(target))]

    def to_device_steps(self, facts: Facts, device: str) -> list[Step]:
        jax = self.load()
        kind, _, index = device.partition(":")
        kind = kind.lower()
        platform = {"cuda": "gpu"}.get(kind, kind)
        try:
            target = jax.devices(platform)[int(index or 0)]
        except (RuntimeError, IndexError, ValueError) as exc:
            raise DeviceError(
                message(
                    f"device={device!r} for JAX",
                    f"JAX has no such device ({exc})",
                    f"use one of {[str(d) for d in jax.devices()]}, or leave device unset",
                )
            ) from exc
        return [
            Step(
                f"jax.device_put -> {target}",
                True,
                lambda a: jax.device_put(a, target),
                "the data must live in the target device's memory",
            )
        ]

    def host_view(self, x: Any) -> np.ndarray | None:
        jax = self.load()
        if isinstance(x, jax.core.Tracer) or len(x.devices()) != 1:
            return None
        if next(iter(x.devices())).platform != "cpu":
            return None
        return np.asarray(x)

    def device_span(self, x: Any) -> tuple[str, int, int] | None:
        try:
            start = x.unsafe_buffer_pointer()
        except Exception:  # sharded or deleted arrays have no single buffer
            return None
        dev = next(iter(x.devices()))
        kind = _PLATFORM.get(dev.platform, dev.platform)
        return f"{kind}:{dev.id}", start, start + x.nbytes


# Both host copies above are JAX's own: it caches the host value on the array and hands
# the same read-only buffer to every np.asarray / jax.device_get that follows (fresh=False).


def _import_host(from_dlpack: Callable[[Any], Any], a: np.ndarray) -> Any:
    """``from_dlpack(a)`` of a row-major array (NumPy-native dtype), with the strides of
    its size-1 dims rewritten to row-major ones (no copy: NumPy keeps whatever a slice
    or ``a[None]`` gave them, 0 or negative). JAX shares the buffer either way, but
    copies an array imported with other strides there on every later ``np.asarray``:
    to_numpy(copy=False) of it would copy, and shares_memory would miss the sharing."""
    shape = a.shape
    want = []
    step = a.itemsize
    for n in reversed(shape):
        want.append(step)
        step *= n
    want.reverse()
    if tuple(want) != a.strides:
        a = np.lib.stride_tricks.as_strided(a, shape, want, writeable=a.flags.writeable)
    return from_dlpack(a)


def _device_get(x: Any) -> np.ndarray:
    return np.asarray(sys.modules["jax"].device_get(x))


BACKEND = JaxBackend()
