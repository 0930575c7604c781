"""The public conversion functions: one call for a tensor or a tree of them.

>>> import numpy as np, tensorbridge as tb
>>> a = np.arange(3.0)
>>> tb.to_numpy({"a": a, "step": 3})["a"] is a
True
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ConversionError, TensorBridgeError, message
from .frameworks import _BY_TYPE, ALIASES, TARGETS, backend_of, foreign_cuda, get_backend
from .frameworks.base import Backend, Step, normalize_device, parse_device
from .frameworks.numpy import flipped
from .frameworks.protocol import stand_in
from .plan import _PLANS, Plan, cached_plan, plan_key_x64, plan_leaf
from .tree import format_path, tree_leaves_with_path, tree_map

__all__ = [
    "convert",
    "to_numpy",
    "to_torch",
    "to_tensorflow",
    "to_tf",
    "to_jax",
    "to_cupy",
    "to_mlx",
    "explain",
    "shares_memory",
    "TreePlan",
]

_SCALARS = frozenset((bool, int, float, complex))

#: Express routes: for each ``to=`` spelling (filled below), two tables (copy=None,
#: copy=True) from an exact type to its backend's express function (Backend.express), or
#: None where there is none. Only calls without device= (and default ragged/pinned) take
#: them; a tensor the function declines (None) goes down the ordinary path. Casts
#: (``dtype=`` a string) have their own tables, by (``to``, copy, dtype).
_EXPRESS: dict[str, tuple[dict[type, Any], dict[type, Any]]] = {}
_EXPRESS_CAST: dict[tuple[str, bool | None, str], dict[type, Any]] = {}
_UNSEEN = object()

# The lookup and the call (with its try: a failure other than ours sends the tensor down the
# ordinary path, which words the error) are written out in each entry point (convert,
# to_numpy, to_torch, to_mlx, _leaf_fn) instead of a shared helper: one more Python call
# costs about 0.05 µs, a tenth of torch.from_numpy, which these routes are measured against.


class _NotByKind(Exception):  # noqa: N818 - a signal to the express callers, never seen
    """Raised by an express route's ``learn`` for a tensor whose route holds for it
    alone (Plan.by_kind): the caller takes the ordinary path, and the table stays as it
    was."""


def _cast_table(to: str, copy: bool | None, dtype: str) -> dict[type, Any]:
    """The express table for a cast to ``dtype`` (``to`` is a known spelling)."""
    key = (to, copy, dtype)
    table = _EXPRESS_CAST.get(key)
    if table is None:
        if len(_EXPRESS_CAST) >= 256:
            _EXPRESS_CAST.clear()
        table = _EXPRESS_CAST[key] = {}
    return table


#: Routes from an immutable framework into torch on the host: the planner's route is
#: the source's own copy to NumPy (its route with copy=True), then NumPy's route to torch
#: for that fresh, writable array (plan._host_route).
_IMMUTABLE = frozenset(("tensorflow", "jax", "mlx"))
_BOUNCED = frozenset(("torch",))


def _bounce(src: Backend, tp: type, target: str) -> Callable[[Any], Any] | None:
    """The express route ``tp`` -> NumPy -> ``target`` (copy=None), or None."""
    host = _learn_express({}, tp, "numpy", True)
    if host is None:
        return None
    into = _learn_express({}, np.ndarray, target, None)
    if into is None:
        return None

    def run(x: Any) -> Any:
        try:
            a = host(x)
            return None if a is None or type(a) is not np.ndarray else into(a)
        except TensorBridgeError:
            # a refusal of either half speaks of the wrong route (NumPy's object arrays
            # for a TF string tensor): the ordinary path plans ``x`` and words it
            return None

    return run


def _learn_express(
    table: dict[type, Any], tp: type, target: str, copy: bool | None, dtype: str | None = None
) -> Any:
    """The express function of ``tp`` for ``target`` (or None), kept in ``table``."""
    src = _BY_TYPE[tp] if tp in _BY_TYPE else backend_of(tp)
    fn = None
    if src is not None:

        def learn(x: Any) -> Callable[[Any], Any]:
            plan = cached_plan(x, src, target, None, dtype, copy)
            if not plan.by_kind:  # a route for this tensor only: not one for its kind
                raise _NotByKind
            return plan.fn

        fn = src.express(tp, target, learn)
        if (
            fn is None
            and copy is None
            and dtype is None
            and target in _BOUNCED
            and src.name in _IMMUTABLE
        ):
            fn = _bounce(src, tp, target)
    if len(table) >= 256:
        table.clear()
    table[tp] = fn
    return fn


def _refuse_instance_protocol(x: Any) -> Any:
    """``x`` itself, or, when ``x`` speaks an array protocol on the instance (as NumPy
    finds ``__array_interface__``/``__array__`` there), a stand-in whose type speaks it;
    an incomplete protocol set on the instance is refused with a fix. See
    :func:`~tensorbridge.frameworks.protocol.stand_in`."""
    y = stand_in(x)
    return x if y is None else y


_TARGETS = {**{n: n for n in TARGETS}, **ALIASES}
_EXPRESS.update({to: ({}, {}) for to in TARGETS})
_EXPRESS.update({alias: _EXPRESS[to] for alias, to in ALIASES.items()})  # shared tables
#: every ``to=`` spelling -> its copy=None table: the commonest call, looked up at once
_X_PLAIN = {to: tables[0] for to, tables in _EXPRESS.items()}
_X_NUMPY_PLAIN = _X_PLAIN["numpy"]
_X_TORCH_PLAIN = _X_PLAIN["torch"]
_X_MLX = _X_PLAIN["mlx"]
_X_NUMPY_COPY = _EXPRESS["numpy"][1]  # copy=True without dtype=: a Python call less
_X_TORCH_COPY = _EXPRESS["torch"][1]
#: (to, type, express function, its dtype memo or None) of convert's last plain call (no
#: options) that found one: a call like the one before (a loop) skips both table lookups,
#: about a tenth of a 0.45 µs route. Replaced whole (one tuple), so threads never see a
#: mixed entry; an express function stays right for its type, whatever happens to the
#: tables after. The memo is NumPy's (frameworks/numpy.py): [(dtype, route)] of the last
#: writable array its express route took.
_LAST: tuple[Any, Any, Any, Any] = (None, None, None, None)


#: to_numpy's (copy, dtype, express table) of its last call with options: the same options
#: (a loop) skip the table's lookup by key; replaced whole. (A dtype given as an equal
#: object of another identity looks its table up.)
_TO_NUMPY_OPTIONS: tuple[Any, Any, Any] = (None, None, None)
#: to_torch's (type, express function, its dtype memo or None) of its last plain call, as
#: convert's _LAST
_TO_TORCH_LAST: tuple[Any, Any, Any] = (None, None, None)


def forget_express() -> None:
    """Forget every express route learnt (the tables and convert's last call): for tests
    that change what the frameworks report, so that routes are learnt afresh."""
    global _LAST, _TO_TORCH_LAST, _TO_NUMPY_OPTIONS
    _LAST = (None, None, None, None)
    _TO_TORCH_LAST = (None, None, None)
    _TO_NUMPY_OPTIONS = (None, None, None)
    for tables in _EXPRESS.values():
        for table in tables:
            table.clear()
    _EXPRESS_CAST.clear()


def _express_table(to: str, copy: Any, dtype: Any) -> dict[type, Any] | None:
    """The express table for these options, or None (options express routes do not take,
    or an unknown ``to``: the ordinary path deals with those)."""
    tables = _EXPRESS.get(to)
    if tables is None or not (copy is None or copy is True):
        return None
    if dtype is None:
        return tables[copy is True]
    return _cast_table(to, copy, dtype) if type(dtype) is str else None


def _target(to: str) -> str:
    name = _TARGETS.get(to) if type(to) is str else None
    if name is not None:
        return name
    name = ALIASES.get(to, to) if isinstance(to, str) else None
    if name not in TARGETS:
        raise ConversionError(
            message(
                f"to={to!r}",
                "it is not a framework tensorbridge knows",
                "use one of " + ", ".join(TARGETS),
            )
        )
    return name


def _run(
    x: Any, src: Backend, target: str, device: str | None, dtype: str | None, copy: bool | None
) -> Any:
    """Convert one tensor with the plan of its kind (plan.cached_plan, looked up inline:
    this is every single-tensor call's path)."""
    plan = None
    kind = src.kind(x, target)
    if (
        kind is not None
        and (dtype is None or type(dtype) is str)
        and (device is None or type(device) is str)
    ):
        key: tuple = (kind, target, device, dtype, copy)
        if target == "jax" or src.name == "jax":
            key = plan_key_x64(key)
        plan = _PLANS.get(key)
    if plan is None:
        plan = cached_plan(x, src, target, device, dtype, copy)
    try:
        return (plan._fn or plan.fn)(x)
    except TensorBridgeError:
        raise
    except Exception as exc:
        return _step_failed(x, src, target, device, dtype, copy, exc)


def _step_failed(
    x: Any, src: Backend, target: str, device: Any, dtype: Any, copy: bool | None, exc: Exception
) -> Any:
    """A framework refused a step of the cached plan of ``x``'s kind. A fresh plan of
    ``x`` either is one for ``x`` alone (it reads a fact no kind reads: Plan.by_kind),
    whose result is returned, or words the error: which step failed (a cached plan
    describes the first tensor of its kind), or the planner's own refusal where ``x``
    should never have reached the step."""
    plan = plan_leaf(x, src, target, device=device, dtype=dtype, copy=copy)
    if not plan.by_kind:
        try:
            return plan.run(x)
        except TensorBridgeError:
            raise
        except Exception as again:  # noqa: BLE001 - worded below
            exc = again
    raise ConversionError(
        message(
            plan.source,
            f"{type(exc).__name__}: {exc}",
            f"check the route with tb.explain(x, to={target!r}); pass dtype= or device= to change it",
        )
    ) from exc


def _scalar_input(x: Any, target: str, dtype: str | None) -> Any:
    """A Python scalar given on its own, as the tensor it becomes (for convert and explain
    alike): what JAX makes of it for JAX without dtype=, else a 0-d NumPy array."""
    return _jax_scalar(x) if target == "jax" and dtype is None else _scalar_array(x)


def _jax_scalar(x: Any) -> Any:
    """A Python scalar as JAX makes it (``jnp.asarray``): without 64-bit types, a float
    becomes float32 and an int int32, as every JAX user expects of a literal."""
    jax = get_backend("jax").load()
    try:
        return jax.numpy.asarray(x)
    except OverflowError as exc:
        raise ConversionError(
            message(
                f"the Python int {x} for JAX",
                f"it does not fit in JAX's default integers ({exc})",
                "call jax.config.update('jax_enable_x64', True) first, or pass dtype='float32'",
            )
        ) from exc


def _scalar_array(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object:
        raise ConversionError(
            message(
                f"the Python int {x}",
                "it does not fit in 64 bits, so no tensor dtype holds it",
                "store it as a float (float(x)), or split it into several 64-bit integers",
            )
        )
    return a


def _leaf_fn(
    target: str,
    device: str | None,
    dtype: str | None,
    copy: bool | None,
    ragged: str,
    done: dict[int, Any],
) -> Callable[[Any], Any]:
    """The function applied to every leaf: its plan, cached per kind of tensor, run.
    ``done`` maps id(leaf) to results already computed in a batch (CUDA staging).
    Within one call the options are fixed, so the plans met are also kept by kind alone."""
    by_type = _BY_TYPE
    local: dict[tuple, Any] = {}  # kind -> the function of its cached plan, for this call
    express = _express_table(target, copy, dtype) if device is None and ragged == "error" else None

    memo: Any = None  # NumPy's dtype memo (frameworks/numpy.py, run.memo) once met
    ndarray = np.ndarray

    def leaf(x: Any) -> Any:
        nonlocal memo
        tp = type(x)
        if tp is ndarray and memo is not None and not done:  # (memo: express is set)
            # NumPy's express route written out for its last dtype, as in convert()
            seen = memo[0]
            if x.dtype is seen[0]:
                flags = x.flags
                if flags.writeable and (flags.owndata or not flipped(x.strides)):
                    try:
                        return seen[1](x)
                    except TensorBridgeError:
                        raise
                    except Exception:
                        pass  # the express function below declines it or words it
        if express is not None and not done:
            e = express.get(tp, _UNSEEN)
            if e is _UNSEEN:
                e = _learn_express(express, tp, target, copy, dtype)
            if e is not None:
                if memo is None and tp is np.ndarray:
                    memo = getattr(e, "memo", None)
                try:
                    y = e(x)
                except TensorBridgeError:
                    raise
                except Exception:
                    y = None  # the ordinary path runs the same plan and words the error
                if y is not None:
                    return y
        src = by_type[tp] if tp in by_type else backend_of(tp)
        if src is None:
            y = _refuse_instance_protocol(x)
            return x if y is x else leaf(y)
        if done and id(x) in done:
            return done[id(x)]
        if (
            ragged == "list"
            and tp.__name__ == "RaggedTensor"
            and src.name == "tensorflow"
            and target != "tensorflow"
        ):
            return x.to_list()
        kind = src.kind(x, target)
        fn = local.get(kind) if kind is not None else None
        if fn is None:
            plan = cached_plan(x, src, target, device, dtype, copy)
            fn = plan._fn or plan.fn
            if kind is not None and plan.by_kind:
                local[kind] = fn
        try:
            return fn(x)
        except TensorBridgeError:
            raise
        except Exception as exc:
            return _step_failed(x, src, target, device, dtype, copy, exc)

    return leaf


def _device_leaves_possible() -> bool:
    """True when a CUDA tensor or array may exist in this process (torch's CUDA started,
    JAX's CUDA backend running, CuPy imported). Asks without starting anything, so
    that on a host-only process no GPU machinery runs at all."""
    modules = sys.modules
    if "cupy" in modules:
        return True
    torch = modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return True
    return "jax" in modules and foreign_cuda.jax_cuda_running()


def convert(x: Any, /, to: str, **options: Any) -> Any:
    """Convert a tensor, or every tensor in a nested structure, to framework ``to``.

    ``to`` is one of ``"numpy"``, ``"torch"``, ``"tensorflow"`` (``"tf"``),
    ``"jax"``, ``"cupy"``, ``"mlx"``. ``copy=None`` shares memory where that is safe and
    possible, ``copy=True`` always returns independent memory, ``copy=False``
    never copies and raises :class:`~tensorbridge.CopyError` instead.
    ``dtype=`` casts (canonical names such as ``"bfloat16"``); ``device=``
    places the result (``"cpu"``, ``"cuda:0"``). Containers keep their types;
    leaves that are not tensors are returned as they are. A Python scalar given
    on its own becomes a 0-d tensor. ``ragged="list"`` turns TF ragged tensors
    into nested lists instead of refusing them. A value already in framework
    ``to`` is returned as it is, whatever it holds (TF strings, ragged and
    sparse tensors, torch meta, quantized, nested or int4 tensors, NumPy
    records, strings and datetimes), unless ``dtype=`` or ``device=`` ask for a
    change; ``copy=True`` returns the framework's own copy of it.

    A cast runs where the data is at that step of the route (``explain`` says
    where): on the host with NumPy/ml_dtypes, or in the source or target
    framework. Every value the new dtype can hold comes out the same whichever
    runs it. Values it cannot hold follow the framework that casts: float8
    out of range (NaN with ml_dtypes, saturation with torch), and subnormals
    in TensorFlow, whose CPU kernels flush them to zero. A complex to real cast
    keeps the real parts; whether it warns follows the library that runs it
    (``explain`` says which): NumPy warns (``ComplexWarning``) for its own
    dtypes and not for ml_dtypes' bfloat16 and float8, torch and JAX warn in
    their own ways, TensorFlow does not.

    ``pinned=True`` (``to="numpy"`` only) returns the arrays copied from CUDA
    tensors in page-locked (pinned) host memory, from torch's caching host
    allocator: the fastest way off the GPU, and such arrays go back to a GPU
    fastest too. Small arrays of one call may share one pinned buffer (views
    of it); the memory returns to torch's cache once every array using it is
    gone. Keep the arrays alive until any ``non_blocking=True`` copy from them
    to a GPU (e.g. ``torch.from_numpy(a).to("cuda", non_blocking=True)``) has
    been synchronised: torch cannot record streams on ``from_numpy`` views, so
    it may hand the memory out again while such a copy is still reading it.
    torch's pinned cache rounds each buffer up to a power of two and keeps the
    memory page-locked (the OS cannot page it out) after the arrays go, for
    reuse by later pinned allocations. If page-locking is refused, those
    arrays come back in ordinary memory. Without CUDA tensors in ``x``, or
    with ``dtype=``, it changes nothing.

    A tree of CUDA tensors goes to NumPy in one coalesced transfer through a
    pinned staging ring; a tree of host arrays goes to ``device="cuda"`` the
    same way (one fresh tensor per leaf).

    >>> import numpy as np, tensorbridge as tb
    >>> tb.convert(np.ones(2, np.float32), to="numpy", copy=True)
    array([1., 1.], dtype=float32)
    """
    # The options are taken as **options (the signature above is convert's: see
    # __signature__ below, and _api.pyi for type checkers): binding five keyword-only
    # defaults costs more than an empty dict, and "no options" is then one test. This
    # is the call in a hot loop, measured against torch.from_numpy (0.48 µs).
    if not options:
        global _LAST
        last_to, last_type, e, memo = _LAST
        if last_type is type(x) and last_to is to:
            # the same kind of call as the last one: e is its express function
            if memo is not None:
                # NumPy's express route (frameworks/numpy.py, run) written out for the
                # dtype it saw last: the same checks, one Python call less
                dt, fn = memo[0]
                if x.dtype is dt:
                    flags = x.flags
                    if flags.writeable:
                        if not flags.owndata:  # a view: flipped() written out for 2 dims
                            s = x.strides
                            if (s[0] < 0 or s[1] < 0) if len(s) == 2 else flipped(s):
                                return _planned(x, to, None, None, None, "error", False)
                        try:
                            return fn(x)
                        except TensorBridgeError:
                            raise
                        except Exception:  # the ordinary path runs the same plan and words it
                            return _planned(x, to, None, None, None, "error", False)
        elif type(to) is str:
            table = _X_PLAIN.get(to)
            e = None
            if table is not None:
                e = table.get(type(x), _UNSEEN)
                if e is _UNSEEN:
                    e = _learn_express(table, type(x), _TARGETS[to], None)
                if e is not None:
                    _LAST = (to, type(x), e, getattr(e, "memo", None))
        else:
            e = None
        if e is not None:
            try:
                y = e(x)
            except TensorBridgeError:
                raise
            except Exception:
                y = None  # the ordinary path runs the same plan and words the error
            if y is not None:
                return y
        return _planned(x, to, None, None, None, "error", False)
    if not options.keys() <= _OPTIONS:
        if "x" in options:  # (as Python words it for a positional-only parameter)
            raise TypeError(
                "convert() got some positional-only arguments passed as keyword arguments: 'x'"
            )
        bad = next(k for k in options if k not in _OPTIONS)
        raise TypeError(f"convert() got an unexpected keyword argument {bad!r}")
    return _convert(x, to, **options)


def _convert(
    x: Any,
    /,
    to: str,
    *,
    device: Any = None,
    dtype: Any = None,
    copy: bool | None = None,
    ragged: str = "error",
    pinned: bool = False,
) -> Any:
    """:func:`convert` with its options: their express routes, then the planned path."""
    if device is None and not pinned and ragged == "error" and type(to) is str:
        table = (
            _X_PLAIN.get(to) if copy is None and dtype is None else _express_table(to, copy, dtype)
        )
        if table is not None:
            e = table.get(type(x), _UNSEEN)
            if e is _UNSEEN:
                e = _learn_express(table, type(x), _TARGETS[to], copy, dtype)
            if e is not None:
                try:
                    y = e(x)
                except TensorBridgeError:
                    raise
                except Exception:
                    y = None  # the ordinary path runs the same plan and words the error
                if y is not None:
                    return y
    return _planned(x, to, device, dtype, copy, ragged, pinned)


_OPTIONS = frozenset(("device", "dtype", "copy", "ragged", "pinned"))
convert.__signature__ = inspect.signature(_convert)  # type: ignore[attr-defined]


def _planned(x: Any, to: Any, device: Any, dtype: Any, copy: Any, ragged: str, pinned: bool) -> Any:
    """:func:`convert` past its express routes: checks the options, plans and runs."""
    target = _TARGETS.get(to) if type(to) is str else None
    if target is None:
        target = _target(to)
    if ragged != "error" and ragged != "list":
        raise ConversionError(
            message(
                f"ragged={ragged!r}",
                "it is not an option",
                "use ragged='error' (default) or ragged='list'",
            )
        )
    if pinned and target != "numpy":
        raise ConversionError(
            message(
                f"pinned=True with to={to!r}",
                "pinned host memory is an option for NumPy results only",
                "leave pinned unset, or convert with to='numpy'",
            )
        )
    if copy is not None and copy is not True and copy is not False:
        raise ConversionError(
            message(
                f"copy={copy!r}",
                "copy takes None, True or False only",
                "pass copy=None (share where safe), True or False",
            )
        )
    if device is not None:
        device = parse_device(device)
    tp = type(x)
    if tp in _SCALARS:
        x = _scalar_input(x, target, dtype)
        tp = type(x)
    src = _BY_TYPE[tp] if tp in _BY_TYPE else backend_of(tp)
    if target == "numpy":
        # one host tensor: its cached plan, and no GPU machinery at all
        if (
            src is not None
            and src.unstaged(x)
            and not (ragged == "list" and tp.__name__ == "RaggedTensor")
        ):
            return _run(x, src, target, device, dtype, copy)
        if not _device_leaves_possible():
            if src is not None and not (ragged == "list" and tp.__name__ == "RaggedTensor"):
                return _run(x, src, target, device, dtype, copy)
            return tree_map(_leaf_fn(target, device, dtype, copy, ragged, {}), x)
    elif not (
        device is not None
        and target == "torch"
        and copy is not False
        and dtype is None
        and isinstance(device, str)
        and device.startswith("cuda")
    ):
        if src is not None and not (ragged == "list" and tp.__name__ == "RaggedTensor"):
            return _run(x, src, target, device, dtype, copy)
        return tree_map(_leaf_fn(target, device, dtype, copy, ragged, {}), x)
    done: dict[int, Any] = {}
    if target == "numpy":
        from .frameworks.torch import gather_device_leaves

        done = gather_device_leaves(
            x, copy=copy, dtype=dtype, pinned=pinned
        )  # CUDA leaves, coalesced
    else:
        from .frameworks.torch_staging import scatter_host_leaves

        get_backend("torch").load()
        done = scatter_host_leaves(
            x, device
        )  # host leaves through the pinned ring; {} without CUDA
    return tree_map(_leaf_fn(target, device, dtype, copy, ragged, done), x)


def to_numpy(
    x: Any,
    /,
    *,
    copy: bool | None = None,
    dtype: Any = None,
    ragged: str = "error",
    pinned: bool = False,
) -> Any:
    """Convert to NumPy arrays (bfloat16/float8 as ``ml_dtypes`` dtypes).

    Zero-copy where the memory can be shared. Arrays that view memory of an
    immutable framework (JAX, TensorFlow) are read-only; pass ``copy=True``
    for writable, independent arrays. CUDA tensors, alone or in a tree, come
    to fresh host memory in one coalesced transfer; ``pinned=True`` returns
    them in page-locked memory instead (faster; see :func:`convert`).

    >>> import tensorbridge as tb
    >>> tb.to_numpy(1.5)
    array(1.5)
    """
    if not pinned and ragged == "error":
        if copy is None and dtype is None:
            e = _X_NUMPY_PLAIN.get(type(x), _UNSEEN)
            if e is _UNSEEN:
                e = _learn_express(_X_NUMPY_PLAIN, type(x), "numpy", None)
        else:
            global _TO_NUMPY_OPTIONS
            last_copy, last_dtype, table = _TO_NUMPY_OPTIONS
            if last_dtype is not dtype or last_copy is not copy:
                table = (
                    _X_NUMPY_COPY
                    if copy is True and dtype is None
                    else _express_table("numpy", copy, dtype)
                )
                _TO_NUMPY_OPTIONS = (copy, dtype, table)
            e = table.get(type(x), _UNSEEN) if table is not None else None
            if e is _UNSEEN:
                e = _learn_express(table, type(x), "numpy", copy, dtype)
        if e is not None:
            try:
                y = e(x)
            except TensorBridgeError:
                raise
            except Exception:
                y = None  # the ordinary path runs the same plan and words the error
            if y is not None:
                return y
    src = _BY_TYPE.get(type(x))
    if (
        src is not None
        and not pinned
        and ragged == "error"
        and (copy is None or copy is True or copy is False)
        and src.unstaged(x)
    ):
        return _run(x, src, "numpy", None, dtype, copy)  # what convert() does for one host tensor
    return _convert(x, to="numpy", copy=copy, dtype=dtype, ragged=ragged, pinned=pinned)


def to_torch(x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None) -> Any:
    """Convert to ``torch.Tensor``; see :func:`convert`.

    >>> import numpy as np, tensorbridge as tb
    >>> tb.to_torch(np.arange(3)[::-1]).tolist()   # negative strides are fine
    [2, 1, 0]
    """
    if device is None:
        if copy is None and dtype is None:
            global _TO_TORCH_LAST
            last_type, e, memo = _TO_TORCH_LAST
            if last_type is not type(x):
                e = _X_TORCH_PLAIN.get(type(x), _UNSEEN)
                if e is _UNSEEN:
                    e = _learn_express(_X_TORCH_PLAIN, type(x), "torch", None)
                memo = getattr(e, "memo", None)
                if e is not None:
                    _TO_TORCH_LAST = (type(x), e, memo)
            if memo is not None:
                # NumPy's express route written out for its last dtype, as in convert()
                dt, fn = memo[0]
                if x.dtype is dt:
                    flags = x.flags
                    if flags.writeable:
                        if not flags.owndata:  # a view: flipped() written out for 2 dims
                            s = x.strides
                            if (s[0] < 0 or s[1] < 0) if len(s) == 2 else flipped(s):
                                return _planned(x, "torch", None, None, None, "error", False)
                        try:
                            return fn(x)
                        except TensorBridgeError:
                            raise
                        except Exception:  # the ordinary path runs the same plan and words it
                            return _planned(x, "torch", None, None, None, "error", False)
        else:
            table = (
                _X_TORCH_COPY
                if copy is True and dtype is None
                else _express_table("torch", copy, dtype)
            )
            e = table.get(type(x), _UNSEEN) if table is not None else None
            if e is _UNSEEN:
                e = _learn_express(table, type(x), "torch", copy, dtype)  # type: ignore[arg-type]
        if e is not None:
            try:
                y = e(x)
            except TensorBridgeError:
                raise
            except Exception:
                y = None  # the ordinary path runs the same plan and words the error
            if y is not None:
                return y
    src = _BY_TYPE.get(type(x))
    if src is not None and device is None and (copy is None or copy is True or copy is False):
        return _run(x, src, "torch", None, dtype, copy)  # what convert() does for one tensor
    return _convert(x, to="torch", device=device, dtype=dtype, copy=copy)


def to_tensorflow(
    x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Any:
    """Convert to TensorFlow tensors; see :func:`convert`."""
    return _convert(x, to="tensorflow", device=device, dtype=dtype, copy=copy)


to_tf = to_tensorflow


def to_jax(x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None) -> Any:
    """Convert to ``jax.Array``; see :func:`convert`."""
    return _convert(x, to="jax", device=device, dtype=dtype, copy=copy)


def to_mlx(x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None) -> Any:
    """Convert to ``mlx.core.array``; see :func:`convert`. MLX copies every host
    import, so ``copy=False`` is refused for anything that is not already MLX.

    >>> import numpy as np, tensorbridge as tb
    >>> tb.to_mlx(np.arange(3.0)).dtype   # float64 stays float64 (mx.array would narrow it)
    mlx.core.float64
    """
    if copy is None and dtype is None and device is None:
        e = _X_MLX.get(type(x), _UNSEEN)
        if e is _UNSEEN:
            e = _learn_express(_X_MLX, type(x), "mlx", None)
        if e is not None:
            try:
                y = e(x)
            except TensorBridgeError:
                raise
            except Exception:
                y = None  # the ordinary path runs the same plan and words the error
            if y is not None:
                return y
    return _convert(x, to="mlx", device=device, dtype=dtype, copy=copy)


def to_cupy(x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None) -> Any:
    """Convert to ``cupy.ndarray`` (CUDA only); see :func:`convert`."""
    return _convert(x, to="cupy", device=device, dtype=dtype, copy=copy)


class TreePlan(list[Any]):
    """The plans for every tensor in a tree: a list of ``(path, Plan)``."""

    @property
    def copies(self) -> bool:
        """True when converting any tensor of the tree copies memory."""
        return any(plan.copies for _, plan in self)

    @property
    def independent(self) -> bool:
        """True when every converted tensor is memory of its own."""
        return all(plan.independent for _, plan in self)

    def __str__(self) -> str:
        if not self:
            return "(no tensors in the input)"
        return "\n".join(f"{format_path(p) or '(root)'}: {plan}" for p, plan in self)


def explain(
    x: Any, /, to: str, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Plan | TreePlan:
    """Say how ``x`` would be converted, without converting it.

    For a single tensor, returns a :class:`~tensorbridge.plan.Plan`; print it
    to see each step, whether it copies, and why. For a tree, a
    :class:`TreePlan` with one plan per tensor.

    >>> import numpy as np, tensorbridge as tb
    >>> print(tb.explain(np.zeros(3, ">f4"), to="torch"))
    numpy ndarray float32[3] on cpu -> torch
      1. byte-swap to native order [copy] (torch only holds native byte order)
      2. torch.from_numpy [zero-copy]
      result: independent memory (copied)
    """
    target = _target(to)
    if device is not None:
        device = parse_device(device)
    if type(x) in _SCALARS:
        scalar = x
        x = _scalar_input(x, target, dtype)
        made = backend_of(type(x))
        assert made is not None  # a NumPy or JAX array
        plan = plan_leaf(x, made, target, device=device, dtype=dtype, copy=copy)
        # the value is copied into a new tensor: nothing is shared with the caller's scalar
        return Plan(
            f"Python {type(scalar).__name__} {scalar!r} as {plan.source}",
            plan.target,
            [
                Step(
                    "Python scalar -> new 0-d tensor",
                    True,
                    _same,
                    "a Python number has no memory to share",
                )
            ]
            + plan.steps,
        )
    src = backend_of(type(x))
    if src is not None:
        return plan_leaf(x, src, target, device=device, dtype=dtype, copy=copy)
    plans = TreePlan()
    for path, leaf in tree_leaves_with_path(x):
        b = backend_of(type(leaf))
        if b is None:  # an array protocol on the instance
            try:
                leaf = _refuse_instance_protocol(leaf)
            except TensorBridgeError as exc:
                raise exc.at(format_path(path)) from exc.__cause__
            b = backend_of(type(leaf))
        if b is not None:
            try:
                plans.append(
                    (path, plan_leaf(leaf, b, target, device=device, dtype=dtype, copy=copy))
                )
            except TensorBridgeError as exc:
                raise exc.at(format_path(path)) from exc.__cause__
    return plans


def shares_memory(a: Any, b: Any, /) -> bool:
    """True when ``a`` and ``b`` (from any frameworks) share memory.

    Exact for host memory (NumPy's ``shares_memory`` on zero-copy views);
    for device memory, True when the two buffers overlap on the same device.

    >>> import numpy as np, tensorbridge as tb
    >>> a = np.zeros(4)
    >>> tb.shares_memory(a, a[2:]), tb.shares_memory(a, a.copy())
    (True, False)
    """
    a, b = _speaking(a), _speaking(b)
    ba, bb = backend_of(type(a)), backend_of(type(b))
    if ba is None or bb is None:
        return False
    va, vb = _quietly(ba.host_view, a), _quietly(bb.host_view, b)
    if va is not None and vb is not None:
        return bool(np.shares_memory(va, vb))
    sa, sb = _quietly(ba.device_span, a), _quietly(bb.device_span, b)
    if sa is None or sb is None:
        return False
    return normalize_device(sa[0]) == normalize_device(sb[0]) and sa[1] < sb[2] and sb[1] < sa[2]


def _speaking(x: Any) -> Any:
    """``x``, or the stand-in of an object that speaks an array protocol on the instance
    (its memory is compared like any other); an object that speaks none stays itself."""
    if backend_of(type(x)) is not None:
        return x
    try:
        y = stand_in(x)
    except TensorBridgeError:
        return x  # a half-set protocol: no memory to compare
    return x if y is None else y


def _same(x: Any) -> Any:
    return x  # convert() makes the 0-d tensor before it runs a plan


def _quietly(fn: Any, x: Any) -> Any:
    """``fn(x)``, or None where the framework cannot locate the memory (a deleted or donated
    JAX array, a tracer, a handle): memory that does not exist is shared with nothing."""
    try:
        return fn(x)
    except Exception:  # noqa: BLE001 - any framework's refusal means: no memory to compare
        return None
