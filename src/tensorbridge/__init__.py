"""tensorbridge: move tensors between NumPy, PyTorch, TensorFlow, JAX, CuPy and MLX,
and between tensor files. Exact for every dtype, zero-copy where memory can be
shared, honest where it cannot.

>>> import numpy as np, tensorbridge as tb
>>> tb.to_numpy({"w": np.ones(2, np.float32)})["w"].dtype
dtype('float32')
"""

from typing import TYPE_CHECKING, Any

from .convert import shares_memory

if TYPE_CHECKING:  # the same functions, with overloads whose return type follows the argument
    from ._api import (
        convert,
        explain,
        to_cupy,
        to_jax,
        to_mlx,
        to_numpy,
        to_tensorflow,
        to_tf,
        to_torch,
    )
else:
    from .convert import (
        convert,
        explain,
        to_cupy,
        to_jax,
        to_mlx,
        to_numpy,
        to_tensorflow,
        to_tf,
        to_torch,
    )
from .dask_io import to_dask
from .errors import (
    ConversionError,
    CopyError,
    DeviceError,
    FileFormatError,
    FrameworkNotInstalledError,
    TensorBridgeError,
    UnsafeContentError,
)
from .files import load, open, save  # noqa: A004 - tb.open mirrors the builtin on purpose
from .tree import register_container, tree_map
from .writer import Writer

__version__ = "0.1.0"

# Inside tf.function, AutoGraph rewrites the Python functions it meets. Marked as
# its artifacts (the attribute tf.autograph.experimental.do_not_convert sets), the
# public functions run as written, so their own errors reach the caller unchanged.
_fn: Any
for _fn in (
    convert,
    to_numpy,
    to_torch,
    to_tensorflow,
    to_jax,
    to_cupy,
    to_mlx,
    explain,
    shares_memory,
    save,
    load,
    open,
    tree_map,
):
    _fn.autograph_info__ = frozenset()
del _fn

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
    "register_container",
    "tree_map",
    "save",
    "load",
    "open",
    "Writer",
    "to_dask",
    "TensorBridgeError",
    "ConversionError",
    "CopyError",
    "DeviceError",
    "FrameworkNotInstalledError",
    "FileFormatError",
    "UnsafeContentError",
]
