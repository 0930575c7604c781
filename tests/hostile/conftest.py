"""Fixtures for the hostile-input, fuzz, crash-safety and concurrency suites."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import make_hostile


@pytest.fixture(scope="session")
def hostile_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="session")
def hostile_files(hostile_root) -> dict[str, Path]:
    """Every crafted file of make_hostile, built once per session."""
    return make_hostile.build_all(hostile_root)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root``: (mode, size, mtime_ns) - to prove nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out
