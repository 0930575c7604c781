"""TensorFlow: eager tensors and variables; sparse densified; strings as bytes;
ragged and symbolic (``tf.function``) tensors refused with the fix.

TF exposes DLPack only as capsules (``tf.experimental.dlpack``), so capsules
are wrapped in a small object with ``__dlpack__``. TF aborts the process on
DLPack memory that is not 64-byte aligned, so such memory is always copied.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..dtypes import NUMPY_NATIVE, canonical_name
from ..errors import ConversionError, DeviceError, message
from .base import SHARE_MIN_BYTES, Backend, Facts, Step, normalize_device

__all__ = ["TensorFlowBackend", "BACKEND"]

# Dtypes that both NumPy and TF move over DLPack (NumPy refuses bfloat16/float8).
_DLPACK_DTYPES = NUMPY_NATIVE


class _Capsule:
    """Give a legacy DLPack capsule the ``__dlpack__`` protocol."""

    def __init__(self, capsule: Any, device: tuple[int, int]) -> None:
        self._capsule, self._device = capsule, device

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device


class TensorFlowBackend(Backend):
    name = "tensorflow"
    module = "tensorflow"
    extra = "tensorflow"
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
        "float8_e4m3fn": "dtypes.experimental.float8_e4m3fn",
        "float8_e5m2": "dtypes.experimental.float8_e5m2",
        "float8_e4m3fnuz": "dtypes.experimental.float8_e4m3fnuz",
        "float8_e5m2fnuz": "dtypes.experimental.float8_e5m2fnuz",
        "float8_e4m3b11fnuz": "dtypes.experimental.float8_e4m3b11fnuz",
    }

    def __init__(self) -> None:
        self._plain: dict[type, bool] = {}  # type -> eager tensor or variable (has a kind)

    def unstaged(self, x: Any) -> bool:
        return True  # TF tensors never join the CUDA staging ring (TF copies its own)

    def express(
        self, tp: type, target: str, learn: Callable[[Any], Callable[[Any], Any]]
    ) -> Callable[[Any], Any] | None:
        if target != "numpy" or not hasattr(tp, "_datatype_enum") or not self.kind_of(tp):
            return None
        # kind() for NumPy: (type, dtype, device). The type is fixed (an eager tensor); by
        # dtype enum (reading .dtype costs 3x as much): (device, plan) for the first device
        # met, compared by value (t.device is a new string each call: comparing it costs
        # less than hashing it); plans for other devices by (device, enum).
        first: dict[int, tuple[str, Any]] = {}
        others: dict[tuple[str, int], Any] = {}
        # t._numpy() without its wrapper, which only rewords TF's errors (for those, the
        # plan's own step runs and says what went wrong)
        numpy_of = getattr(tp, "_numpy_internal", None) or getattr(tp, "_numpy")  # noqa: B009

        def run(t: Any) -> Any:
            enum = t._datatype_enum()
            dev = t.device
            e = first.get(enum)
            if e is not None and e[0] == dev:
                fn = e[1]
            else:
                fn = others.get((dev, enum))
                if fn is None:
                    fn = learn(t)
                    if e is None:
                        if len(first) >= 64:
                            first.clear()
                        first[enum] = (dev, fn)
                    else:
                        if len(others) >= 256:
                            others.clear()
                        others[dev, enum] = fn
            if fn is _host_view:  # the commonest plan's one step, inlined (a call less)
                try:
                    a = numpy_of(t)
                except Exception:
                    return fn(t)
                if type(a) is np.ndarray:
                    a.setflags(write=False)
                    return a
                return fn(t)  # a 0-d tensor (a NumPy scalar): the step views it over DLPack
            if fn is _tensor_numpy:  # the step, with TF's Tensor.numpy() inlined: a copy
                try:
                    a = numpy_of(t)
                except Exception:
                    return fn(t)
                return a.copy() if isinstance(a, np.ndarray) else np.asarray(a)
            return fn(t)

        return run

    def kind_of(self, tp: type) -> bool:
        """True when ``tp`` is a plain (eager) tensor or variable type: one with a kind."""
        plain = self._plain.get(tp)
        if plain is None:
            tf = self.load()
            plain = self._plain[tp] = (
                (hasattr(tp, "_numpy") and issubclass(tp, tf.Tensor)) or issubclass(tp, tf.Variable)
            ) and not issubclass(tp, (tf.SparseTensor, tf.RaggedTensor))
        return plain

    def kind(self, x: Any, target: str) -> tuple | None:
        tp = type(x)
        plain = self._plain.get(tp)
        if not (plain or (plain is None and self.kind_of(tp))):
            return None  # symbolic, sparse, ragged: planned (or refused) afresh
        key = (tp, x.dtype, x.device)
        if target == "numpy":
            return key
        return key + (x.shape.num_elements() * x.dtype.size < SHARE_MIN_BYTES,)

    def owns(self, tp: type) -> bool:
        tf = sys.modules.get("tensorflow")
        if tf is None:
            return False
        return issubclass(tp, (tf.Tensor, tf.Variable, tf.SparseTensor, tf.RaggedTensor))

    def facts(self, x: Any) -> Facts:
        tf = self.load()
        if isinstance(x, tf.RaggedTensor):
            raise ConversionError(
                message(
                    f"a tf.RaggedTensor of shape {x.shape}",
                    "its rows have different lengths, so it is not a rectangular array",
                    "pass ragged='list' to get nested Python lists, or x.to_tensor(default_value=0) to pad",
                )
            )
        sparse = isinstance(x, tf.SparseTensor)
        if not sparse and not isinstance(x, tf.Variable) and not hasattr(x, "_numpy"):
            raise ConversionError(
                message(
                    f"a symbolic tf.Tensor {getattr(x, 'name', '')!r}",
                    "inside tf.function (graph mode) tensors have no values yet",
                    "convert the tensor returned by the tf.function call, outside it, or use "
                    "tf.py_function / tf.numpy_function to run Python on values inside it",
                )
            )
        dtype = x.dtype
        if dtype == tf.resource:
            raise ConversionError(
                message(
                    f"a TensorFlow tensor of dtype {dtype.name}",
                    "it is a handle to a variable or a container, not data",
                    "convert the variable itself (v, or v.read_value()) instead of v.handle",
                )
            )
        if dtype == tf.variant:
            raise ConversionError(
                message(
                    f"a TensorFlow tensor of dtype {dtype.name}",
                    "it is an opaque container (a dataset, a tensor list, an optional), "
                    "not an array",
                    "convert the tensors it holds (iterate the dataset; tf.stack a "
                    "TensorArray's values)",
                )
            )
        name = "string" if dtype == tf.string else canonical_name(dtype.as_numpy_dtype)
        device = _device_name(x.device if not sparse else x.values.device)
        f = Facts("tensorflow", name, tuple(x.shape), device=device, writable=False)
        if not sparse and name != "string":
            f.nbytes = x.shape.num_elements() * x.dtype.size
        if sparse:
            f.notes.append("sparse")
        if isinstance(x, tf.Variable):
            f.notes.append("variable")
        f.dlpack = not sparse and name in _DLPACK_DTYPES | {"bfloat16"}  # TF exports no float8
        if name == "int32" and f.device_type != "cpu":
            # TF keeps int32 tensors placed on a GPU in host memory; DLPack would mislabel them.
            f.notes.append("int32 on a TF GPU device lives in host memory")
            f.dlpack = False
        return f

    def to_host_steps(self, x: Any, facts: Facts) -> list[Step]:
        tf = self.load()
        steps: list[Step] = []
        if "sparse" in facts.notes:
            steps.append(
                Step(
                    "densify the tf.SparseTensor",
                    True,
                    tf.sparse.to_dense,
                    "sparse tensors have no dense memory to share",
                )
            )
        if "variable" in facts.notes:
            steps.append(
                Step(
                    "read the variable's current value",
                    False,
                    lambda v: v.read_value(),
                    "a snapshot: later assign() calls are not seen by the result",
                )
            )
        if facts.dtype == "string":
            steps.append(
                Step(
                    "Tensor.numpy() -> array of bytes objects",
                    True,
                    lambda t: np.asarray(t.numpy(), dtype=object),
                    "TF strings are variable-length bytes",
                )
            )
        elif (
            facts.device_type == "cpu"
            and facts.dtype in _DLPACK_DTYPES
            and "sparse" not in facts.notes
        ):
            steps.append(
                Step(
                    "view of the host buffer (read-only: TF tensors are immutable)",
                    False,
                    _host_view,
                )
            )
        else:
            why = (
                "device memory is not addressable from NumPy"
                if facts.device_type != "cpu"
                else f"NumPy cannot import {facts.dtype} over DLPack"
            )
            steps.append(Step("Tensor.numpy()", True, _tensor_numpy, why))
        return steps

    def fresh_host_step(self, facts: Facts) -> Step | None:
        if (
            facts.device_type != "cpu"
            or facts.dtype not in _DLPACK_DTYPES
            or "sparse" in facts.notes
        ):
            return None  # the route already copies, or has no view to replace
        return Step("Tensor.numpy()", True, _tensor_numpy)

    def from_host_steps(self, facts: Facts, *, device: str | None, copy: bool | None) -> list[Step]:
        tf = self.load()
        if self.native_dtype(facts.dtype) is None:
            raise ConversionError(
                message(
                    f"an array of dtype {facts.dtype}",
                    f"TensorFlow {tf.__version__} has no {facts.dtype}",
                    "pass dtype= to cast to a dtype TensorFlow has, e.g. dtype='float32'",
                )
            )
        why = self.dlpack_import(facts)
        if why is None and not facts.writable:
            why = "NumPy cannot export read-only arrays over DLPack"
        if why is None and copy is not False:
            why = (
                "a later write to the NumPy array would change the TensorFlow tensor, which TF "
                "users take to be immutable (tf.convert_to_tensor copies too); copy=False shares"
            )
        steps: list[Step] = []
        if why is None:

            def share(a: Any) -> Any:
                # TF aborts the process on memory it cannot import: the facts of a fresh
                # host copy are planned, so check the real array before handing it over
                if a.flags.c_contiguous and a.dtype.isnative and a.ctypes.data % 64 == 0:
                    return tf.experimental.dlpack.from_dlpack(a.__dlpack__())
                return tf.convert_to_tensor(a)

            steps.append(
                Step(
                    "tf.experimental.dlpack.from_dlpack (shares the NumPy buffer; do not "
                    "mutate it while TF uses it)",
                    False,
                    share,
                )
            )
        else:
            steps.append(Step("tf.convert_to_tensor", True, tf.convert_to_tensor, why))
        if device is not None and normalize_device(device) != "cpu":
            steps.extend(self.to_device_steps(facts, device))
        return steps

    def dlpack_import(self, facts: Facts) -> str | None:
        if facts.dtype not in _DLPACK_DTYPES:
            return f"TensorFlow's DLPack import has no {facts.dtype}"
        if not facts.contiguous or facts.negative_strides:
            return "TensorFlow only imports row-major (C-contiguous) DLPack memory"
        if not facts.aligned:
            return "TensorFlow needs 64-byte aligned memory (it aborts on anything else)"
        if facts.device_type not in ("cpu", "cuda"):
            return f"TensorFlow cannot import DLPack memory on {facts.device}"
        return None

    def from_dlpack(self, x: Any) -> Any:
        tf = self.load()
        return tf.experimental.dlpack.from_dlpack(x.__dlpack__())

    def to_dlpack_source(self, x: Any) -> Any:
        tf = self.load()
        if isinstance(x, tf.Variable):
            x = x.read_value()
        dev = _device_name(x.device)
        code = (1, 0) if dev == "cpu" else (2, int(dev.split(":")[1]))
        return _Capsule(tf.experimental.dlpack.to_dlpack(x), code)

    def clone(self, x: Any) -> Any:
        tf = self.load()
        if isinstance(x, (tf.SparseTensor, tf.RaggedTensor)):  # copy each component
            return tf.nest.map_structure(self.clone, x, expand_composites=True)
        with tf.device(x.device):
            return tf.convert_to_tensor(x.numpy())

    def cast_steps(self, facts: Facts, dtype: str) -> list[Step]:
        tf = self.load()
        target = self.native_dtype(dtype)
        if target is None:
            raise ConversionError(
                message(
                    f"dtype={dtype!r}",
                    "TensorFlow has no such dtype",
                    "pick one of " + ", ".join(self.DTYPES),
                )
            )
        return [Step(f"cast {facts.dtype} -> {dtype}", True, lambda t: tf.cast(t, target))]

    def to_device_steps(self, facts: Facts, device: str) -> list[Step]:
        tf = self.load()
        kind, _, index = device.partition(":")
        tf_name = {"cuda": "GPU", "gpu": "GPU", "cpu": "CPU"}.get(kind)
        if tf_name is None or int(index or 0) >= len(tf.config.list_logical_devices(tf_name)):
            raise DeviceError(
                message(
                    f"device={device!r} for TensorFlow",
                    "TensorFlow sees no such device on this machine",
                    f"use one of {[d.name for d in tf.config.list_logical_devices()]}",
                )
            )
        name = f"/{tf_name}:{index or 0}"

        def move(t: Any) -> Any:
            with tf.device(name):
                return tf.identity(t)

        return [
            Step(f"copy -> {name}", True, move, "the data must live in the target device's memory")
        ]

    def host_view(self, x: Any) -> np.ndarray | None:
        tf = self.load()
        if isinstance(x, (tf.SparseTensor, tf.RaggedTensor)) or not hasattr(x, "device"):
            return None
        if isinstance(x, tf.Variable):
            x = x.read_value()  # shares the variable's buffer until its next assign()
        if _device_name(x.device) != "cpu" or x.dtype == tf.string:
            return None
        if canonical_name(x.dtype.as_numpy_dtype) not in _DLPACK_DTYPES:
            # bfloat16: tf.bitcast to uint16 shares the buffer. TF can neither bitcast nor
            # export float8, so its memory cannot be located from Python.
            if x.dtype != tf.bfloat16:
                return None
            x = tf.bitcast(x, tf.uint16)
        return _host_view(x)


def _device_name(tf_device: str) -> str:
    """'/job:localhost/replica:0/task:0/device:GPU:1' -> 'cuda:1'."""
    if not tf_device:
        return "cpu"
    tail = tf_device.rsplit("device:", 1)[-1]
    kind, _, index = tail.partition(":")
    kind = {"GPU": "cuda", "CPU": "cpu", "TPU": "tpu"}.get(kind.upper(), kind.lower())
    return "cpu" if kind == "cpu" and index in ("", "0") else f"{kind}:{index or 0}"


#: ``t.numpy()`` as a C-level callable (a Python frame less per call than a lambda)
def _tensor_numpy(t: Any) -> np.ndarray:
    """``t.numpy()``, TF's own copy (writable), as an array (a 0-d tensor gives a NumPy
    scalar). The step of every route that copies with TF. A Python function,
    not ``operator.methodcaller``, which calls the Python method from C: slower than one
    Python function calling another."""
    return np.asarray(t.numpy())


def _host_view(t: Any) -> np.ndarray:
    """A read-only NumPy view of a host tensor's buffer (NumPy-native dtypes). TF's own
    ``np.asarray(t)`` (``t._numpy()``) views the buffer, and keeps the tensor alive; it
    is writable, and TF tensors are immutable, so the view we hand out is not."""
    view = getattr(t, "_numpy", None)
    a = view() if view is not None else None
    if type(a) is not np.ndarray:  # a 0-d tensor gives a NumPy scalar: the DLPack export views it
        tf = sys.modules["tensorflow"]
        a = np.from_dlpack(_Capsule(tf.experimental.dlpack.to_dlpack(t), (1, 0)))
    a.setflags(write=False)  # (a third of the cost of assigning a.flags.writeable)
    return a


BACKEND = TensorFlowBackend()
