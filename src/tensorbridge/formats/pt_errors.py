"""One error for everything the standard library raises on a malformed PyTorch checkpoint.

``zipfile``, ``pickletools``, ``struct`` and the OS raise a dozen unrelated types on
corrupt or truncated input; :func:`wrapped` turns each into a single
:class:`~tensorbridge.errors.FileFormatError` that names the file and says what was
being done. tensorbridge's own errors pass through unchanged.
"""

from __future__ import annotations

import contextlib
import lzma
import struct
import zipfile
import zlib
from collections.abc import Iterator

from ..errors import FileFormatError, TensorBridgeError

__all__ = ["RAW_ERRORS", "wrapped"]

#: Errors the standard library raises on malformed zips and pickles.
RAW_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    KeyError,
    IndexError,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    MemoryError,
    UnicodeDecodeError,
    zlib.error,
    lzma.LZMAError,
)


@contextlib.contextmanager
def wrapped(path: str, doing: str) -> Iterator[None]:
    """Turn raw zip/pickle/IO errors into one :class:`FileFormatError` naming ``path``."""
    try:
        yield
    except TensorBridgeError:
        raise
    except RAW_ERRORS as exc:
        detail = str(exc)
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        raise FileFormatError(
            f"{doing} failed ({type(exc).__name__}: {detail}); the file is corrupt, truncated "
            "or not a PyTorch checkpoint. Fix: download or save it again (torch.save writes "
            "a zip archive).",
            path,
        ) from exc
