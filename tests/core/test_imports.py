"""Importing tensorbridge, and converting NumPy data, imports no framework."""

from __future__ import annotations

import subprocess
import sys
import textwrap

FRAMEWORKS = ("torch", "tensorflow", "jax", "cupy", "mlx", "h5py", "safetensors", "rich")


def _run(code: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_and_numpy_conversions_touch_no_framework():
    out = _run(f"""
        import sys, numpy as np
        import tensorbridge as tb
        tb.to_numpy({{"a": np.ones(2), "b": [np.zeros(1)], "s": 1.5}})
        tb.explain(np.ones(2), to="numpy")
        tb.shares_memory(np.ones(1), np.ones(1))
        import tensorbridge.cli, tensorbridge.files
        print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_a_framework_is_loaded_only_when_asked_for():
    out = _run("""
        import sys, numpy as np, tensorbridge as tb
        tb.to_torch(np.ones(2))
        print(sorted(m for m in ("torch", "tensorflow", "jax", "mlx") if m in sys.modules))
    """)
    assert out.strip() == "['torch']"


def test_mlx_is_loaded_only_when_asked_for():
    out = _run("""
        import sys, numpy as np, tensorbridge as tb
        tb.to_numpy([np.ones(2)]); tb.to_torch({"a": np.ones(2)}); tb.explain(np.ones(1), to="torch")
        before = "mlx" in sys.modules
        x = tb.to_mlx(np.ones(2))
        print(before, type(x).__module__, sorted(m for m in ("tensorflow", "jax") if m in sys.modules))
    """)
    assert out.strip() == "False mlx.core []"


def test_missing_framework_says_how_to_install():
    out = _run("""
        import sys
        sys.modules["cupy"] = None  # as if it were not installed
        import numpy as np, tensorbridge as tb
        try:
            tb.to_cupy(np.ones(2))
        except tb.FrameworkNotInstalledError as e:
            print(type(e).__mro__[2].__name__, e)
    """)
    assert "pip install 'tensorbridge[cupy]'" in out
