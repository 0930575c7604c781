"""CuPy: CUDA arrays. To the host through one copy; between frameworks on the
same GPU through DLPack."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ..dtypes import NUMPY_NATIVE, canonical_name, lookup
from ..errors import ConversionError, DeviceError, message
from .base import Backend, Facts, Step

__all__ = ["CupyBackend", "BACKEND"]


class CupyBackend(Backend):
    name = "cupy"
    module = "cupy"
    extra = "cupy"
    DTYPES = {n: n for n in NUMPY_NATIVE}

    def owns(self, tp: type) -> bool:
        cp = sys.modules.get("cupy")
        return cp is not None and issubclass(tp, cp.ndarray)

    def facts(self, x: Any) -> Facts:
        f = Facts("cupy", canonical_name(x.dtype), tuple(x.shape), device=f"cuda:{x.device.id}")
        f.contiguous = x.flags.c_contiguous
        f.negative_strides = any(s < 0 and n > 1 for s, n in zip(x.strides, x.shape, strict=True))
        f.aligned = x.data.ptr % 64 == 0
        return f

    def to_host_steps(self, x: Any, facts: Facts) -> list[Step]:
        return [
            Step(
                f"copy {facts.device} -> host",
                True,
                lambda a: a.get(),
                "device memory is not addressable from NumPy",
            )
        ]

    def from_host_steps(self, facts: Facts, *, device: str | None, copy: bool | None) -> list[Step]:
        cp = self.load()
        index = 0
        if device is not None:
            kind, _, idx = device.partition(":")
            if kind not in ("cuda", "gpu"):
                raise DeviceError(
                    message(
                        f"device={device!r} for CuPy",
                        "CuPy arrays live on CUDA devices only",
                        "use device='cuda' or 'cuda:N', or pick to='numpy' for host memory",
                    )
                )
            index = int(idx or 0)
        steps: list[Step] = []
        if facts.dtype in NUMPY_NATIVE:

            def put(a: np.ndarray) -> Any:
                with cp.cuda.Device(index):
                    return cp.asarray(a)
        else:
            raise ConversionError(
                message(
                    f"an array of dtype {facts.dtype}",
                    "CuPy has no bfloat16 or float8 dtypes",
                    "pass dtype='float32' to cast, or keep the data in torch or jax",
                )
            )
        steps.append(
            Step(f"copy host -> cuda:{index}", True, put, "CuPy arrays live in GPU memory")
        )
        return steps

    def dlpack_import(self, facts: Facts) -> str | None:
        if facts.device_type != "cuda":
            return f"CuPy cannot hold memory on {facts.device}"
        if facts.dtype not in NUMPY_NATIVE:
            return f"CuPy has no {facts.dtype}"
        return None

    def from_dlpack(self, x: Any) -> Any:
        return self.load().from_dlpack(x)

    def clone(self, x: Any) -> Any:
        return x.copy()

    def cast_steps(self, facts: Facts, dtype: str) -> list[Step]:
        if dtype not in NUMPY_NATIVE:
            raise ConversionError(
                message(
                    f"dtype={dtype!r}",
                    "CuPy has no such dtype",
                    "pick one of " + ", ".join(sorted(NUMPY_NATIVE)),
                )
            )
        target = lookup(dtype).numpy
        return [Step(f"cast {facts.dtype} -> {dtype}", True, lambda a: a.astype(target))]

    def to_device_steps(self, facts: Facts, device: str) -> list[Step]:
        cp = self.load()
        index = int(device.partition(":")[2] or 0)

        def move(a: Any) -> Any:
            with cp.cuda.Device(index):
                return cp.asarray(a)

        return [Step(f"copy -> cuda:{index}", True, move, "the data must live on the target GPU")]

    def device_span(self, x: Any) -> tuple[str, int, int] | None:
        return f"cuda:{x.device.id}", x.data.mem.ptr, x.data.mem.ptr + x.data.mem.size


BACKEND = CupyBackend()
