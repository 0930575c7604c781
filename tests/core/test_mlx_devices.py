"""MLX's own device objects as ``device=``: ``mx.cpu`` and ``mx.Device(mx.cpu, 0)`` are the
host for every target; MLX's GPU is Metal ("mps:N") or, in a CUDA build, "cuda:N", which
each target accepts or refuses as it does those names."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.frameworks.base import parse_device

mx = pytest.importorskip("mlx.core")


def test_mlx_devices_are_named():
    assert parse_device(mx.cpu) == "cpu"
    assert parse_device(mx.default_device()) == (
        "cpu" if mx.default_device() == mx.cpu else parse_device(mx.gpu)
    )
    assert parse_device(mx.Device(mx.cpu, 0)) == "cpu"
    assert parse_device(mx.Device(mx.cpu, 2)) == "cpu:2"
    gpu = "mps" if mx.metal.is_available() else "cuda"
    assert parse_device(mx.gpu) == f"{gpu}:0"
    assert parse_device(mx.Device(mx.gpu, 1)) == f"{gpu}:1"


def test_the_host_as_an_mlx_device_works_for_every_target():
    torch = pytest.importorskip("torch")
    for dev in (mx.cpu, mx.Device(mx.cpu, 0)):
        assert tb.to_mlx(np.arange(3.0), device=dev).dtype == mx.float64
        assert tb.to_torch(mx.arange(3), device=dev).device == torch.device("cpu")


def test_mlx_gpu_for_mlx_says_mlx_arrays_have_no_device():
    if mx.metal.is_available():
        pytest.skip("on Apple silicon the MLX GPU is Metal, which this test does not cover")
    with pytest.raises(tb.DeviceError, match="MLX arrays have no device of their own"):
        tb.to_mlx(np.ones(2), device=mx.gpu)


def test_other_objects_are_still_refused_naming_mlx_devices_in_the_fix():
    with pytest.raises(tb.DeviceError, match=r"an MLX device \(mx\.cpu\)"):
        tb.to_mlx(np.ones(2), device=object())
