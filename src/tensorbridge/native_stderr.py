"""Hold back what native libraries print straight to file descriptor 2.

TensorFlow prints start-up banners from C++ when it is imported (the oneDNN
notice, absl's "All log messages before absl::InitializeLog()"), which
``TF_CPP_MIN_LOG_LEVEL`` no longer silences. ``tensorbridge doctor`` and
``tensorbridge demo`` import it for the user, so they hold those lines back:
they are shown after all when the block fails, so nothing that explains a
failure is lost.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["held"]


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Send fd 2 to a temporary file inside the block; replay it if the block raises."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr: nothing to hold back
        yield
        return
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            except BaseException:
                os.dup2(saved, 2)
                tmp.seek(0)
                text = tmp.read().decode("utf-8", "replace")
                if text:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                raise
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
