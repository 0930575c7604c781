"""NumPy: the hub. Host arrays in, host arrays out; bfloat16/float8 via ml_dtypes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConversionError, DeviceError, message
from .base import SHARE_MIN_BYTES, Backend, Facts, Step, host_facts, normalize_device

__all__ = ["NumpyBackend", "BACKEND"]


def _is_masked(x: Any) -> bool:
    """``isinstance(x, np.ma.MaskedArray)`` without touching ``np.ma``: NumPy 2 imports it
    lazily (20 ms once, ~10 µs per attribute access after), and no masked array exists
    before it is imported."""
    ma = sys.modules.get("numpy.ma")
    return ma is not None and isinstance(x, ma.MaskedArray)


def refuse_masked(x: Any, what: str, why: str) -> None:
    """Raise :class:`ConversionError` when ``x`` is a masked array headed where masks do
    not exist (``why`` says where): the missing values would silently become data."""
    if _is_masked(x):
        raise ConversionError(
            message(
                what,
                f"{why}, so which values are missing would be lost",
                "fill the gaps (a.filled(0)), or pass a.data to drop the mask knowingly; keep the "
                "mask as a bool tensor too if you need it (np.ma.getmaskarray(a))",
            )
        )


def _quiet_errstate() -> tuple[Any, Any] | None:
    """NumPy's floating-point error state as ``np.errstate(all="ignore")`` sets it, and the
    context variable that holds it: entering ``np.errstate`` costs about 0.8 µs, setting
    the variable 0.1 µs (a small cast costs 0.5 µs). None where NumPy keeps it elsewhere."""
    try:
        from numpy._core import _ufunc_config as config

        var: Any = getattr(config, "_extobj_contextvar")  # noqa: B009 - private: no stubs
        make: Any = getattr(config, "_make_extobj")  # noqa: B009
        return var, make(all="ignore")
    except (ImportError, AttributeError, TypeError):
        return None


_QUIET = _quiet_errstate()


def _caster(target: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """``a.astype(target)`` without NumPy's warnings for NaN or out-of-range values (what
    such values become is documented in convert's docstring, not an accident to warn
    about), as one function: a plan's cast step."""
    if _QUIET is None:

        def guarded(a: np.ndarray) -> np.ndarray:
            with np.errstate(all="ignore"):
                return a.astype(target, order="C")

        return guarded
    var, quiet = _QUIET

    def quiet_cast(a: np.ndarray) -> np.ndarray:
        token = var.set(quiet)
        try:
            return a.astype(target, order="C")
        finally:
            var.reset(token)

    return quiet_cast


def _copy(a: Any) -> np.ndarray:
    return np.array(a, copy=True, order="K")


def flipped(strides: tuple[int, ...]) -> bool:
    """Whether an array of ``strides`` has a negative one (``torch.from_numpy`` refuses it;
    an array that owns its memory never has one). Two dims are tested without ``min``."""
    s = strides
    return bool((s[0] < 0 or s[1] < 0) if len(s) == 2 else (s and min(s) < 0))


class NumpyBackend(Backend):
    name = "numpy"
    module = "numpy"
    extra = "numpy"
    DTYPES = {}  # every canonical dtype is a NumPy (or ml_dtypes) dtype

    def load(self) -> Any:
        return np

    def loaded(self) -> bool:
        return True

    def native_dtype(self, canonical: str) -> Any:
        from ..dtypes import numpy_dtype

        return numpy_dtype(canonical)

    def owns(self, tp: type) -> bool:
        return issubclass(tp, (np.ndarray, np.generic))

    def unstaged(self, x: Any) -> bool:
        return True

    def express(
        self, tp: type, target: str, learn: Callable[[Any], Callable[[Any], Any]]
    ) -> Callable[[Any], Any] | None:
        if tp is np.ndarray and target in ("jax", "tensorflow"):
            return _express_copied(target, learn)
        if tp is not np.ndarray or target not in ("torch", "mlx"):
            return None  # other targets' kinds read layout, address and size
        # kind() for these targets: (type, dtype, dtype char, writeable, flipped strides).
        # The type is fixed; one table per writeable flag, keyed by dtype (equal dtypes of
        # another char, such as 'l' and 'q', have the same canonical name, so the same
        # route). An array that owns its memory was laid out by NumPy, with no negative
        # stride; any other is asked. Both facts come from one flags object (a.base cost
        # as much as a second read). (Strides set by hand, deprecated, make the plan
        # raise: the ordinary path then plans the array.)
        # (The table is picked by a conditional, not by indexing a pair with the flag: a
        # bool index takes the tuple's slow path, ~0.02 µs in a 0.45 µs route.)
        # A writable array of the dtype of the last one is looked up by identity first:
        # hashing a dtype costs as much as the rest of the lookup (dtypes of one kind are
        # one object in practice; an equal dtype of another identity takes the table).
        # The pair is replaced whole, so threads never see one dtype with another's route.
        # The pair is also ``run.memo[0]``: convert() writes these checks out for it (a
        # Python call less in the commonest call of all); both read the same pair.
        writable: dict[Any, Any] = {}
        readonly: dict[Any, Any] = {}
        memo: list[tuple[Any, Any]] = [(None, None)]

        def run(a: np.ndarray) -> Any:
            flags = a.flags
            if not flags.owndata and flipped(a.strides):
                return None  # flipped: the kind says which dims, leave it to the planner
            if flags.writeable:
                dt = a.dtype
                seen = memo[0]
                if seen[0] is dt:
                    return seen[1](a)
                table = writable
            else:
                dt = a.dtype
                table = readonly
            fn = table.get(dt)
            if fn is None:
                if len(table) >= 256:
                    table.clear()
                fn = table[dt] = learn(a)
            if table is writable:
                memo[0] = (dt, fn)
            return fn(a)

        run.memo = memo  # type: ignore[attr-defined]
        return run

    def kind(self, x: Any, target: str) -> tuple | None:
        if type(x) is not np.ndarray and (not isinstance(x, np.ndarray) or _is_masked(x)):
            return None  # scalars and masked arrays are planned afresh
        dt = x.dtype
        flags = x.flags
        flip: Any = False
        strides = x.strides
        if strides and min(strides) < 0:  # which dims are flipped decides the route
            pairs = list(zip(strides, x.shape, strict=True))
            flip = (any(s < 0 and n > 1 for s, n in pairs), any(s < 0 and n <= 1 for s, n in pairs))
        if target in ("torch", "mlx"):  # from_numpy/mx.array read neither layout, address nor size
            return (type(x), dt, dt.char, flags.writeable, flip)
        key = (type(x), dt, dt.char, flags.writeable, flip, flags.c_contiguous)
        if target == "numpy":
            return key
        return key + (x.ctypes.data % 64 == 0, x.nbytes < SHARE_MIN_BYTES)

    def facts(self, x: Any) -> Facts:
        return host_facts(np.asarray(x))

    def to_host_steps(self, x: Any, facts: Facts) -> list[Step]:
        from ..dtypes import numpy_dtype

        steps = (
            []
            if isinstance(x, np.ndarray)
            else [Step("numpy scalar -> 0-d array", False, np.asarray)]
        )
        canonical = numpy_dtype(facts.dtype)
        if np.asarray(x).dtype.type is not canonical.type:  # np.longlong, np.ulonglong
            steps.append(
                Step(
                    f"view as {facts.dtype} ({np.asarray(x).dtype.type.__name__} is the "
                    "same integer under another name, which frameworks refuse)",
                    False,
                    lambda a: a.view(canonical.newbyteorder(a.dtype.byteorder)),
                )
            )
        return steps

    def from_host_steps(self, facts: Facts, *, device: str | None, copy: bool | None) -> list[Step]:
        if device is not None and normalize_device(device) != "cpu":
            raise DeviceError(
                message(
                    f"device={device!r} for a NumPy result",
                    "NumPy arrays live in host memory only",
                    "leave device unset, or pick a framework that has devices (to='torch', 'jax', 'cupy')",
                )
            )
        return []

    def dlpack_import(self, facts: Facts) -> str | None:
        if facts.device_type != "cpu":
            return f"NumPy cannot hold memory on {facts.device}"
        return None

    def from_dlpack(self, x: Any) -> Any:
        return np.from_dlpack(x)

    def clone(self, x: Any) -> Any:
        return _copy(x)

    def cast_steps(self, facts: Facts, dtype: str) -> list[Step]:
        from ..dtypes import numpy_dtype

        target = numpy_dtype(dtype)
        return [Step(f"cast {facts.dtype} -> {dtype}", True, _caster(target))]

    def to_device_steps(self, facts: Facts, device: str) -> list[Step]:
        return self.from_host_steps(facts, device=device, copy=None)

    def host_view(self, x: Any) -> np.ndarray | None:
        return np.asarray(x)


BACKEND = NumpyBackend()


def _express_copied(
    target: str, learn: Callable[[Any], Callable[[Any], Any]]
) -> Callable[[Any], Any]:
    """The express route of a writable array to JAX or TensorFlow (the tables of copy=None,
    copy=True and dtype=; never copy=False). Its route copies whatever the array's layout,
    address or size (a later write to the array must not change the immutable result;
    a cast makes fresh memory first), so it depends on the dtype alone, and on JAX's
    64-bit flag for JAX: one table per flag, keyed by dtype. The planned path reads the
    address for alignment, which costs more than the rest of the lookup, and makes JAX's
    own copy slower after it. Read-only and flipped arrays take the planned path (their
    routes may share memory, or depend on which dims are flipped)."""
    tables: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})
    to_jax = target == "jax"

    def run(a: np.ndarray) -> Any:
        flags = a.flags
        if not flags.writeable or (not flags.owndata and flipped(a.strides)):
            return None
        if to_jax:
            jax = sys.modules.get("jax")
            if jax is None:  # the planned path imports JAX; later calls read its flag
                return None
            table = tables[1] if jax.config.jax_enable_x64 else tables[0]
        else:
            table = tables[0]
        dt = a.dtype
        fn = table.get(dt)
        if fn is None:
            if len(table) >= 256:
                table.clear()
            fn = table[dt] = learn(a)
        return fn(a)

    return run
