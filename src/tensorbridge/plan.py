"""Plan a route for one tensor, before moving any data.

A route is a list of :class:`~tensorbridge.frameworks.base.Step`. It goes
hub and spoke: DLPack from source to target when both sides can share the
memory as it is, else through a host NumPy array. ``copy=`` is enforced on the
whole route: ``False`` refuses a route with any copying step, ``True`` adds a
copy when none of the steps makes one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .dtypes import lookup
from .errors import ConversionError, CopyError, TensorBridgeError, message
from .frameworks import get_backend
from .frameworks.base import Backend, Facts, Step, normalize_device, parse_device
from .frameworks.numpy import refuse_masked

__all__ = ["Plan", "plan_leaf", "cached_plan"]

#: frameworks whose tensors can be written in place. Memory never moves between these and
#: the others (immutable: JAX, TensorFlow, MLX) in a way that lets a write on one side change a
#: value on the other, unless copy=False asks to share a mutable buffer (docs/guide.md).
_MUTABLE = {"numpy", "torch", "cupy"}


@dataclass
class Plan:
    """The route one value takes: where from, where to, and every step."""

    source: str  # a description of the input
    target: str  # framework name
    steps: list[Step]

    @property
    def copies(self) -> bool:
        return any(s.copies for s in self.steps)

    @property
    def independent(self) -> bool:
        """The result is memory of its own: the last copying step made fresh memory."""
        fresh = False
        for s in self.steps:
            if s.copies:
                fresh = s.fresh
        return fresh

    def run(self, x: Any) -> Any:
        for step in self.steps:
            x = step.run(x)
        return x

    _fn: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)
    #: False: the route depends on a fact no kind reads (strides of part of an item), so
    #: the plan holds for this tensor only and is never cached
    by_kind: bool = field(default=True, repr=False, compare=False)

    @property
    def fn(self) -> Callable[[Any], Any]:
        """The steps as one function (what a cached plan runs per call)."""
        fn = self._fn
        if fn is None:
            runs = [s.run for s in self.steps]
            if not runs:
                fn = _identity
            elif len(runs) == 1:
                fn = runs[0]
            elif len(runs) == 2:
                first, second = runs
                if first is _host_copy:  # (copy=True's commonest route: the copy inlined)
                    fn = lambda x: second(  # noqa: E731
                        x.copy("K") if type(x) is np.ndarray else _host_copy(x)
                    )
                else:
                    fn = lambda x: second(first(x))  # noqa: E731
            elif len(runs) == 3:
                first, second, third = runs
                fn = lambda x: third(second(first(x)))  # noqa: E731
            else:
                fn = self.run
            self._fn = fn
        return fn

    def __str__(self) -> str:
        lines = [f"{self.source} -> {self.target}"]
        if not self.steps:
            lines.append("  (nothing to do: the input is returned as it is)")
        for i, s in enumerate(self.steps, 1):
            lines.append(f"  {i}. {s.describe()}")
        if self.independent:
            result = "independent memory (copied)"
        elif self.copies:
            result = (
                "copied, into memory the source framework keeps and hands out again "
                "(read-only); copy=True makes it independent"
            )
        else:
            result = "shares memory with the input (zero-copy)"
        lines.append("  result: " + result)
        return "\n".join(lines)


def _identity(x: Any) -> Any:
    return x


def _after_host(facts: Facts, steps: list[Step]) -> Facts:
    """Facts of the host array that ``steps`` produce."""
    last = next((s for s in reversed(steps) if s.copies), None)
    if last is None:
        return replace(facts, device="cpu")
    # Copies keep the source's layout (torch's resolve_conj and .cpu() keep a transposed
    # tensor transposed), in fresh memory: writable only where it is ours alone.
    return Facts(
        facts.framework,
        facts.dtype,
        facts.shape,
        writable=last.fresh,
        contiguous=facts.contiguous,
        native_order=facts.native_order,
        nbytes=facts.nbytes,
    )


def _cast_facts(facts: Facts, dtype: str) -> Facts:
    nbytes = -1
    if facts.nbytes >= 0:
        n = 1
        for d in facts.shape:
            n *= d
        nbytes = n * lookup(dtype).itemsize
    return Facts(
        facts.framework, dtype, facts.shape, device=facts.device, nbytes=nbytes
    )  # C order (cast_steps)


def _host_copy(a: Any) -> Any:
    # positive strides, the source's axis order (ndarray.copy is the cheaper spelling, and
    # its order given by position cheaper than by keyword)
    return a.copy("K") if type(a) is np.ndarray else np.array(a, copy=True, order="K")


def _to_native(a: Any) -> Any:
    return a.astype(a.dtype.newbyteorder("="), order="C")


def _describe(src: Backend, facts: Facts, x: Any) -> str:
    return f"{src.name} {type(x).__name__} {facts.dtype}{list(facts.shape)} on {facts.device}"


#: targets whose import from the host reads Facts.whole_items (no kind reads it)
_WHOLE_ITEMS = frozenset(("torch", "mlx"))


def plan_leaf(
    x: Any,
    src: Backend,
    target: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    copy: bool | None = None,
) -> Plan:
    """The :class:`Plan` that converts one tensor ``x`` of framework ``src``."""
    tgt = get_backend(target)
    if device is not None:
        device = parse_device(device)
    if target != "numpy" and src.name == "numpy":
        refuse_masked(x, f"a NumPy masked array for {target}", f"{target} tensors have no mask")
    same = src is tgt and dtype is None and device is None
    try:
        facts = src.facts(x)
    except TensorBridgeError:
        if same:  # strings, ragged, meta, quantized, int4...: other frameworks cannot hold them,
            return _as_it_is(x, src, copy)  # but it is already where it was asked to go
        raise
    except Exception as exc:  # the framework itself could not describe the object
        if same:
            return _as_it_is(x, src, copy)
        raise ConversionError(
            message(
                f"a {src.name} {type(x).__name__}",
                f"{src.name} could not say what it holds ({type(exc).__name__}: {exc})",
                "convert a live tensor with ordinary memory; tensors that are deleted, donated, "
                "nested or handles have no data of their own to convert",
            )
        ) from exc
    if dtype is not None:
        dtype = lookup(dtype).name
        if dtype == facts.dtype:
            dtype = None
    if facts.dtype == "string" and same:
        return _as_it_is(x, src, copy)
    if facts.dtype == "string":
        steps = _string_route(x, src, facts, tgt, dtype)
    elif src is tgt:
        first = src.to_host_steps(x, facts) if src.name == "numpy" else []  # scalars -> 0-d
        steps = first + _same_framework(src, facts, device, dtype)
    else:
        dlpack = _dlpack_route(src, facts, tgt, device, dtype, copy)
        steps = (
            dlpack if dlpack is not None else _host_route(x, src, facts, tgt, device, dtype, copy)
        )
    plan = Plan(_describe(src, facts, x), tgt.name, steps)
    plan.by_kind = facts.whole_items or tgt.name not in _WHOLE_ITEMS
    if copy is False and plan.copies:
        reasons = "; ".join(f"{s.text} ({s.why})" if s.why else s.text for s in steps if s.copies)
        raise CopyError(
            message(
                f"copy=False for {plan.source} -> {tgt.name}",
                f"the memory cannot be shared: {reasons}",
                "pass copy=None to allow a copy where it is needed, or copy=True for an independent result",
            )
        )
    if copy is True and not plan.independent:
        own = (
            src.fresh_host_step(facts)
            if (tgt.name == "numpy" and dtype is None and steps and not plan.copies)
            else None
        )
        if own is not None:  # the framework's own copy instead of its view, then a second copy
            plan.steps[-1] = replace(
                own, text=f"{own.text} (copy=True)", why="an independent result was asked for"
            )
        else:
            plan.steps.append(
                Step("copy (copy=True)", True, tgt.clone, "an independent result was asked for")
            )
    return plan


def _as_it_is(x: Any, src: Backend, copy: bool | None) -> Plan:
    """Already in the target framework, whatever it holds: returned as it is (a 0-d array
    for a NumPy scalar), or the framework's own copy with copy=True."""
    from .frameworks import describe

    steps = (
        []
        if src.name != "numpy" or isinstance(x, np.ndarray)
        else [Step("numpy scalar -> 0-d array", False, np.asarray)]
    )
    if copy is True:
        steps.append(
            Step("copy (copy=True)", True, src.clone, "an independent result was asked for")
        )
    return Plan(describe(x), src.name, steps)


def _same_framework(b: Backend, facts: Facts, device: str | None, dtype: str | None) -> list[Step]:
    steps: list[Step] = []
    if dtype is not None:
        steps += b.cast_steps(facts, dtype)
    if device is not None and normalize_device(device) != facts.device:
        steps += b.to_device_steps(facts, device)
    return steps


def _unshared(src: Backend, facts: Facts, tgt: Backend, copy: bool | None) -> Step | None:
    """The copy that keeps a hand-over from making immutable data writable (always), or
    from letting later writes to mutable data change an immutable result (unless copy=False)."""
    if not facts.writable and tgt.name in _MUTABLE:
        return Step(
            f"copy into new {tgt.name} memory",
            True,
            tgt.clone,
            f"{tgt.name} tensors are writable, and the memory belongs to an immutable "
            f"{src.name} array: a write through the result would change it",
        )
    if facts.writable and tgt.name not in _MUTABLE and copy is not False:
        return Step(
            f"copy into new {tgt.name} memory",
            True,
            tgt.clone,
            f"a later write to the {src.name} tensor would change the immutable {tgt.name} "
            "array; copy=False shares instead",
        )
    return None


def _dlpack_route(
    src: Backend,
    facts: Facts,
    tgt: Backend,
    device: str | None,
    dtype: str | None,
    copy: bool | None,
) -> list[Step] | None:
    """Zero-copy hand-over between two frameworks, or None when it cannot be (or when
    copying a small tensor through the host costs less than the target's handshake)."""
    if src.name == "numpy" or tgt.name == "numpy" or not facts.dlpack:
        return None
    if copy is not False and tgt.copy_small and facts.small and facts.device_type == "cpu":
        return None
    if device is not None and normalize_device(device) != facts.device:
        return None  # a device move is a copy anyway; the host route is as good
    prepare = src.prepare_steps(facts)
    if any(s.copies for s in prepare):
        return None
    try:
        if tgt.dlpack_import(facts) is not None:
            return None
    except ConversionError:
        if dtype is None:
            raise
        return None  # the target cannot hold the source dtype: cast on the host first
    why = ""
    if facts.writable and tgt.name not in _MUTABLE:
        why = f"shares the {src.name} memory: do not write to the source while {tgt.name} uses it"
    steps = prepare + [
        Step(
            f"DLPack hand-over {src.name} -> {tgt.name} on {facts.device}",
            False,
            lambda t: tgt.from_dlpack(src.to_dlpack_source(t)),
            why,
        )
    ]
    if dtype is not None:
        steps += tgt.cast_steps(facts, dtype)  # new memory: nothing is shared after it
    else:
        guard = _unshared(src, facts, tgt, copy)
        if guard is not None:
            if facts.device_type == "cpu":
                return None  # the host route copies with NumPy: the plain call's cost
            steps.append(guard)
    return steps


def _host_route(
    x: Any,
    src: Backend,
    facts: Facts,
    tgt: Backend,
    device: str | None,
    dtype: str | None,
    copy: bool | None,
) -> list[Step]:
    steps = src.to_host_steps(x, facts)
    host = _after_host(facts, steps)
    if (
        dtype is None
        and not host.writable
        and tgt.name in _MUTABLE
        and tgt.name != "numpy"
        and steps
        and not any(s.copies for s in steps)
    ):
        # a view of immutable memory headed for a writable tensor: the source framework's
        # own copy instead of the view (one copy, not a view and then a copy of it)
        own = src.fresh_host_step(facts)
        if own is not None:
            steps[-1] = replace(
                own,
                why=f"{tgt.name} tensors are always writable, and the memory belongs to an "
                f"immutable {src.name} array",
            )
            host = _after_host(facts, steps)
    if dtype is not None:
        numpy = get_backend("numpy")
        steps += numpy.cast_steps(host, dtype)
        host = _cast_facts(host, dtype)
    if not host.native_order and tgt.name != "numpy":
        steps.append(
            Step(
                "byte-swap to native order",
                True,
                _to_native,
                f"{tgt.name} only holds native byte order",
            )
        )
        host = Facts(host.framework, host.dtype, host.shape, nbytes=host.nbytes)
    # Memory the route made itself (nothing else holds it) is always safe to share.
    private = any(s.copies and s.fresh for s in steps)
    if copy is True and not private and tgt.name == "torch":
        # copy=True: copy with NumPy, then share that (cheaper than torch's clone afterwards)
        steps.append(
            Step(
                "copy on the host (copy=True)",
                True,
                _host_copy,
                "an independent result was asked for",
            )
        )
        host = Facts(host.framework, host.dtype, host.shape, nbytes=host.nbytes)
        private = True
    return steps + tgt.from_host_steps(host, device=device, copy=False if private else copy)


def _string_route(
    x: Any, src: Backend, facts: Facts, tgt: Backend, dtype: str | None
) -> list[Step]:
    if tgt.name != "numpy" or dtype is not None:
        raise ConversionError(
            message(
                f"a {src.name} string tensor for {tgt.name}",
                f"{tgt.name} has no string dtype"
                if tgt.name != "numpy"
                else "strings cannot be cast",
                "convert it to NumPy (an array of bytes objects), or encode the strings to numbers "
                "first (e.g. tf.strings.to_number, or a tokenizer)",
            )
        )
    return src.to_host_steps(x, facts)


# -- plans cached per kind of tensor ------------------------------------------------
#: (kind, target, device, dtype, copy[, JAX's x64 flag]) -> Plan. A kind is what
#: Backend.kind reads from a tensor: everything its route depends on, never its data.
_PLANS: dict[tuple, Plan] = {}
_PLANS_MAX = 4096  # kinds met by one process are few; a bound keeps odd workloads small


def plan_key_x64(key: tuple) -> tuple:
    """A plan key for a route into or out of JAX: those depend on JAX's 64-bit flag."""
    jax = sys.modules.get("jax")
    return key if jax is None else key + (jax.config.jax_enable_x64,)


def cached_plan(
    x: Any, src: Backend, target: str, device: Any, dtype: Any, copy: bool | None
) -> Plan:
    """The :class:`Plan` for ``x``, planned once per kind of tensor.

    The same route :func:`plan_leaf` gives ``x`` (what ``explain`` shows): the
    cache key holds every fact the planner reads (``src.kind``), and the options.
    Objects without a kind (scalars, sparse or deleted tensors, unusual dtypes or
    options) are planned afresh each call. The plan's ``source`` describes the
    first tensor of the kind; errors are worded from a fresh plan.
    """
    kind = src.kind(x, target)
    if (
        kind is None
        or not (dtype is None or type(dtype) is str)
        or not (device is None or type(device) is str)
    ):
        return plan_leaf(x, src, target, device=device, dtype=dtype, copy=copy)
    key: tuple = (kind, target, device, dtype, copy)
    if target == "jax" or src.name == "jax":
        key = plan_key_x64(key)
    plan = _PLANS.get(key)
    if plan is None:
        plan = plan_leaf(x, src, target, device=device, dtype=dtype, copy=copy)
        _ = plan.fn  # compiled now: callers run plan._fn
        if not plan.by_kind:
            return plan  # for this tensor only
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan
