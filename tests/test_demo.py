"""``tensorbridge demo``: runs with whatever is installed, says what is shared,
and ends with an .npz that plain NumPy reads back."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np

from tensorbridge import demo

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def test_demo_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tensorbridge", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "oneDNN" not in proc.stderr and "absl::" not in proc.stderr, proc.stderr
    out = proc.stdout
    assert "\x1b[" not in out
    assert "FAILED" not in out and "0 failed" in out
    npz = tmp_path / "db.npz"
    assert str(npz) in out and "inspect" in out
    with np.load(npz, allow_pickle=False) as f:
        assert sorted(f.files) == ["a", "b"]
        assert f["a"].shape == (4, 2) and f["b"].shape == (4, 2)
        assert ((f["a"] >= -2) & (f["a"] <= 2)).all()
    if HAVE_TORCH:
        assert "memory SHARED" in out and "memory NOT shared" in out
        assert "x[0][0] is now 20" in out and "y[0][0] is still 1" in out
        assert "copy=True" in out and "requires_grad" in out
        assert "bfloat16" in out and "bit-exact: True" in out
        import torch

        if not torch.cuda.is_available():
            assert "skipped: no CUDA device" in out
    else:
        assert "skipped: torch not installed" in out


def test_demo_numpy_only_still_useful(tmp_path):
    lines: list[str] = []
    summary = demo.run(lines.append, out_dir=str(tmp_path), frameworks=("numpy",))
    text = "\n".join(lines)
    assert summary["failed"] == [], text
    assert "torch" in summary["missing"] and "tensorflow" in summary["missing"]
    assert "not available (their steps are skipped): torch, tensorflow" in text
    assert "skipped: torch not installed" in text
    assert "skipped: tensorflow not installed" in text
    assert summary["npz"] == str(tmp_path / "db.npz")
    assert "export a small dataset" in summary["ran"][-1]
    with np.load(summary["npz"], allow_pickle=False) as f:
        assert f["a"].dtype == np.float32 and f["b"].shape == (4, 2)


def test_demo_torch_steps_in_process(tmp_path):
    """In process, so warnings are errors here (TensorFlow left out: it is slow to import)."""
    lines: list[str] = []
    summary = demo.run(lines.append, out_dir=str(tmp_path), frameworks=("torch",))
    assert summary["failed"] == [], "\n".join(lines)
    if HAVE_TORCH:
        assert len(summary["ran"]) >= 8
