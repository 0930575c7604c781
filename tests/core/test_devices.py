"""One device rule for every target: strings in torch, JAX and TF spellings, torch.device,
JAX devices and CUDA indices name the same devices; cpu:N is that CPU device or a
DeviceError, never silently cpu:0; anything else is a DeviceError."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import tensorbridge as tb

jax = pytest.importorskip("jax")
tf = pytest.importorskip("tensorflow")

TARGETS = ["numpy", "torch", "jax", "tensorflow"]


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize(
    "device", ["cpu", "CPU:0", "cpu:0", "/CPU:0", "/job:localhost/replica:0/task:0/device:CPU:0"]
)
def test_every_spelling_of_the_host_is_the_host_for_every_target(to, device):
    out = tb.convert(np.arange(3.0, dtype=np.float32), to=to, device=device)
    assert np.asarray(tb.to_numpy(out)).tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("to", TARGETS)
def test_device_objects_are_accepted_everywhere(to):
    for device in (torch.device("cpu"), torch.device("cpu", 0), jax.devices("cpu")[0]):
        out = tb.convert(np.ones(2, np.float32), to=to, device=device)
        assert tb.to_numpy(out).tolist() == [1.0, 1.0]
        assert isinstance(tb.explain(np.ones(2, np.float32), to=to, device=device), tb.plan.Plan)


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("device", ["", "  ", "foo", "cuda:x", -1, True, 1.5, object()])
def test_what_names_no_device_is_a_device_error_for_every_target(to, device):
    with pytest.raises(
        tb.DeviceError, match=r"it is not a device tensorbridge can name.*Fix: pass 'cpu'"
    ):
        tb.convert(np.ones(2), to=to, device=device)
    with pytest.raises(tb.DeviceError):
        tb.explain(np.ones(2), to=to, device=device)


@pytest.mark.parametrize("to", TARGETS)
def test_a_cpu_index_that_does_not_exist_is_refused_by_every_target(to):
    with pytest.raises(tb.DeviceError, match="cpu:7"):
        tb.convert(np.ones(2, np.float32), to=to, device="cpu:7")


def test_a_cuda_index_is_cuda_as_in_torch():
    from tensorbridge.frameworks.base import parse_device

    assert parse_device(0) == "cuda:0" and parse_device(torch.device("cuda", 1)) == "cuda:1"
    if not torch.cuda.is_available():
        with pytest.raises(tb.DeviceError, match="no CUDA"):
            tb.to_torch(np.ones(1), device=0)


def test_jax_cpu_indices_place_arrays_on_that_device(tmp_path):
    """With four host devices (XLA's flag, set before JAX starts: a subprocess)."""
    script = tmp_path / "cpu_n.py"
    script.write_text(
        textwrap.dedent("""
        import numpy as np, jax, tensorbridge as tb
        assert len(jax.devices("cpu")) == 4
        a = np.arange(4.0, dtype=np.float32)
        j = tb.to_jax(a, device="cpu:3")
        assert j.devices() == {jax.devices("cpu")[3]}, j.devices()
        assert "device_put" in str(tb.explain(a, to="jax", device="cpu:3"))
        assert not tb.explain(j, to="jax", device="cpu:3").steps  # already there
        assert tb.to_jax(j, device=jax.devices("cpu")[3]) is j
        k = tb.to_jax(j, device="cpu")  # cpu is cpu:0
        assert k.devices() == {jax.devices("cpu")[0]}
        import torch
        t = tb.to_torch(j)  # from cpu:3 to torch's one CPU
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
        print("OK")
    """)
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-3000:]
