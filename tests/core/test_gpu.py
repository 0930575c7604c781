"""CUDA paths. Skipped without a GPU (conftest); run by bench/gpu_check.py on one."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import tensorbridge as tb  # noqa: E402

pytestmark = pytest.mark.gpu


def _raw(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 255, (n * torch.empty(0, dtype=dtype).element_size(),),
                         dtype=torch.uint8, generator=g).view(dtype)


def test_cuda_tensor_to_numpy_bit_exact():
    for dt in (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint16):
        host = _raw(1 << 16, dt)
        cuda = host.cuda()
        a = tb.to_numpy(cuda)
        assert a.tobytes() == host.view(torch.uint8).numpy().tobytes()


def test_cuda_tree_to_numpy_one_sync_and_exact(monkeypatch):
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (calls.append(a), real(*a)))
    tree = {f"w{i}": _raw(1000 + i, seed=i).cuda().reshape(-1) for i in range(50)}
    tree["grad"] = (torch.ones(3, device="cuda", requires_grad=True) * 2)
    out = tb.to_numpy(tree)
    assert len(calls) == 1
    for k, v in tree.items():
        assert out[k].tobytes() == v.detach().cpu().numpy().tobytes()


def test_copy_false_from_cuda_is_refused():
    with pytest.raises(tb.CopyError, match="host"):
        tb.to_numpy(torch.ones(2, device="cuda"), copy=False)


def test_from_numpy_to_device():
    a = np.arange(6, dtype=np.float32)
    t = tb.to_torch(a, device="cuda")
    assert t.is_cuda and t.cpu().numpy().tobytes() == a.tobytes()


def test_same_device_switches_are_zero_copy():
    t = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    for tgt in ("jax", "cupy"):
        pytest.importorskip(tgt)
        y = tb.convert(t, to=tgt)
        assert not tb.explain(t, to=tgt).copies
        assert tb.shares_memory(t, y)
        back = tb.to_torch(y)
        assert back.data_ptr() == t.data_ptr()
