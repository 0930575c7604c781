"""Every conversion route beside the plain call a user would write (issue 10).

The cases here are registered in ``bench/run.py`` (``--only routes_small`` ...);
each runs in its own process like the others. For each route the plain call is
the obvious one for the same result: ``t.detach().cpu().numpy()``,
``torch.from_numpy``, ``tf.convert_to_tensor``, ``x.numpy()``, ``jnp.asarray``,
``np.asarray``, and between two frameworks the two-step bounce through a host
NumPy array. Every tensorbridge result is checked bit for bit against the plain
result before it is timed.

- ``routes_small``: one 256-float tensor of each kind (float32, requires_grad,
  bfloat16, float8, transposed, TF tensor and Variable, JAX array) to every
  other framework, plus ``dtype=`` casts and ``copy=True``.
- ``routes_tree``: dicts of 1000 such tensors, to NumPy and from NumPy, with
  ``copy=None`` and ``copy=True``, against the dict comprehension.
- ``routes_large``: 64 MiB tensors: zero-copy routes against the same route on
  1 MiB (O(1) means ~1x), copies against the fastest plain copy.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

MiB = 1 << 20
SMALL = 256  # floats


def _host(x: Any) -> Any:
    """Any framework's tensor as a NumPy array (for the bit check only)."""
    import numpy as np

    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16,):
            return t.view(torch.uint16).numpy()
        if t.element_size() == 1 and t.dtype.is_floating_point:
            return t.view(torch.uint8).numpy()
        return t.numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    a = np.asarray(x)
    if a.dtype.type.__module__ != "numpy":  # ml_dtypes: compare the bits
        a = a.view(f"u{a.dtype.itemsize}")
    return a


def _check(tb_out: Any, plain_out: Any, what: str) -> None:
    import numpy as np
    from run import same_bits

    a, b = _host(tb_out), _host(plain_out)
    if not same_bits(a, b):
        raise AssertionError(
            f"{what}: tensorbridge and the plain call differ "
            f"({a.dtype}{a.shape} vs {b.dtype}{b.shape})"
        )
    del np


def _frameworks() -> dict[str, Any]:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    import tensorflow as tf
    import torch

    return {"np": np, "torch": torch, "tf": tf, "jax": jax, "jnp": jnp, "ml": ml_dtypes}


def sources(n: int) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Kind name -> (framework, maker) for tensors of ``n`` float32 values."""
    f = _frameworks()
    np, torch, tf, jnp, ml = f["np"], f["torch"], f["tf"], f["jnp"], f["ml"]
    side = int(n**0.5)

    def base() -> Any:
        return np.random.default_rng(0).standard_normal(n).astype(np.float32)

    return {
        "numpy f32": ("numpy", base),
        "numpy f32 transposed": ("numpy", lambda: base()[: side * side].reshape(side, side).T),
        "numpy bf16": ("numpy", lambda: base().astype(ml.bfloat16)),
        "torch f32": ("torch", lambda: torch.from_numpy(base())),
        "torch requires_grad": ("torch", lambda: torch.from_numpy(base()).requires_grad_()),
        "torch bf16": ("torch", lambda: torch.from_numpy(base()).to(torch.bfloat16)),
        "torch float8_e4m3fn": ("torch", lambda: torch.from_numpy(base()).to(torch.float8_e4m3fn)),
        "torch transposed": (
            "torch",
            lambda: torch.from_numpy(base()[: side * side]).reshape(side, side).T,
        ),
        "tf f32": ("tf", lambda: tf.constant(base())),
        "tf Variable": ("tf", lambda: tf.Variable(base())),
        "tf bf16": ("tf", lambda: tf.constant(base().astype(ml.bfloat16))),
        "jax f32": ("jax", lambda: jnp.asarray(base())),
        "jax bf16": ("jax", lambda: jnp.asarray(base().astype(ml.bfloat16))),
    }


def plain_call(fw: str, tgt: str, kind: str) -> tuple[str, Callable[[Any], Any]]:
    """(text, function) of the plain call from a ``fw`` tensor to ``tgt``: the expression
    a user writes, compiled as it is (no helper call in between, so it is not slowed)."""
    f = _frameworks()
    bits = {"bf16": ("int16", "bfloat16"), "float8": ("uint8", "float8_e4m3fn")}
    low = next((v for k, v in bits.items() if k in kind), None)
    if fw == "numpy":
        host = "x"
    elif fw == "torch":
        host = (
            "x.detach().cpu().numpy()"
            if low is None
            else f"x.detach().cpu().view(torch.{low[0]}).numpy().view(ml.{low[1]})"
        )
    elif fw == "tf":
        host = "x.numpy()"
    else:  # jax: torch wants writable memory, so the plain call copies
        host = "np.array(x)" if tgt == "torch" else "np.asarray(x)"
    if tgt == "numpy":
        expr = host
    elif tgt == "torch":
        expr = (
            f"torch.from_numpy({host})"
            if low is None
            else f"torch.from_numpy({host}.view(np.{low[0]})).view(torch.{low[1]})"
        )
    elif tgt == "tf":
        expr = f"tf.convert_to_tensor({host})"
    else:
        expr = f"jnp.asarray({host})"
    env = {"np": f["np"], "torch": f["torch"], "tf": f["tf"], "jnp": f["jnp"], "ml": f["ml"]}
    return expr, eval(f"lambda x: {expr}", env)  # noqa: S307 - our own fixed expressions


def _tb_name(tgt: str) -> str:
    return {"numpy": "numpy", "torch": "torch", "tf": "tensorflow", "jax": "jax"}[tgt]


def case_routes_small(args: argparse.Namespace) -> list[dict]:
    from run import row, time_pair

    import tensorbridge as tb

    f = _frameworks()
    np, torch, jnp = f["np"], f["torch"], f["jnp"]
    rows = []
    skip = {("torch float8_e4m3fn", "tf")}  # TF has no float8 import from NumPy arrays
    for kind, (fw, make) in sources(SMALL).items():
        x = make()
        for tgt in ("numpy", "torch", "tf", "jax"):
            if tgt == fw or (kind, tgt) in skip:
                continue
            text, plain = plain_call(fw, tgt, kind)
            to = _tb_name(tgt)
            label = f"{kind} -> {tgt}"
            try:
                _check(tb.convert(x, to=to), plain(x), label)
            except Exception as exc:  # a refusal or a mismatch is a finding, not a crash
                rows.append(
                    {
                        "case": "routes_small",
                        "label": label,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                    }
                )
                continue
            t = time_pair(
                lambda x=x, to=to: tb.convert(x, to=to),
                lambda x=x, plain=plain: plain(x),
                repeats=11,
                batch_s=0.005,
            )
            rows.append(
                row("routes_small", label, text, t, target=1.5, route=str(tb.explain(x, to=to)))
            )
    # dtype= casts and copy=True, one tensor
    t32 = torch.from_numpy(np.arange(SMALL, dtype=np.float32))
    g32 = t32.clone().requires_grad_()
    a32 = np.arange(SMALL, dtype=np.float32)
    extra = [
        (
            "torch f32 -> numpy dtype=float16",
            lambda: tb.to_numpy(t32, dtype="float16"),
            "t.detach().cpu().numpy().astype(np.float16)",
            lambda: t32.detach().cpu().numpy().astype(np.float16),
        ),
        (
            "torch requires_grad -> numpy dtype=bfloat16",
            lambda: tb.to_numpy(g32, dtype="bfloat16"),
            "t.detach().cpu().numpy().astype(ml_dtypes.bfloat16)",
            lambda: g32.detach().cpu().numpy().astype(f["ml"].bfloat16),
        ),
        (
            "numpy f32 -> torch dtype=bfloat16",
            lambda: tb.to_torch(a32, dtype="bfloat16"),
            "torch.from_numpy(a).to(torch.bfloat16)",
            lambda: torch.from_numpy(a32).to(torch.bfloat16),
        ),
        (
            "numpy f32 -> jax dtype=float16",
            lambda: tb.to_jax(a32, dtype="float16"),
            "jnp.asarray(a, dtype=jnp.float16)",
            lambda: jnp.asarray(a32, dtype=jnp.float16),
        ),
        (
            "torch f32 -> numpy copy=True",
            lambda: tb.to_numpy(t32, copy=True),
            "t.detach().cpu().numpy().copy()",
            lambda: t32.detach().cpu().numpy().copy(),
        ),
        (
            "numpy f32 -> torch copy=True",
            lambda: tb.to_torch(a32, copy=True),
            "torch.from_numpy(a.copy())",
            lambda: torch.from_numpy(a32.copy()),
        ),
        (
            "torch requires_grad -> numpy copy=True",
            lambda: tb.to_numpy(g32, copy=True),
            "t.detach().cpu().numpy().copy()",
            lambda: g32.detach().cpu().numpy().copy(),
        ),
    ]
    for label, ftb, text, fplain in extra:
        try:
            _check(ftb(), fplain(), label)
        except Exception as exc:
            rows.append(
                {
                    "case": "routes_small",
                    "label": label,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )
            continue
        rows.append(
            row(
                "routes_small",
                label,
                text,
                time_pair(ftb, fplain, repeats=11, batch_s=0.005),
                target=1.5,
            )
        )
    return rows


def _comprehension(expr: str) -> Callable[[Any], Any]:
    """The dict comprehension a user writes around the plain call, compiled as it is."""
    f = _frameworks()
    env = {"np": f["np"], "torch": f["torch"], "tf": f["tf"], "jnp": f["jnp"], "ml": f["ml"]}
    return eval(f"lambda d: {{k: {expr} for k, x in d.items()}}", env)  # noqa: S307


def case_routes_tree(args: argparse.Namespace) -> list[dict]:
    from run import row, time_pair

    import tensorbridge as tb

    f = _frameworks()
    np = f["np"]
    rows = []
    srcs = sources(16)
    n = 1000

    def add(label: str, ftb: Callable[[], Any], text: str, fplain: Callable[[], Any]) -> None:
        try:
            a, b = ftb(), fplain()
            assert list(a) == list(b)
            for k in a:
                _check(a[k], b[k], f"{label} [{k!r}]")
        except Exception as exc:
            rows.append(
                {
                    "case": "routes_tree",
                    "label": label,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )
            return
        rows.append(
            row(
                "routes_tree",
                label,
                text,
                time_pair(ftb, fplain, repeats=7, batch_s=0.03, warmup_s=0.05),
                target=1.5,
                unit="ms",
            )
        )

    # to numpy: every kind, copy=None and copy=True
    for kind in (
        "torch f32",
        "torch requires_grad",
        "torch bf16",
        "torch transposed",
        "tf f32",
        "tf Variable",
        "jax f32",
    ):
        fw, make = srcs[kind]
        d = {f"layer{i}.weight": make() for i in range(n)}
        text, _ = plain_call(fw, "numpy", kind)
        comp = _comprehension(text)
        add(
            f"dict of {n} {kind} -> numpy",
            lambda d=d: tb.to_numpy(d),
            f"{{k: {text}}}",
            lambda d=d, fn=comp: fn(d),
        )
        copy_text = {"torch": f"{text}.copy()", "tf": "x.numpy()", "jax": "np.array(x)"}[fw]
        env = {"np": np, "ml": f["ml"], "torch": f["torch"]}
        copy_comp = eval(f"lambda d: {{k: {copy_text} for k, x in d.items()}}", env)  # noqa: S307
        add(
            f"dict of {n} {kind} -> numpy copy=True",
            lambda d=d: tb.to_numpy(d, copy=True),
            f"{{k: {copy_text}}}",
            lambda d=d, fn=copy_comp: fn(d),
        )
    # from numpy to every framework, and between frameworks
    for kind, tgt in (
        ("numpy f32", "torch"),
        ("numpy f32", "tf"),
        ("numpy f32", "jax"),
        ("numpy bf16", "torch"),
        ("torch f32", "jax"),
        ("tf f32", "torch"),
        ("jax f32", "torch"),
        ("torch requires_grad", "tf"),
    ):
        fw, make = srcs[kind]
        d = {f"layer{i}.weight": make() for i in range(n)}
        text, _ = plain_call(fw, tgt, kind)
        comp = _comprehension(text)
        to = _tb_name(tgt)
        add(
            f"dict of {n} {kind} -> {tgt}",
            lambda d=d, to=to: tb.convert(d, to=to),
            f"{{k: {text}}}",
            lambda d=d, fn=comp: fn(d),
        )
    torch = f["torch"]
    d = {f"layer{i}.weight": srcs["numpy f32"][1]() for i in range(n)}
    add(
        f"dict of {n} numpy f32 -> torch copy=True",
        lambda: tb.to_torch(d, copy=True),
        "{k: torch.from_numpy(a.copy())}",
        lambda: {k: torch.from_numpy(v.copy()) for k, v in d.items()},
    )
    return rows


def case_routes_large(args: argparse.Namespace) -> list[dict]:
    from run import row, time_pair

    import tensorbridge as tb

    f = _frameworks()
    np, torch, tf, jnp = f["np"], f["torch"], f["tf"], f["jnp"]
    big_n, small_n = 64 * MiB // 4, MiB // 4
    rows = []

    def pair(
        label: str,
        ftb: Callable[[], Any],
        text: str,
        fplain: Callable[[], Any],
        target: float,
        ttext: str,
        check: bool = True,
    ) -> None:
        try:
            if check:
                _check(ftb(), fplain(), label)
        except Exception as exc:
            rows.append(
                {
                    "case": "routes_large",
                    "label": label,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )
            return
        rows.append(
            row(
                "routes_large",
                label,
                text,
                time_pair(ftb, fplain, repeats=7, batch_s=0.05, warmup_s=0.2),
                target=target,
                target_text=ttext,
                unit="ms",
            )
        )

    def arr(n: int) -> Any:  # 64-byte aligned, as torch/TF/JAX allocate (DLPack imports need it)
        out = torch.empty(n, dtype=torch.float32).numpy()
        out[...] = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
        return out

    def unaligned(n: int) -> Any:
        buf = torch.empty(n + 1, dtype=torch.float32).numpy()[1:]
        buf[...] = 1.0
        return buf

    def ready(y: Any) -> Any:  # JAX dispatches asynchronously: time the finished work
        return y.block_until_ready() if hasattr(y, "block_until_ready") else y

    # zero-copy routes: 64 MiB against 1 MiB through the same call (O(1): ~1x)
    zc = [
        ("torch -> numpy", lambda n: torch.from_numpy(arr(n)), "numpy"),
        (
            "torch requires_grad -> numpy",
            lambda n: torch.from_numpy(arr(n)).requires_grad_(),
            "numpy",
        ),
        ("numpy -> torch", arr, "torch"),
        ("tf -> numpy", lambda n: tf.constant(arr(n)), "numpy"),
        ("jax -> numpy", lambda n: jnp.asarray(arr(n)), "numpy"),
        ("torch -> jax", lambda n: torch.from_numpy(arr(n)), "jax"),
        ("torch -> tf", lambda n: torch.from_numpy(arr(n)), "tensorflow"),
        ("numpy -> jax", arr, "jax"),
        ("numpy -> tf", arr, "tensorflow"),
        ("tf -> jax", lambda n: tf.constant(arr(n)), "jax"),
    ]
    for label, make, to in zc:
        big, small = make(big_n), make(small_n)
        plan = tb.explain(big, to=to)
        if plan.copies:
            rows.append(
                {
                    "case": "routes_large",
                    "label": f"{label} (64 MiB vs 1 MiB)",
                    "info": True,
                    "note": "copies: " + str(plan),
                }
            )
            continue
        pair(
            f"{label} 64 MiB (zero-copy)",
            lambda b=big, to=to: ready(tb.convert(b, to=to)),
            "same call on 1 MiB",
            lambda s=small, to=to: ready(tb.convert(s, to=to)),
            1.5,
            "~1x (<= 1.5x)",
            check=False,
        )
    # copies against the fastest plain copy
    a = arr(big_n)
    t = torch.from_numpy(arr(big_n))
    tt = torch.from_numpy(arr(big_n)).reshape(4096, -1).T
    x = tf.constant(arr(big_n))
    j = jnp.asarray(arr(big_n))
    ro = arr(big_n)
    ro.flags.writeable = False
    ua = unaligned(big_n)
    copies = [
        (
            "torch -> numpy copy=True",
            lambda: tb.to_numpy(t, copy=True),
            "t.numpy().copy()",
            lambda: t.numpy().copy(),
        ),
        (
            "numpy -> torch copy=True",
            lambda: tb.to_torch(a, copy=True),
            "torch.from_numpy(a.copy())",
            lambda: torch.from_numpy(a.copy()),
        ),
        (
            "torch transposed -> numpy copy=True",
            lambda: tb.to_numpy(tt, copy=True),
            "t.numpy().copy()",
            lambda: tt.numpy().copy(),
        ),
        (
            "jax -> numpy copy=True",
            lambda: tb.to_numpy(j, copy=True),
            "np.array(j)",
            lambda: np.array(j),
        ),
        (
            "tf -> numpy copy=True",
            lambda: tb.to_numpy(x, copy=True),
            "x.numpy()",
            lambda: x.numpy(),
        ),
        (
            "read-only numpy -> torch",
            lambda: tb.to_torch(ro),
            "torch.from_numpy(a.copy())",
            lambda: torch.from_numpy(ro.copy()),
        ),
        (
            "numpy reversed -> torch",
            lambda: tb.to_torch(a[::-1]),
            "torch.from_numpy(np.ascontiguousarray(a[::-1]))",
            lambda: torch.from_numpy(np.ascontiguousarray(a[::-1])),
        ),
        (
            "jax -> torch",
            lambda: tb.to_torch(j),
            "torch.from_numpy(np.array(j))",
            lambda: torch.from_numpy(np.array(j)),
        ),
        (
            "numpy -> jax copy=True",
            lambda: ready(tb.to_jax(a, copy=True)),
            "jnp.array(a, copy=True)",
            lambda: ready(jnp.array(a, copy=True)),
        ),
        (
            "unaligned numpy -> jax",
            lambda: ready(tb.to_jax(ua)),
            "jnp.asarray(a)",
            lambda: ready(jnp.asarray(ua)),
        ),
        (
            "unaligned numpy -> tf",
            lambda: tb.to_tf(ua),
            "tf.convert_to_tensor(a)",
            lambda: tf.convert_to_tensor(ua),
        ),
        (
            "torch -> numpy dtype=float16",
            lambda: tb.to_numpy(t, dtype="float16"),
            "t.numpy().astype(np.float16)",
            lambda: t.numpy().astype(np.float16),
        ),
    ]
    for label, ftb, text, fplain in copies:
        pair(f"{label} 64 MiB", ftb, text, fplain, 1.1, "<= 1.1x")
    return rows


def case_files_io(args: argparse.Namespace) -> list[dict]:
    """tb.save / tb.load of a 64 MiB state dict (16 tensors of 4 MiB), and tb.save of one
    array of 1, 4 and 64 MiB to .npy, beside each format's reference writer and reader, in
    one process, page cache warm. Durable writes (fsync + rename) are tensorbridge's; the
    references do not fsync. Each timed write starts with the disk idle (``os.sync()``
    before it, untimed). For each write, the share of its time spent inside ``os.fsync``
    (file and directory), and for .npy the disk's own floor: one ``os.write`` of the same
    bytes into a new file plus ``fsync``."""
    import contextlib
    import os
    import statistics
    import tempfile
    import time

    import h5py
    import numpy as np
    import safetensors.numpy as stn
    import safetensors.torch as stt
    import torch
    from run import row, time_pair

    import tensorbridge as tb

    rng = np.random.default_rng(0)
    sd = {
        f"layers.{i}.weight": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(16)
    }
    tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
    arrays = {m: rng.standard_normal(m * MiB // 4, dtype=np.float32) for m in (1, 4, 64)}
    work = tempfile.mkdtemp(
        prefix="tb-bench-io-", dir=args.workdir if os.path.isdir(args.workdir) else None
    )
    rows = []

    def pair(
        label: str,
        ftb: Callable[[], Any],
        text: str,
        fplain: Callable[[], Any],
        target: float | None,
        repeats: int = 5,
    ) -> None:
        try:
            ftb()
            fplain()
            t = time_pair(ftb, fplain, repeats=repeats, batch_s=0.05, warmup_s=0.1)
        except Exception as exc:
            rows.append(
                {"case": "files_io", "label": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
            )
            return
        rows.append(row("files_io", label, text, t, target=target, unit="ms"))

    def p(name: str) -> str:
        return os.path.join(work, name)

    def write_pair(
        label: str,
        ftb: Callable[[], Any],
        text: str,
        fplain: Callable[[], Any],
        target: float | None,
        repeats: int = 9,
    ) -> None:
        """One call of each per repeat, in alternating order, each started with the disk
        idle: ``os.sync()`` (untimed) first, so that neither pays for the other's
        writeback (the references leave their bytes dirty in the page cache, and the
        kernel writes them out while the next call runs)."""
        ta: list[int] = []
        tp: list[int] = []
        try:
            ftb()
            fplain()
            for r in range(repeats):
                for fn, out in ((ftb, ta), (fplain, tp)) if r % 2 else ((fplain, tp), (ftb, ta)):
                    os.sync()
                    t0 = time.perf_counter_ns()
                    fn()
                    out.append(time.perf_counter_ns() - t0)
        except Exception as exc:
            rows.append(
                {"case": "files_io", "label": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
            )
            return
        t = {
            "a_ns": statistics.median(ta),
            "b_ns": statistics.median(tp),
            "ratio": statistics.median(a / b for a, b in zip(ta, tp, strict=True)),
            "number": 1,
            "repeats": repeats,
        }
        rows.append(row("files_io", label, text, t, target=target, unit="ms"))

    def fsync_share(label: str, save: Callable[[], Any], runs: int = 9) -> None:
        """Time inside os.fsync against the whole save, per run (median of ``runs``)."""
        real = os.fsync
        spent: list[int] = []

        def timed(fd: int) -> None:
            t0 = time.perf_counter_ns()
            try:
                real(fd)
            finally:
                spent.append(time.perf_counter_ns() - t0)

        fs, whole, share = [], [], []
        os.fsync = timed
        try:
            for _ in range(runs):
                os.sync()  # the disk idle at the start, as in write_pair
                spent.clear()
                t0 = time.perf_counter_ns()
                save()
                dt = time.perf_counter_ns() - t0
                fs.append(sum(spent))
                whole.append(dt)
                share.append(sum(spent) / dt)
        finally:
            os.fsync = real
        t = {
            "a_ns": statistics.median(fs),
            "b_ns": statistics.median(whole),
            "ratio": statistics.median(share),
            "number": 1,
            "repeats": runs,
        }
        rows.append(row("files_io", f"fsync inside {label}", label, t, target=None, unit="ms"))

    def durable_floor(name: str, a: np.ndarray) -> Callable[[], None]:
        """What ``dd conv=fsync`` does: one write of the bytes into a new file, one fsync."""
        view = memoryview(a).cast("B")

        def run() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p(name))
            fd = os.open(p(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)

        return run

    def made_durable(write: Callable[[str], Any], path: str) -> Callable[[], None]:
        """The reference writer given what a durable, atomic save does: write a temporary
        file, fsync it, rename it over ``path``, fsync the directory."""
        stem, ext = os.path.splitext(path)
        tmp = f"{stem}.tmp{ext}"

        def run() -> None:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

        return run

    # writes: tb.save (durable) against the reference writer, then fsync's share of it
    writes: list[tuple[str, Callable[[], Any], str, Callable[[], Any], float]] = [
        (
            "tb.save .safetensors",
            lambda: tb.save(tsd, p("a.safetensors")),
            "safetensors.torch.save_file",
            lambda: stt.save_file(tsd, p("b.safetensors")),
            1.3,
        ),
        (
            "tb.save .pt",
            lambda: tb.save(tsd, p("a.pt")),
            "torch.save",
            lambda: torch.save(tsd, p("b.pt")),
            1.3,
        ),
    ]

    def h5_write() -> None:
        with h5py.File(p("b.h5"), "w") as f:
            for k, v in sd.items():
                f.create_dataset(k, data=v)

    small = {f"layers.{i}.bias": rng.standard_normal(16, dtype=np.float32) for i in range(1000)}

    def h5_write_small() -> None:
        with h5py.File(p("b-small.h5"), "w") as f:
            for k, v in small.items():
                f.create_dataset(k, data=v)

    writes.append(
        (
            "tb.save .h5",
            lambda: tb.save(sd, p("a.h5")),
            "h5py create_dataset per tensor",
            h5_write,
            1.2,
        )
    )
    writes.append(
        (
            "tb.save .h5, 1000 datasets of 16 floats",
            lambda: tb.save(small, p("a-small.h5")),
            "h5py create_dataset per tensor",
            h5_write_small,
            1.2,
        )
    )
    for m, a in arrays.items():
        writes.append(
            (
                f"tb.save .npy {m} MiB",
                lambda a=a, m=m: tb.save(a, p(f"a{m}.npy")),
                "np.save",
                lambda a=a, m=m: np.save(p(f"b{m}.npy"), a),
                1.3,
            )
        )
    for label, ftb, text, fplain, target in writes:
        write_pair(label, ftb, text, fplain, target)
        fsync_share(label, ftb)
    for m, a in arrays.items():  # the same work: the reference made as durable
        write_pair(
            f"tb.save .npy {m} MiB against a durable np.save",
            lambda a=a, m=m: tb.save(a, p(f"a{m}.npy")),
            "np.save + fsync, rename, directory fsync",
            made_durable(lambda q, a=a: np.save(q, a), p(f"d{m}.npy")),
            1.3,
        )
    for m, a in arrays.items():
        write_pair(
            f"os.write + fsync {m} MiB (the disk's floor)",
            durable_floor(f"c{m}.bin", a),
            "np.save",
            lambda a=a, m=m: np.save(p(f"b{m}.npy"), a),
            None,
        )
    np.save(p("b.npy"), sd["layers.0.weight"])  # what the reads below read (4 MiB)
    h5_write()

    # reads
    pair(
        "tb.load .safetensors to=torch",
        lambda: tb.load(p("b.safetensors"), to="torch"),
        "safetensors.torch.load_file",
        lambda: stt.load_file(p("b.safetensors")),
        1.2,
    )
    pair(
        "tb.load .safetensors to=numpy",
        lambda: tb.load(p("b.safetensors")),
        "safetensors.numpy.load_file",
        lambda: stn.load_file(p("b.safetensors")),
        1.2,
    )
    pair(
        "tb.load .npy",
        lambda: tb.load(p("b.npy")),
        "np.load(mmap_mode='r')",
        lambda: np.load(p("b.npy"), mmap_mode="r"),
        1.2,
    )
    pair(
        "tb.load .pt to=torch",
        lambda: tb.load(p("b.pt"), to="torch"),
        "torch.load(weights_only=True, mmap=True)",
        lambda: torch.load(p("b.pt"), weights_only=True, mmap=True),
        1.2,
    )

    def h5_read() -> dict:
        with h5py.File(p("b.h5"), "r") as f:
            return {k: f[k][()] for k in f}

    pair("tb.load .h5", lambda: tb.load(p("b.h5")), "h5py f[k][()] per dataset", h5_read, 1.2)

    # small files: what a load costs besides the bytes (a LoRA-sized file, one 4 KiB array)
    small = {"a": rng.standard_normal(1024, dtype=np.float32), "b": sd["layers.1.weight"][0]}
    stn.save_file(small, p("s.safetensors"))
    np.save(p("s.npy"), small["a"])
    pair(
        "tb.load small .safetensors (2 tensors, 8 KiB) to=numpy",
        lambda: tb.load(p("s.safetensors")),
        "safetensors.numpy.load_file",
        lambda: stn.load_file(p("s.safetensors")),
        1.2,
        repeats=11,
    )
    pair(
        "tb.load small .safetensors (2 tensors, 8 KiB) to=torch",
        lambda: tb.load(p("s.safetensors"), to="torch"),
        "safetensors.torch.load_file",
        lambda: stt.load_file(p("s.safetensors")),
        1.2,
        repeats=11,
    )
    pair(
        "tb.load small .npy (4 KiB)",
        lambda: tb.load(p("s.npy")),
        "np.load",
        lambda: np.load(p("s.npy")),
        1.2,
        repeats=11,
    )
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return rows


CASES = {
    "files_io": case_files_io,
    "routes_small": case_routes_small,
    "routes_tree": case_routes_tree,
    "routes_large": case_routes_large,
}
