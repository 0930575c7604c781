"""Objects of frameworks tensorbridge does not know, read through an array protocol.

Checked after every framework in the table, for any type that speaks one of:

- ``__dlpack__`` + ``__dlpack_device__``: host memory is viewed in place, every dtype
  (bfloat16 and float8 too, see :mod:`.dlpack_reader`); CUDA memory is taken over by
  torch (or CuPy) through DLPack;
- ``__cuda_array_interface__`` (numba, CuPy-like libraries): taken over, zero-copy, by
  CuPy or torch, whichever is in use (else the one installed);
- ``__array_interface__`` (pyarrow tensors, PIL images, ...): a NumPy view, no copy;
- ``__array__`` on a type that also has ``shape`` and ``dtype`` (it is clearly an array;
  a ``DataFrame``, which has no single dtype, stays a leaf). Whether ``__array__`` copies
  is up to the object, so the step counts as a copy: ``copy=False`` refuses it.

Each object becomes the same memory as a tensor of a framework tensorbridge knows (the
"carrier": a NumPy view, or a torch/CuPy tensor for CUDA memory), and that framework's
route follows. The protocol backend is a source only, never a target.

**Protocols on the instance.** NumPy looks ``__array__``, ``__array_interface__`` and
``__array_struct__`` up on the *instance* (``np.asarray`` of an object with
``self.__array_interface__ = ...`` is a view), ``np.from_dlpack`` calls the instance's
``__dlpack__``, and numba/CuPy read ``__cuda_array_interface__`` from the instance too; a
wrapper whose ``__getattr__`` forwards to an array (numba's simulated CUDA arrays) speaks
them the same way. So does tensorbridge, with :func:`stand_in`: an object whose type no
framework owns, and that is not a basic Python value (NumPy's own exemption list), is
asked for the same protocols, in the same order, with the same "clearly an array" rule;
if it speaks one, a stand-in whose type speaks it (named after the object's type) takes
its route. A protocol set on the instance half-way (``__dlpack__`` without
``__dlpack_device__``, ``__array__`` without ``shape`` and ``dtype``) is refused with a fix
rather than left unconverted. A lookup costs about 0.5 µs per leaf that no framework owns
(basic Python values are not asked).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import numpy as np

from ..dtypes import numpy_dtype
from ..errors import ConversionError, message
from .base import Backend, Facts, Step, host_facts
from .dlpack_reader import DEVICE_TYPES, host_view

__all__ = ["ProtocolBackend", "BACKEND", "StandIn", "stand_in"]

#: protocol kind -> what the first step of the route says
_HOW = {
    "dlpack": "view the object's memory through its __dlpack__",
    "interface": "np.asarray view through the object's __array_interface__ (or __array_struct__)",
    "array": "np.asarray(x) through the object's __array__ (it may copy or share)",
    "cuda_dlpack": "take over the object's CUDA memory through its __dlpack__",
    "cuda": "take over the object's CUDA memory through its __cuda_array_interface__",
}


def _kind_of(tp: type) -> str | None:
    if hasattr(tp, "__dlpack__") and hasattr(tp, "__dlpack_device__"):
        return "dlpack"
    if hasattr(tp, "__cuda_array_interface__"):
        return "cuda"
    if hasattr(tp, "__array_interface__") or hasattr(tp, "__array_struct__"):
        return "interface"
    if hasattr(tp, "__array__") and hasattr(tp, "shape") and hasattr(tp, "dtype"):
        return "array"
    return None


#: Types whose instances NumPy never asks for array protocols (its
#: ``_is_basic_python_type``): a lookup on them could only fail, at a cost per leaf.
_BASIC_TYPES = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        bytearray,
        list,
        tuple,
        dict,
        set,
        frozenset,
        slice,
        type(Ellipsis),
        type(NotImplemented),
    }
)


class StandIn:
    """An object whose array protocol is found on the instance (set on it, or served by
    its ``__getattr__``), behind a type that speaks that protocol. ``obj`` is the object;
    its memory is kept alive by whatever view is taken through the stand-in."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj


class _DLPack(StandIn):
    __slots__ = ()

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.obj.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> Any:
        return self.obj.__dlpack_device__()


class _Cuda(StandIn):
    __slots__ = ()

    @property
    def __cuda_array_interface__(self) -> Any:
        return self.obj.__cuda_array_interface__


class _Interface(StandIn):
    __slots__ = ()

    @property
    def __array_interface__(self) -> Any:
        return self.obj.__array_interface__


class _Struct(StandIn):
    __slots__ = ()

    @property
    def __array_struct__(self) -> Any:
        return self.obj.__array_struct__


class _Array(StandIn):
    __slots__ = ()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        return self.obj.__array__(*args, **kwargs)

    @property
    def shape(self) -> Any:
        return self.obj.shape

    @property
    def dtype(self) -> Any:
        return self.obj.dtype


_STAND_INS: dict[tuple[type, type], type] = {}


def _on_instance(x: Any, name: str) -> Any:
    """``getattr(x, name)``, None when absent (as NumPy: only AttributeError means absent)."""
    try:
        return getattr(x, name, None)
    except Exception as exc:
        raise ConversionError(
            message(
                f"a {type(x).__module__}.{type(x).__qualname__}",
                f"asking it for {name} (an array protocol) raised {type(exc).__name__}: {exc}",
                "fix its attribute lookup, or pass np.asarray(x)",
            )
        ) from exc


def stand_in(x: Any) -> StandIn | None:
    """A stand-in for ``x`` if ``x`` speaks an array protocol on the instance, as NumPy
    finds it (see the module docstring); None if it speaks none. Called only for objects
    whose type no backend owns."""
    tp = type(x)
    if tp in _BASIC_TYPES:
        return None
    get = _on_instance
    kind: type
    if get(x, "__dlpack__") is not None and get(x, "__dlpack_device__") is not None:
        kind = _DLPack
    elif get(x, "__cuda_array_interface__") is not None:
        kind = _Cuda
    elif get(x, "__array_interface__") is not None:
        kind = _Interface
    elif get(x, "__array_struct__") is not None:
        kind = _Struct
    elif (
        get(x, "__array__") is not None
        and get(x, "shape") is not None
        and get(x, "dtype") is not None
    ):
        kind = _Array
    else:
        _refuse_incomplete(x)
        return None
    cls = _STAND_INS.get((tp, kind))
    if cls is None:  # named after the object's type, so plans and messages name it
        cls = _STAND_INS[(tp, kind)] = type(tp.__name__, (kind,), {"__slots__": ()})
        cls.__qualname__ = tp.__qualname__
        cls.__module__ = tp.__module__
    out: StandIn = cls(x)
    return out


def _refuse_incomplete(x: Any) -> None:
    """Refuse a protocol set on the instance half-way, which would otherwise leave the
    object unconverted without a word."""
    state = getattr(x, "__dict__", None)
    if not isinstance(state, dict) or not state:
        return
    if "__dlpack__" in state or "__dlpack_device__" in state:
        has_dlpack = _on_instance(x, "__dlpack__") is not None
        missing = "__dlpack_device__" if has_dlpack else "__dlpack__"
        why = f"it sets a DLPack method on the instance but has no {missing}"
    elif "__array__" in state:  # (a class's __array__ without dtype: a table, left as is)
        why = (
            "it has __array__ but not both shape and dtype, so it is not clearly an array "
            "(a table or a list-like object also has __array__)"
        )
    else:
        return
    raise ConversionError(
        message(
            f"a {type(x).__module__}.{type(x).__qualname__}",
            why,
            "pass np.asarray(x), or give it the whole protocol (__dlpack__ with "
            "__dlpack_device__, or __array__ with shape and dtype)",
        )
    )


def _said(exc: BaseException) -> str:
    """A failed protocol call's error, short (a framework's error can be pages long)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _has_cuda(backend: Backend) -> bool:
    """Whether ``backend`` (torch or CuPy) can use a CUDA device here."""
    try:
        return bool(backend.load().cuda.is_available())
    except Exception:
        return False


def _cuda_framework() -> Backend:
    """The backend that takes over CUDA memory: one already in use, else one installed."""
    from . import get_backend

    for name in ("cupy", "torch"):
        if name in sys.modules:
            return get_backend(name)
    for name in ("torch", "cupy"):
        if importlib.util.find_spec(name) is not None:
            return get_backend(name)
    raise ConversionError(
        message(
            "an object with CUDA memory from a framework tensorbridge does not know",
            "reading CUDA memory needs torch or CuPy, and neither is installed",
            "pip install 'tensorbridge[torch]' (or [cupy]), or copy it to the host in its own framework",
        )
    )


class ProtocolBackend(Backend):
    name = "protocol"
    module = ""  # no framework module: consulted for every type the frameworks do not own
    extra = ""

    def __init__(self) -> None:
        self._kinds: dict[type, str | None] = {}

    def loaded(self) -> bool:
        return True

    def load(self) -> Any:
        return np

    def owns(self, tp: type) -> bool:
        return self.protocol_of(tp) is not None

    def protocol_of(self, tp: type) -> str | None:
        """Which protocol instances of ``tp`` speak (cached per type), or None."""
        try:
            return self._kinds[tp]
        except KeyError:
            kind = self._kinds[tp] = _kind_of(tp)
            return kind

    def _what(self, x: Any) -> str:
        if isinstance(x, StandIn):
            x = x.obj
        return f"a {type(x).__module__}.{type(x).__qualname__}"

    def _route_kind(self, x: Any) -> str:
        kind = self.protocol_of(type(x))
        if kind == "dlpack":
            try:
                code = int(x.__dlpack_device__()[0])
            except Exception as exc:
                raise ConversionError(
                    message(
                        self._what(x),
                        "its __dlpack_device__() did not give a (device type, device id) "
                        f"pair ({_said(exc)})",
                        "fix the producer's __dlpack_device__, or pass np.asarray(x)",
                    )
                ) from exc
            if DEVICE_TYPES.get(code) == "cuda":
                return "cuda_dlpack"
        return kind or ""

    def carry(self, x: Any) -> Any:
        """The same memory as a NumPy array, or a torch/CuPy tensor for CUDA memory."""
        kind = self._route_kind(x)
        if kind == "dlpack":
            return host_view(x, self._what(x))
        if kind in ("interface", "array"):
            try:
                a = np.asarray(x)
            except Exception as exc:  # the object's own protocol failed: say whose, and how
                how = "__array__" if kind == "array" else "__array_interface__/__array_struct__"
                raise ConversionError(
                    message(
                        self._what(x),
                        f"NumPy could not read it through its {how} ({_said(exc)})",
                        "fix the object's array protocol, or convert it in its own library "
                        "to a NumPy array first",
                    )
                ) from exc
            if a.dtype == object:
                raise ConversionError(
                    message(
                        self._what(x),
                        "its array holds Python objects, not numbers",
                        "convert its values to a numeric dtype first",
                    )
                )
            return a
        backend = _cuda_framework()
        how = "__dlpack__" if kind == "cuda_dlpack" else "__cuda_array_interface__"
        if not _has_cuda(backend):
            raise ConversionError(
                message(
                    self._what(x),
                    f"its memory is on a CUDA device ({how}), and {backend.name} here has no "
                    "CUDA to take it over",
                    "copy it to the host in its own library first (numba: x.copy_to_host(), "
                    "CuPy: x.get()), or run where torch or CuPy has CUDA",
                )
            )
        try:
            if kind == "cuda_dlpack":
                return backend.from_dlpack(x)
            mod = backend.load()  # __cuda_array_interface__: both take it over without a copy
            return mod.asarray(x) if backend.name == "cupy" else mod.as_tensor(x, device="cuda")
        except Exception as exc:
            raise ConversionError(
                message(
                    self._what(x),
                    f"{backend.name} could not take over its CUDA memory through its {how} "
                    f"({_said(exc)})",
                    "fix the object's protocol, or copy it to the host in its own library first",
                )
            ) from exc

    def carrier(self, facts: Facts) -> Backend:
        from . import get_backend

        return get_backend(facts.framework)

    def facts(self, x: Any) -> Facts:
        kind = self._route_kind(x)
        c = self.carry(x)
        if isinstance(c, np.ndarray):
            f = host_facts(c)
            f.dlpack = False  # the NumPy route handles read-only, bfloat16 and flipped views
        else:
            f = self.carrier_of(c).facts(c)
        f.notes.append(f"protocol:{kind}")
        return f

    def carrier_of(self, c: Any) -> Backend:
        from . import get_backend

        return get_backend("cupy" if type(c).__module__.startswith("cupy") else "torch")

    def _wrap_step(self, facts: Facts) -> Step:
        kind = next(n for n in facts.notes if n.startswith("protocol:")).partition(":")[2]
        if kind == "array":
            return Step(
                _HOW[kind], True, self._host, "the object decides whether it copies", fresh=False
            )
        return Step(_HOW[kind], False, self._host if facts.framework == "numpy" else self.carry)

    def _host(self, x: Any) -> np.ndarray:
        a = self.carry(x)
        canonical = numpy_dtype(host_facts(a).dtype)
        if a.dtype.type is not canonical.type:  # np.longlong: the same integers, another name
            a = a.view(canonical.newbyteorder(a.dtype.byteorder))
        return a

    def prepare_steps(self, facts: Facts) -> list[Step]:
        return [self._wrap_step(facts)] + self.carrier(facts).prepare_steps(facts)

    def to_host_steps(self, x: Any, facts: Facts) -> list[Step]:
        if facts.framework == "numpy":
            return [self._wrap_step(facts)]
        return [self._wrap_step(facts)] + self.carrier(facts).to_host_steps(self.carry(x), facts)

    def to_dlpack_source(self, x: Any) -> Any:
        return x  # the carrier (a torch/CuPy tensor, which export DLPack) after the first step

    def from_host_steps(self, facts: Facts, *, device: str | None, copy: bool | None) -> list[Step]:
        raise ConversionError(
            message(
                "to='protocol'",
                "array-protocol objects are a source, not a target",
                "pick a framework to convert to",
            )
        )

    def host_view(self, x: Any) -> np.ndarray | None:
        try:
            c = self.carry(x)
        except ConversionError:
            return None
        return c if isinstance(c, np.ndarray) else None

    def device_span(self, x: Any) -> tuple[str, int, int] | None:
        c = self.carry(x)
        return None if isinstance(c, np.ndarray) else self.carrier_of(c).device_span(c)


BACKEND = ProtocolBackend()
