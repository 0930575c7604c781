"""The one exception hierarchy of tensorbridge.

Every error says three things: what was given, why it cannot be done, and how
to fix it. Build messages with :func:`message` so that they all read alike::

    raise ConversionError(message(
        "a numpy array of dtype object",
        "object arrays hold Python references, not numbers",
        "convert the elements to a numeric dtype first, e.g. a.astype(np.float32)",
    ))

Errors raised inside a tree of tensors carry the path of the offending leaf
(``at ['layers'][1]['weight']``); see :meth:`TensorBridgeError.at`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "TensorBridgeError",
    "ConversionError",
    "LazyIndexError",
    "CopyError",
    "DeviceError",
    "FrameworkNotInstalledError",
    "FileFormatError",
    "UnsafeContentError",
    "CheckpointChangedError",
    "message",
]


def message(given: str, why: str, fix: str) -> str:
    """Join the three parts every tensorbridge error message has."""
    return f"Cannot handle {given}: {why}. Fix: {fix}."


class TensorBridgeError(Exception):
    """Base class of every error tensorbridge raises on purpose."""

    path: str = ""

    # Exception's own constructor (not TypeError's or ValueError's): AutoGraph re-raises
    # an error from inside tf.function as the same type only when it can see this.
    if TYPE_CHECKING:

        def __init__(self, *args: object) -> None: ...
    else:
        __init__ = Exception.__init__

    def at(self, path: str) -> TensorBridgeError:
        """Return this error with the tree ``path`` of the failing leaf prepended."""
        self.path = path + self.path
        return self

    def __str__(self) -> str:
        text = super().__str__()
        return f"at {self.path}: {text}" if self.path else text


class ConversionError(TensorBridgeError, TypeError):
    """The value cannot be represented in the requested framework or dtype."""


class LazyIndexError(ConversionError, IndexError):
    """An index of a lazy array (``reader.array(name)``) is out of range, or has more
    entries than the tensor has axes: an ``IndexError`` too, as NumPy raises, so that
    iterating over the array stops at its end."""


class CopyError(TensorBridgeError, ValueError):
    """``copy=False`` was asked for, but sharing memory is impossible."""


class DeviceError(TensorBridgeError, ValueError):
    """The requested device does not exist or the framework cannot use it."""


class FrameworkNotInstalledError(TensorBridgeError, ImportError):  # type: ignore[misc]
    # (ImportError.path, the module's file, is str | None; ours is the tree path, never None.)
    """A target framework was asked for, but it is not installed."""


class FileFormatError(TensorBridgeError, ValueError):
    """A tensor file is malformed, truncated, or not of the format it claims.

    ``file`` names the file (may be empty for in-memory data).
    """

    def __init__(self, text: str, file: object = "") -> None:
        self.file = str(file)
        super().__init__(f"{self.file}: {text}" if self.file else text)


class UnsafeContentError(FileFormatError):
    """A tensor file holds something that could run code, read other files,
    or escape its directory. It is refused, never executed."""


class CheckpointChangedError(FileFormatError):
    """A tensor file, or a file of a sharded checkpoint, was rewritten or replaced by
    another save while it was being read. Nothing of two versions was mixed: open or load
    it again (``load`` does, up to three times)."""
