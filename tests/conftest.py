"""Shared fixtures: real frameworks, selected by what is installed.

JAX runs with 64-bit types enabled here so every dtype can be tested; the
refusal without x64 is tested in a subprocess (tests/core/test_jax.py).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

# On a GPU, JAX would take 75% of its memory at start; the GPU tests share it with torch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HAVE = {
    name: importlib.util.find_spec(name) is not None
    for name in ("torch", "tensorflow", "jax", "cupy")
}


def _cuda() -> bool:
    if HAVE["torch"]:
        import torch

        return torch.cuda.is_available()
    return False


def pytest_configure(config):
    if HAVE["jax"]:
        import jax

        jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run bench/gpu_check.py on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
