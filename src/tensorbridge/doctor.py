"""``tensorbridge doctor``: what this machine can do.

Reports versions, installed frameworks (found with ``importlib.util.find_spec``
and imported to read their versions, timing the import), their devices, and
which conversion routes work, each tried for real on a tiny tensor: zero-copy
is proven with :func:`tensorbridge.shares_memory`, values are compared.

>>> report = collect(frameworks=("numpy",))
>>> report["frameworks"]["numpy"]["installed"]
True
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .native_stderr import held

__all__ = ["collect", "render", "main", "FRAMEWORKS"]

FRAMEWORKS = ("numpy", "torch", "tensorflow", "jax", "cupy", "mlx")
_MODULES = {"mlx": "mlx.core"}  # the module to import where it is not the framework's name


def _import(name: str) -> dict[str, Any]:
    if importlib.util.find_spec(name) is None:
        return {"installed": False}
    name = _MODULES.get(name, name)
    already = name in sys.modules
    if name == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep its start-up logs off stderr
    start = time.perf_counter()
    try:
        with held():  # TensorFlow's C++ start-up banners; shown if the import fails
            mod = importlib.import_module(name)
    except Exception as exc:  # installed but broken (missing CUDA libraries, ...)
        return {"installed": True, "importable": False, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "installed": True,
        "importable": True,
        "version": str(getattr(mod, "__version__", "?")),
        "import_seconds": round(time.perf_counter() - start, 3),
        "already_imported": already,
    }


def _devices(name: str) -> Any:
    try:
        if name == "numpy":
            return ["cpu"]
        if name == "torch":
            import torch

            out = ["cpu"]
            if torch.cuda.is_available():
                out += [
                    f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                    for i in range(torch.cuda.device_count())
                ]
            mps = getattr(torch.backends, "mps", None)
            if mps is not None and mps.is_available():
                out.append("mps:0")
            return out
        if name == "tensorflow":
            import tensorflow as tf

            return [d.name for d in tf.config.list_physical_devices()]
        if name == "jax":
            import jax

            return [str(d) for d in jax.devices()]
        if name == "cupy":
            import cupy

            return [f"cuda:{i}" for i in range(cupy.cuda.runtime.getDeviceCount())]
        if name == "mlx":
            import mlx.core as mx

            cuda = getattr(mx, "cuda", None)
            gpu = mx.metal.is_available() or (cuda is not None and cuda.is_available())
            return ["cpu", "gpu (unified memory)"] if gpu else ["cpu"]
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return []


def _equal(a: Any, b: Any) -> bool:
    import tensorbridge as tb

    x, y = tb.to_numpy(a, copy=True), tb.to_numpy(b, copy=True)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _routes(have: dict[str, bool]) -> list[dict[str, Any]]:
    import tensorbridge as tb

    from .plan import Plan

    routes: list[dict[str, Any]] = []

    def route(
        name: str,
        needs: tuple[str, ...],
        fn: Callable[[], str],
        skip: Callable[[], str | None] = lambda: None,
    ) -> None:
        missing = [n for n in needs if not have.get(n)]
        if missing:
            routes.append(
                {
                    "route": name,
                    "status": "skipped",
                    "detail": f"{', '.join(missing)} not installed",
                }
            )
            return
        reason = None
        try:
            reason = skip()
        except Exception as exc:
            reason = f"cannot tell ({type(exc).__name__}: {exc})"
        if reason:
            routes.append({"route": name, "status": "skipped", "detail": reason})
            return
        try:
            routes.append({"route": name, "status": "ok", "detail": fn()})
        except Exception as exc:
            routes.append(
                {"route": name, "status": "failed", "detail": f"{type(exc).__name__}: {exc}"}
            )

    def shared(a: Any, b: Any) -> str:
        if not _equal(a, b):
            raise AssertionError("values differ after the conversion")
        return "zero-copy (memory shared)" if tb.shares_memory(a, b) else "works, but copies"

    def numpy_to_torch() -> str:
        a = np.arange(6, dtype=np.float32)
        return shared(a, tb.to_torch(a))

    def torch_to_numpy() -> str:
        import torch

        t = torch.arange(6, dtype=torch.float32)
        return shared(t, tb.to_numpy(t))

    def torch_to(target: str) -> Callable[[], str]:
        def fn() -> str:
            import torch

            t = torch.arange(64, dtype=torch.float32)
            plan = tb.explain(t, to=target)
            steps = "; ".join(s.text for s in plan.steps) if isinstance(plan, Plan) else str(plan)
            return f"{shared(t, tb.convert(t, to=target))} via {steps}"

        return fn

    def numpy_to(target: str) -> Callable[[], str]:
        def fn() -> str:
            a = np.arange(64, dtype=np.float32)
            return shared(a, tb.convert(a, to=target))

        return fn

    def mlx_to_numpy() -> str:
        import mlx.core as mx

        x = mx.arange(6, dtype=mx.float32)
        return shared(x, tb.to_numpy(x))

    def cuda() -> str | None:
        import torch

        return None if torch.cuda.is_available() else "no CUDA device"

    def pinned() -> str:
        import torch

        t = torch.empty(1, pin_memory=True)
        if not t.is_pinned():
            raise AssertionError("torch.empty(pin_memory=True) is not pinned")
        return "page-locked host memory available"

    def cuda_to_numpy() -> str:
        import torch

        t = torch.arange(6, dtype=torch.float32, device="cuda")
        a = tb.to_numpy(t)
        if a.tolist() != t.cpu().tolist():
            raise AssertionError("values differ")
        return "copied to the host (one synchronisation)"

    def numpy_to_cuda() -> str:
        t = tb.to_torch(np.arange(6, dtype=np.float32), device="cuda")
        return f"placed on {t.device}"

    def cupy_torch() -> str:
        import torch

        t = torch.arange(6, dtype=torch.float32, device="cuda")
        return shared(t, tb.to_cupy(t))

    route("numpy -> torch", ("torch",), numpy_to_torch)
    route("torch -> numpy", ("torch",), torch_to_numpy)
    route("torch -> jax (DLPack)", ("torch", "jax"), torch_to("jax"))
    route("torch -> tensorflow (DLPack)", ("torch", "tensorflow"), torch_to("tensorflow"))
    route("numpy -> jax", ("jax",), numpy_to("jax"))
    route("numpy -> tensorflow", ("tensorflow",), numpy_to("tensorflow"))
    route("mlx -> numpy", ("mlx",), mlx_to_numpy)
    route("numpy -> mlx", ("mlx",), numpy_to("mlx"))
    route("pinned memory (torch)", ("torch",), pinned, cuda)
    route("cuda -> numpy (torch)", ("torch",), cuda_to_numpy, cuda)
    route("numpy -> cuda (torch)", ("torch",), numpy_to_cuda, cuda)
    route("torch cuda -> cupy (DLPack)", ("torch", "cupy"), cupy_torch, cuda)
    return routes


def collect(frameworks: tuple[str, ...] = FRAMEWORKS) -> dict[str, Any]:
    """Everything ``doctor --json`` prints, as a dict."""
    import ml_dtypes

    from . import __version__

    report: dict[str, Any] = {
        "tensorbridge": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "ml_dtypes": getattr(ml_dtypes, "__version__", "?"),
        "frameworks": {},
    }
    for name in frameworks:
        info = _import(name)
        if info.get("importable"):
            info["devices"] = _devices(name)
        report["frameworks"][name] = info
    have = {n: bool(i.get("importable")) for n, i in report["frameworks"].items()}
    report["routes"] = _routes(have)
    report["missing"] = [n for n, i in report["frameworks"].items() if not i["installed"]]
    return report


def render(report: dict[str, Any], stream: Any = None) -> None:
    from .console import echo, print_table

    stream = sys.stdout if stream is None else stream
    echo(
        f"tensorbridge {report['tensorbridge']} on Python {report['python']} "
        f"({report['platform']})",
        stream,
    )
    echo(f"numpy {report['numpy']}, ml_dtypes {report['ml_dtypes']}", stream)
    echo("", stream)
    rows = []
    for name, info in report["frameworks"].items():
        if not info["installed"]:
            rows.append([name, "not installed", "-", f"pip install 'tensorbridge[{name}]'"])
        elif not info.get("importable"):
            rows.append([name, "import failed", "-", info.get("error", "")])
        else:
            devices = info.get("devices", [])
            text = ", ".join(devices) if isinstance(devices, list) else str(devices)
            rows.append([name, info["version"], f"{info['import_seconds']:.2f}s", text])
    stream.flush()
    print_table(["framework", "version", "import", "devices"], rows, stream, align="llll")
    echo("", stream)
    stream.flush()
    print_table(
        ["route", "status", "detail"],
        [[r["route"], r["status"], r["detail"]] for r in report["routes"]],
        stream,
        align="lll",
    )


def main(*, json_output: bool = False, quiet: bool = False) -> int:
    report = collect()
    if json_output:
        from .cli.common import emit_json

        emit_json(report)
    elif not quiet:
        render(report)
    return 0
