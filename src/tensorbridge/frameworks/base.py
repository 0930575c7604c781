"""The small interface every framework module implements.

A conversion is planned as a list of :class:`Step`\\ s before anything runs, so
that :func:`tensorbridge.explain` can show the route without moving data, and
``copy=False`` can refuse before doing any work. Each step knows whether it
copies and why.

Routes go hub and spoke: a source either hands its memory to the target over
DLPack (same device, zero-copy), or exports to a host NumPy array which the
target imports. No module knows about any other framework.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import FrameworkNotInstalledError, message

__all__ = [
    "Step",
    "Facts",
    "Backend",
    "host_facts",
    "normalize_device",
    "parse_device",
    "SHARE_MIN_BYTES",
]

#: Below this many bytes, a route that would share memory through a DLPack hand-over
#: (JAX: ~30 µs, torch: ~3 µs per call) copies instead when copy=None allows it: copying
#: 1 KiB costs under 1 µs. Sharing stays O(1) for everything larger; copy=False always shares.
SHARE_MIN_BYTES = 64 * 1024


def normalize_device(device: str) -> str:
    """``"gpu"`` -> ``"cuda:0"``, ``"cuda"`` -> ``"cuda:0"``, ``"cpu:0"`` -> ``"cpu"``,
    ``"cpu:3"`` stays ``"cpu:3"`` (TensorFlow's spellings ``"CPU:0"``, ``"GPU:1"`` and
    ``"/job:localhost/replica:0/task:0/device:GPU:1"`` too)."""
    if device.startswith("/"):  # a TF device path: keep its last "device:KIND:N" part
        device = device.rsplit("device:", 1)[-1].lstrip("/")
    kind, _, index = device.partition(":")
    kind = kind.lower()
    kind = {"gpu": "cuda"}.get(kind, kind)
    if kind == "cpu":
        return "cpu" if index in ("", "0") else f"cpu:{index}"
    return f"{kind}:{index or 0}"


_KINDS = ("cpu", "cuda", "mps", "tpu", "rocm", "xpu", "metal")
_PARSED: dict[str, str] = {}


def parse_device(device: Any) -> str:
    """The one spelling of a device every target understands: ``"cpu"``, ``"cpu:N"``,
    ``"cuda:N"``, ``"mps:0"``, ``"tpu:N"``... from a string (torch, JAX or TF spelling,
    ``"/GPU:0"`` and full TF device paths too), a ``torch.device``, a JAX ``Device`` or a
    CUDA index (``0`` is ``"cuda:0"``, as in torch). Anything else is a
    :class:`~tensorbridge.DeviceError`.

    >>> parse_device("GPU"), parse_device("cpu:0"), parse_device("/device:CPU:2"), parse_device(1)
    ('cuda:0', 'cpu', 'cpu:2', 'cuda:1')
    """
    if isinstance(device, str):
        done = _PARSED.get(device)
        if done is not None:
            return done
        text = device.strip()
        canonical = normalize_device(text) if text else ""
        kind, _, index = canonical.partition(":")
        if kind not in _KINDS or not (index == "" or index.isdigit()):
            raise _bad_device(device)
        if len(_PARSED) < 256:
            _PARSED[device] = canonical
        return canonical
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise _bad_device(device)
        return f"cuda:{device}"
    torch_kind = getattr(device, "type", None)  # torch.device
    if isinstance(torch_kind, str) and type(device).__module__.startswith("torch"):
        torch_index = getattr(device, "index", None)
        return parse_device(torch_kind if torch_index is None else f"{torch_kind}:{torch_index}")
    platform = getattr(device, "platform", None)  # a JAX Device
    if isinstance(platform, str) and isinstance(getattr(device, "id", None), int):
        return parse_device(f"{platform}:{device.id}")
    if type(device).__module__ == "mlx.core":  # mx.cpu, mx.gpu, mx.Device(mx.gpu, 1)
        return _mlx_device(device)
    raise _bad_device(device)


def _mlx_device(device: Any) -> str:
    """An MLX device type (``mx.cpu``) or device (``mx.default_device()``): its GPU is
    Metal (``"mps:N"``, as torch calls it) or, in a CUDA build, ``"cuda:N"``."""
    kind = getattr(device, "name", None) or getattr(getattr(device, "type", None), "name", None)
    found = re.fullmatch(r"Device\((\w+), (\d+)\)", repr(device))  # Device has no .index
    index = int(found[2]) if found else 0
    if kind == "cpu":
        return "cpu" if index == 0 else f"cpu:{index}"
    if kind == "gpu":
        metal = getattr(sys.modules.get("mlx.core"), "metal", None)
        return f"mps:{index}" if metal is not None and metal.is_available() else f"cuda:{index}"
    raise _bad_device(device)


def _bad_device(device: Any) -> Exception:
    from ..errors import DeviceError

    return DeviceError(
        message(
            f"device={device!r}",
            "it is not a device tensorbridge can name",
            "pass 'cpu', 'cpu:N', 'cuda', 'cuda:N', 'mps' or 'tpu:N', a torch.device, a JAX device "
            "(jax.devices()[0]), an MLX device (mx.cpu), a TF device name ('/GPU:0'), or a CUDA "
            "index (0)",
        )
    )


@dataclass(frozen=True)
class Step:
    """One stage of a route: what it does, whether it copies, and why."""

    text: str
    copies: bool
    run: Callable[[Any], Any]
    why: str = ""
    #: For a copying step: the result is new memory nothing else holds. False for a
    #: copy the source framework keeps and hands out again (JAX's cached host value).
    fresh: bool = True

    def describe(self) -> str:
        kind = "copy" if self.copies else "zero-copy"
        return f"{self.text} [{kind}]" + (f" ({self.why})" if self.why else "")


@dataclass
class Facts:
    """What a route depends on, read from a tensor without touching its data."""

    framework: str
    dtype: str  # canonical name
    shape: tuple[int, ...]
    device: str = "cpu"  # "cpu", "cuda:0", "mps:0", "tpu:0"
    contiguous: bool = True  # C order, so DLPack consumers that need it accept it
    negative_strides: bool = False  # on a dimension longer than 1: a real flip
    unit_flip: bool = False  # negative strides only on size-1 dimensions (harmless)
    native_order: bool = True
    writable: bool = True
    aligned: bool = True  # data pointer 64-byte aligned (JAX copies otherwise)
    dlpack: bool = True  # can export over DLPack as it is
    # every stride a whole number of items (torch and MLX count strides in items; a view
    # of one field of a packed record array steps by part of one). No kind reads it: a
    # plan made from such an array is never cached (Plan.by_kind)
    whole_items: bool = True
    notes: list[str] = field(default_factory=list)
    nbytes: int = -1  # size of the data; -1: unknown (never "small")

    @property
    def small(self) -> bool:
        """Small enough that copying costs less than a DLPack hand-over."""
        return 0 <= self.nbytes < SHARE_MIN_BYTES

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]


def whole_items(a: np.ndarray) -> bool:
    """True when every stride of ``a`` is a whole number of items."""
    n = a.itemsize
    return n <= 1 or all(s % n == 0 for s in a.strides)


def host_facts(a: np.ndarray, framework: str = "numpy") -> Facts:
    """Facts of a host NumPy array (also used for intermediate arrays)."""
    from ..dtypes import canonical_name

    return Facts(
        framework=framework,
        dtype=canonical_name(a.dtype),
        shape=a.shape,
        contiguous=a.flags.c_contiguous,
        negative_strides=any(s < 0 and n > 1 for s, n in zip(a.strides, a.shape, strict=True)),
        unit_flip=any(s < 0 and n <= 1 for s, n in zip(a.strides, a.shape, strict=True)),
        native_order=a.dtype.isnative,
        writable=a.flags.writeable,
        whole_items=whole_items(a),
        aligned=a.ctypes.data % 64 == 0,
        nbytes=a.nbytes,
    )


class Backend:
    """One framework. Subclasses fill in the names and the methods."""

    #: public name, used in ``to=`` and messages
    name: str = ""
    #: top-level module whose presence in sys.modules means the framework is in use
    module: str = ""
    #: the pip extra that installs it
    extra: str = ""
    #: canonical dtype name -> attribute name in the framework module (data, not code)
    DTYPES: dict[str, str] = {}

    _mod: ModuleType | None = None
    #: importing memory over DLPack costs a handshake: copy tensors smaller than
    #: SHARE_MIN_BYTES instead when copy=None (see :data:`SHARE_MIN_BYTES`)
    copy_small: bool = False

    # -- loading ---------------------------------------------------------------
    def loaded(self) -> bool:
        """True when the framework is already imported (never imports it)."""
        return self.module in sys.modules

    def load(self) -> ModuleType:
        """Import the framework, or say how to install it."""
        if self._mod is None:
            try:
                self._mod = importlib.import_module(self.module)
            except ImportError as exc:
                raise FrameworkNotInstalledError(
                    message(
                        f"target {self.name!r}",
                        f"{self.module} is not installed ({exc})",
                        f"pip install 'tensorbridge[{self.extra}]'",
                    )
                ) from exc
        return self._mod

    def native_dtype(self, canonical: str) -> Any | None:
        """The framework's dtype object for a canonical name, or None."""
        attr = self.DTYPES.get(canonical)
        return None if attr is None else self._dtype_attr(attr)

    def _dtype_attr(self, attr: str) -> Any | None:
        mod = self.load()
        obj: Any = mod
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    # -- per-object ------------------------------------------------------------
    def owns(self, tp: type) -> bool:
        """True when instances of ``tp`` are this framework's tensors."""
        raise NotImplementedError

    def facts(self, x: Any) -> Facts:
        raise NotImplementedError

    def unstaged(self, x: Any) -> bool:
        """True when ``x`` certainly needs no CUDA staging (``to_numpy`` of a tree gathers
        CUDA tensors in one transfer): host memory, or a framework the staging ring does
        not gather. Cheap; False when unsure."""
        return False

    def kind(self, x: Any, target: str) -> tuple | None:
        """What a route from ``x`` to ``target`` depends on, read cheaply (attributes,
        never the data): two tensors of one kind get the same route, so the route is
        planned once per kind and cached. It must determine every fact the planner
        reads for that target. None: plan this object afresh (rare kinds, errors)."""
        return None

    def express(
        self, tp: type, target: str, learn: Callable[[Any], Callable[[Any], Any]]
    ) -> Callable[[Any], Any] | None:
        """A faster way to find the cached plan of the commonest kinds of ``tp`` (called
        without device=; once per table: copy=None, copy=True, each dtype= string), or
        None. The function it returns takes a tensor of type ``tp`` and returns the
        converted result, or None to send the tensor down the ordinary path (kind, plan
        cache). It reads a few attributes that fix the kind, and runs the plan it learnt
        for that kind with ``learn(x)`` (the cached plan's function for this table's
        options, exactly what the ordinary path runs), so ``explain`` stays true. A plan
        learnt for one kind holds for that kind only, under these options: never assume
        it for another (a cast's plan is a bare view only where the dtype is already the
        one asked for). ``learn`` raises for a tensor whose plan holds for it alone. The
        function must never return None after running a plan. If it raises (other than a
        TensorBridgeError), the caller takes the ordinary path, which words the error."""
        return None

    def prepare_steps(self, facts: Facts) -> list[Step]:
        """Steps every route out of this framework needs first (detach, resolve bits...)."""
        return []

    def to_host_steps(self, x: Any, facts: Facts) -> list[Step]:
        """Steps that turn ``x`` into a host NumPy array in its canonical dtype."""
        raise NotImplementedError

    def fresh_host_step(self, facts: Facts) -> Step | None:
        """The framework's own copy to fresh host memory, a step that can replace the last
        (zero-copy view) step of :meth:`to_host_steps`, or None (then the view is copied
        afterwards). The planner says why it copies: copy=True to NumPy, or a writable
        target for immutable memory."""
        return None

    def from_host_steps(self, facts: Facts, *, device: str | None, copy: bool | None) -> list[Step]:
        """Steps that turn a host NumPy array with ``facts`` into this framework's tensor."""
        raise NotImplementedError

    def dlpack_import(self, facts: Facts) -> str | None:
        """None when a DLPack producer with ``facts`` can be imported zero-copy,
        else the reason it cannot."""
        return "no DLPack support"

    def from_dlpack(self, x: Any) -> Any:
        raise NotImplementedError

    def to_dlpack_source(self, x: Any) -> Any:
        """An object with ``__dlpack__`` (and ``__dlpack_device__``) for ``x``."""
        return x

    def clone(self, x: Any) -> Any:
        """An independent copy of one of this framework's tensors."""
        raise NotImplementedError

    def cast_steps(self, facts: Facts, dtype: str) -> list[Step]:
        """Steps that cast a tensor of this framework to the canonical ``dtype``."""
        raise NotImplementedError

    def to_device_steps(self, facts: Facts, device: str) -> list[Step]:
        """Steps that move a tensor of this framework to ``device``."""
        raise NotImplementedError

    def host_view(self, x: Any) -> np.ndarray | None:
        """A zero-copy NumPy view of ``x``'s host memory, or None (device memory)."""
        return None

    def device_span(self, x: Any) -> tuple[str, int, int] | None:
        """(device, first byte address, one past the last) for device memory."""
        return None
