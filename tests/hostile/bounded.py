"""Run a read in a fresh subprocess under a wall-clock and an address-space limit, and measure it.

Hostile inputs that *succeed* are the dangerous ones (amplification, hangs), so a test must check
what a read cost, not only how it ended. ``run_bounded`` runs ``code`` in ``python -c`` with
``RLIMIT_AS`` set before anything is imported, and reports the outcome, the wall time and the peak
resident memory (VmHWM: ru_maxrss would be inherited from pytest across fork+exec).

The code sees ``ARGS`` (the JSON-decoded ``args``) and may set ``RESULT`` to any JSON value.
A ``TensorBridgeError`` is an outcome ("refused"), anything else escaping is "crash".

    r = run_bounded("import tensorbridge as tb; RESULT = len(tb.load(ARGS[0]))", [str(path)])
    assert r.outcome == "ok" and r.peak_rss < 200 * MIB and r.result == 3
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

MIB = 1 << 20

_WRAPPER = r"""
import json, resource, sys, time, traceback
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
ARGS = json.loads(sys.argv[2])
RESULT = None
t0 = time.perf_counter()
outcome, detail = "ok", ""
try:
    exec(compile(sys.argv[3], "<bounded>", "exec"))
except BaseException as e:
    from tensorbridge.errors import TensorBridgeError
    outcome = "refused" if isinstance(e, TensorBridgeError) else "crash"
    detail = str(e)[:2000] if outcome == "refused" else "".join(traceback.format_exception(e))[-4000:]
    err_type = type(e).__name__
else:
    err_type = None
wall = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print("\n@@BOUNDED@@" + json.dumps({"outcome": outcome, "detail": detail, "error_type": err_type,
      "wall": wall, "peak_rss": int(hwm.split()[1]) * 1024, "result": RESULT}))
"""


@dataclasses.dataclass
class Bounded:
    outcome: (
        str  # "ok", "refused" (a TensorBridgeError), "crash" (anything else), "timeout", "died"
    )
    detail: str  # the refusal message, the traceback, or stderr
    error_type: str | None
    wall: float  # seconds inside the code (imports included if the code imports)
    peak_rss: int  # bytes, whole process
    result: Any


def run_bounded(
    code: str,
    args: list | None = None,
    *,
    timeout: float = 60,
    mem_limit: int = 3 << 30,
    env: dict | None = None,
) -> Bounded:
    """Run ``code`` in a subprocess limited to ``timeout`` seconds and ``mem_limit`` bytes of
    address space (0: no limit). A process killed by the clock is ``outcome == "timeout"``;
    one that died otherwise (a signal, MemoryError outside the code) is ``"died"``."""
    full_env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _WRAPPER,
                str(mem_limit),
                json.dumps(args or []),
                textwrap.dedent(code),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
    except subprocess.TimeoutExpired:
        return Bounded("timeout", f"no answer within {timeout} s", None, timeout, 0, None)
    marker = proc.stdout.rfind("@@BOUNDED@@")
    if marker < 0:
        return Bounded("died", f"exit {proc.returncode}: {proc.stderr[-4000:]}", None, 0.0, 0, None)
    data = json.loads(proc.stdout[marker + len("@@BOUNDED@@") :])
    return Bounded(**data)
