# Type information for the conversion functions, for type checkers only.
#
# The return type follows the argument: a dict, list or tuple comes back as one (its
# values converted), an array or a scalar comes back as the target's array type, and
# anything else (a registered container, a dataclass, ...) as Any. `tensorbridge`
# imports these names from here under TYPE_CHECKING; at run time they are the functions
# of tensorbridge/convert.py. tests/test_typing.py keeps the two signatures in step.
#
# An argument whose type holds Any (a NumPy array: numpy types its shape Any) matches a
# precise overload and the catch-all alike, and mypy then answers Any.
#
# device= is Any: a string, a CUDA index, a torch.device or a JAX device (docs/guide.md,
# "Devices"); framework classes are never named here, see below.
#
# Arguments are matched structurally (anything with __dlpack__: numpy, torch, JAX, CuPy
# arrays), never by a framework's class: where a framework is not installed its class is
# Any, which would match everything and claim the wrong return type.

from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar, overload

import jax
import numpy as np
import torch

from .convert import TreePlan
from .plan import Plan

_K = TypeVar("_K")

class _DLPackArray(Protocol):
    @property
    def __dlpack__(self) -> Callable[..., Any]: ...

# an array (numpy, torch, JAX, CuPy), a NumPy scalar, or a Python number
_Leaf = _DLPackArray | np.generic | complex
_Container = dict[Any, Any] | list[Any] | tuple[Any, ...]

@overload
def convert(
    x: dict[_K, Any],
    /,
    to: str,
    *,
    device: Any = None,
    dtype: Any = None,
    copy: bool | None = None,
    ragged: str = "error",
    pinned: bool = False,
) -> dict[_K, Any]: ...
@overload
def convert(
    x: list[Any],
    /,
    to: str,
    *,
    device: Any = None,
    dtype: Any = None,
    copy: bool | None = None,
    ragged: str = "error",
    pinned: bool = False,
) -> list[Any]: ...
@overload
def convert(
    x: tuple[Any, ...],
    /,
    to: str,
    *,
    device: Any = None,
    dtype: Any = None,
    copy: bool | None = None,
    ragged: str = "error",
    pinned: bool = False,
) -> tuple[Any, ...]: ...
@overload
def convert(
    x: _Leaf,
    /,
    to: Literal["numpy", "np"],
    *,
    device: Any = None,
    dtype: Any = None,
    copy: bool | None = None,
    ragged: str = "error",
    pinned: bool = False,
) -> np.ndarray: ...
@overload
def convert(
    x: _Leaf,
    /,
    to: Literal["torch", "pytorch"],
    *,
    device: Any = None,
    dtype: Any = None,
    copy: bool | None = None,
    ragged: str = "error",
    pinned: bool = False,
) -> torch.Tensor: ...
@overload
def convert(
    x: _Leaf,
    /,
    to: Literal["jax"],
    *,
    device: Any = None,
    dtype: Any = None,
    copy: bool | None = None,
    ragged: str = "error",
    pinned: bool = False,
) -> jax.Array: ...
@overload
def convert(
    x: Any,
    /,
    to: str,
    *,
    device: Any = None,
    dtype: Any = None,
    copy: bool | None = None,
    ragged: str = "error",
    pinned: bool = False,
) -> Any: ...
@overload
def to_numpy(
    x: dict[_K, Any],
    /,
    *,
    copy: bool | None = None,
    dtype: Any = None,
    ragged: str = "error",
    pinned: bool = False,
) -> dict[_K, Any]: ...
@overload
def to_numpy(
    x: list[Any],
    /,
    *,
    copy: bool | None = None,
    dtype: Any = None,
    ragged: str = "error",
    pinned: bool = False,
) -> list[Any]: ...
@overload
def to_numpy(
    x: tuple[Any, ...],
    /,
    *,
    copy: bool | None = None,
    dtype: Any = None,
    ragged: str = "error",
    pinned: bool = False,
) -> tuple[Any, ...]: ...
@overload
def to_numpy(
    x: _Leaf,
    /,
    *,
    copy: bool | None = None,
    dtype: Any = None,
    ragged: str = "error",
    pinned: bool = False,
) -> np.ndarray: ...
@overload
def to_numpy(
    x: Any,
    /,
    *,
    copy: bool | None = None,
    dtype: Any = None,
    ragged: str = "error",
    pinned: bool = False,
) -> Any: ...
@overload
def to_torch(
    x: dict[_K, Any], /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> dict[_K, Any]: ...
@overload
def to_torch(
    x: list[Any], /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> list[Any]: ...
@overload
def to_torch(
    x: tuple[Any, ...], /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> tuple[Any, ...]: ...
@overload
def to_torch(
    x: _Leaf, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> torch.Tensor: ...
@overload
def to_torch(
    x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Any: ...
@overload
def to_jax(
    x: dict[_K, Any], /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> dict[_K, Any]: ...
@overload
def to_jax(
    x: list[Any], /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> list[Any]: ...
@overload
def to_jax(
    x: tuple[Any, ...], /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> tuple[Any, ...]: ...
@overload
def to_jax(
    x: _Leaf, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> jax.Array: ...
@overload
def to_jax(
    x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Any: ...

# TensorFlow and CuPy ship no type information: their tensors are Any (MLX arrays too:
# mlx is an optional extra, and its class would be Any where it is not installed).
def to_tensorflow(
    x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Any: ...
def to_tf(x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None) -> Any: ...
def to_cupy(
    x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Any: ...
def to_mlx(
    x: Any, /, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Any: ...
@overload
def explain(
    x: _Container, /, to: str, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> TreePlan: ...
@overload
def explain(
    x: _Leaf, /, to: str, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Plan: ...
@overload
def explain(
    x: Any, /, to: str, *, device: Any = None, dtype: Any = None, copy: bool | None = None
) -> Plan | TreePlan: ...
