"""The floor under NumPy -> torch for a small array: what any Python ``convert(x, to=...)``
pays before and around ``torch.from_numpy`` (docs/performance.md, "Not met yet").

Each row is timed beside the plain call exactly as ``routes_small`` times it (the
expression compiled as a lambda, called from a lambda), alternating, by process time,
median of the per-repeat ratios:

1. a one-argument Python function returning ``torch.from_numpy(x)``;
2. a function with ``convert``'s signature (``x, /, to, *, device, dtype, copy, ragged,
   pinned``), called as ``f(x, to="torch")``, returning ``torch.from_numpy(x)``;
3. the same, also reading what the route depends on and looking the route up in a dict
   (``x.base``, for a view ``x.strides``, ``x.flags.writeable``, ``x.dtype``): the least
   an exact route can read, with no dispatch at all;
4. ``tb.convert(x, to="torch")`` and ``tb.to_torch(x)``.

Run: PYTHONPATH=src python bench/call_floor.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TB_BENCH_CLOCK", "process")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import numpy as np
    import torch
    from run import time_pair

    import tensorbridge as tb

    from_numpy = torch.from_numpy
    x = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    plain = eval("lambda x: torch.from_numpy(x)", {"torch": torch})  # noqa: S307 - as routes.py
    table = {x.dtype: from_numpy}

    def one_arg(a: Any) -> Any:
        return from_numpy(a)

    def signature(
        a: Any,
        /,
        to: str,
        *,
        device: Any = None,
        dtype: Any = None,
        copy: bool | None = None,
        ragged: str = "error",
        pinned: bool = False,
    ) -> Any:
        return from_numpy(a)

    def reads(
        a: Any,
        /,
        to: str,
        *,
        device: Any = None,
        dtype: Any = None,
        copy: bool | None = None,
        ragged: str = "error",
        pinned: bool = False,
    ) -> Any:
        if a.base is not None:
            s = a.strides
            if s[0] < 0 or s[1] < 0:
                return None
        if a.flags.writeable:
            return table[a.dtype](a)
        return None

    print(f"# {tb.__name__} {tb.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    for name, a in (("numpy f32", x), ("numpy f32 transposed", x.reshape(16, 16).T)):
        rows = (
            ("def f(x): return torch.from_numpy(x)", lambda a=a: one_arg(a)),
            ("convert's signature, body torch.from_numpy(x)", lambda a=a: signature(a, to="torch")),
            ("same + the reads an exact route needs + dict", lambda a=a: reads(a, to="torch")),
            ("tb.convert(x, to='torch')", lambda a=a: tb.convert(a, to="torch")),
            ("tb.to_torch(x)", lambda a=a: tb.to_torch(a)),
        )
        for label, fn in rows:
            t = time_pair(fn, lambda a=a: plain(a), repeats=15, batch_s=0.005)
            print(
                f"{name:21s} {label:48s} {t['a_ns']:5.0f} ns  plain {t['b_ns']:5.0f} ns"
                f"  {t['ratio']:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
