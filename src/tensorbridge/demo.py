"""``tensorbridge demo``: the classic "PyTorch tensor to NumPy" tutorial, told correctly.

Every step runs with the real frameworks that are installed and says what
happened, including whether memory is shared (proven with
:func:`tensorbridge.shares_memory`). Steps whose framework is missing print a
``skipped:`` line. It ends by exporting a small dataset with
:class:`tensorbridge.Writer` to an ``.npz``, reading it back with plain
``np.load(allow_pickle=False)``, and showing ``tensorbridge inspect`` on it.

>>> import tempfile
>>> lines = []
>>> summary = run(lines.append, out_dir=tempfile.mkdtemp(), frameworks=("numpy",))
>>> summary["failed"]
[]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import textwrap
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from .native_stderr import held

__all__ = ["run", "main"]

Out = Callable[[str], Any]


class _Skip(Exception):
    """A step cannot run here; the message says why."""


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _show(x: Any) -> str:
    return textwrap.indent(str(x), "    ")


def _shared(a: Any, b: Any) -> str:
    import tensorbridge as tb

    return "memory SHARED (zero-copy)" if tb.shares_memory(a, b) else "memory NOT shared (a copy)"


class _Demo:
    def __init__(self, out: Out, have: dict[str, bool], out_dir: str | None) -> None:
        self.out = out
        self.have = have
        self.out_dir = out_dir
        self.number = 0
        self.summary: dict[str, Any] = {"ran": [], "skipped": [], "failed": [], "npz": None}

    def need(self, *names: str) -> None:
        missing = [n for n in names if not self.have.get(n)]
        if missing:
            raise _Skip(
                f"{' and '.join(missing)} not installed (pip install 'tensorbridge[{missing[0]}]')"
            )

    def step(self, title: str, fn: Callable[[], None]) -> None:
        self.number += 1
        self.out("")
        self.out(f"== {self.number}. {title} ==")
        try:
            fn()
        except _Skip as exc:
            self.out(f"skipped: {exc}")
            self.summary["skipped"].append(title)
        except Exception as exc:  # a demo step must never take the others down
            self.out(f"FAILED: {type(exc).__name__}: {exc}")
            self.summary["failed"].append(title)
        else:
            self.summary["ran"].append(title)

    # --- the steps ----------------------------------------------------------------
    def tensorflow_multiply(self) -> None:
        import tensorbridge as tb

        array_numpy = np.ones([4, 4])
        self.out(">>> array_numpy = np.ones([4, 4])")
        self.need("tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with held():  # TensorFlow's C++ start-up banners; shown if it fails
            import tensorflow as tf

            t = tf.multiply(array_numpy, 5)
        self.out(">>> t = tf.multiply(array_numpy, 5)")
        self.out(_show(t))
        back = tb.to_numpy(t)
        self.out(">>> back = tb.to_numpy(t)")
        self.out(
            f"back: {back.dtype}{list(back.shape)}, every value 5: {bool((back == 5).all())}; "
            f"{_shared(back, t)} with the TF tensor "
            f"({'read-only, as TF tensors are immutable' if not back.flags.writeable else 'writable'})"
        )

    def shared_surprise(self) -> None:
        self.need("torch")
        import torch

        import tensorbridge as tb

        x = torch.ones((3, 6))
        a = tb.to_numpy(x)
        a[0][0] = 20
        self.out(">>> x = torch.ones((3, 6)); a = tb.to_numpy(x); a[0][0] = 20")
        self.out(
            f"x[0][0] is now {x[0][0].item():g}: {_shared(a, x)}. Writing into the array "
            "wrote into the tensor, exactly as x.numpy() does."
        )
        y = torch.ones((3, 6))
        b = tb.to_numpy(y, copy=True)
        b[0][0] = 20
        self.out(">>> y = torch.ones((3, 6)); b = tb.to_numpy(y, copy=True); b[0][0] = 20")
        self.out(
            f"y[0][0] is still {y[0][0].item():g}: {_shared(b, y)}. copy=True gives "
            "independent memory (the tutorial's numpy_x.copy(), in one call)."
        )

    def requires_grad(self) -> None:
        self.need("torch")
        import torch

        import tensorbridge as tb

        x = torch.ones((3, 6), requires_grad=True)
        try:
            x.numpy()
            plain = "works"
        except RuntimeError as exc:
            plain = f"raises RuntimeError ({str(exc).split('.')[0]})"
        self.out(">>> x = torch.ones((3, 6), requires_grad=True)")
        self.out(f"x.numpy() {plain}.")
        a = tb.to_numpy(x)
        self.out(">>> a = tb.to_numpy(x)   # no .detach() needed")
        self.out(
            f"a: {a.dtype}{list(a.shape)}, {_shared(a, x)}. It is the detached data: "
            "use copy=True before writing into it, or autograd sees changed values."
        )

    def three_d(self) -> None:
        self.need("torch")
        import torch

        import tensorbridge as tb

        g = torch.Generator().manual_seed(0)
        integers_tensor = (torch.rand(5, 7, 9, generator=g) * 100).int()
        float_tensor = torch.rand(5, 7, 9, generator=g) * 100
        for label, t in (
            ("(torch.rand(5, 7, 9) * 100).int()", integers_tensor),
            ("torch.rand(5, 7, 9) * 100", float_tensor),
        ):
            a = tb.to_numpy(t)
            exact = a.tobytes() == t.numpy().tobytes()
            self.out(f">>> a = tb.to_numpy({label})")
            self.out(
                f"a.shape={a.shape}, a.dtype={a.dtype} (torch {str(t.dtype)[6:]}), "
                f"bit-exact: {exact}, {_shared(a, t)}"
            )

    def one_and_two_d(self) -> None:
        self.need("torch")
        import torch

        import tensorbridge as tb

        p = torch.tensor([14.23, 75.39, 50.00, 25.73, 10.84])
        q = torch.tensor([[12, 54, 72, 8], [90, 65, 43, 5], [32, 61, 53, 2]])
        for label, t in (("1-D", p), ("2-D", q)):
            a = tb.to_numpy(t)
            self.out(f">>> tb.to_numpy({label} tensor)")
            self.out(_show(repr(a)))
            self.out(f"{a.dtype}{list(a.shape)}, {_shared(a, t)}")

    def numpy_array(self) -> None:
        self.need("torch")
        import torch

        import tensorbridge as tb

        p = torch.tensor([[12, 54, 72, 8], [90, 65, 43, 5], [32, 61, 53, 2]])
        with warnings.catch_warnings():
            # NumPy 2 warns that torch's __array__ lacks the copy= keyword; harmless here
            warnings.simplefilter("ignore", DeprecationWarning)
            copied = np.array(p)
        viewed = tb.to_numpy(p)
        self.out(">>> copied = numpy.array(p); viewed = tb.to_numpy(p)")
        self.out(
            f"numpy.array(p): {_shared(copied, p)}; numpy.array always copies "
            "(numpy.asarray(p) would share)."
        )
        self.out(
            f"tb.to_numpy(p): {_shared(viewed, p)}; tb.to_numpy(p, copy=True) copies "
            "when you want that."
        )

    def from_numpy_to_device(self) -> None:
        self.need("torch")
        import torch

        import tensorbridge as tb

        a = np.arange(12, dtype=np.float32).reshape(3, 4)
        t = tb.to_torch(a)
        self.out(">>> t = tb.to_torch(a)   # torch.from_numpy, without the pitfalls")
        self.out(f"t: {t.dtype} on {t.device}, {_shared(a, t)}")
        flipped = a[::-1]
        self.out(">>> tb.to_torch(a[::-1])  # torch.from_numpy refuses negative strides")
        self.out(
            f"works: first row {tb.to_torch(flipped)[0].tolist()}, "
            f"{_shared(flipped, tb.to_torch(flipped))}"
        )
        if not torch.cuda.is_available():
            self.out(
                "skipped: no CUDA device, so tb.to_torch(a, device='cuda') and the "
                "CUDA -> NumPy path were not run"
            )
            return
        self.out(str(tb.explain(a, to="torch", device="cuda")))
        c = tb.to_torch(a, device="cuda")
        self.out(
            f">>> c = tb.to_torch(a, device='cuda')\nc on {c.device}; back on the host "
            f"bit-exact: {tb.to_numpy(c).tobytes() == a.tobytes()}"
        )
        c2 = torch.ones((3, 6), device="cuda", requires_grad=True)
        h = tb.to_numpy(c2)
        self.out(">>> tb.to_numpy(torch.ones((3, 6), device='cuda', requires_grad=True))")
        self.out(
            f"{h.dtype}{list(h.shape)} on the host (no .detach().cpu() needed), {_shared(h, c2)}"
        )

    def bfloat16(self) -> None:
        self.need("torch")
        import torch

        import tensorbridge as tb

        t = torch.tensor([1.5, -2.25, 3.0e38, float("nan")], dtype=torch.bfloat16)
        try:
            t.numpy()
            plain = "works"
        except TypeError as exc:
            plain = f"raises TypeError ({exc})"
        self.out(">>> t = torch.tensor([1.5, -2.25, 3e38, nan], dtype=torch.bfloat16)")
        self.out(f"t.numpy() {plain}")
        a = tb.to_numpy(t)
        exact = a.view(np.uint16).tobytes() == t.view(torch.int16).numpy().tobytes()
        self.out(
            f">>> a = tb.to_numpy(t)\na.dtype={a.dtype} (ml_dtypes), bit-exact: {exact}, "
            f"{_shared(a, t)}"
        )

    def dataset(self) -> None:
        import tensorbridge as tb

        if self.have.get("torch"):
            import torch
            import torch.nn as t_nn

            torch.manual_seed(0)
            a = torch.distributions.Uniform(low=-2, high=2).sample((4, 2))
            fun = t_nn.Sequential(OrderedDict([("fun1", t_nn.Linear(2, 2)), ("out", t_nn.SELU())]))
            b = fun(a)
            self.out(
                ">>> a = Uniform(-2, 2).sample((4, 2)); "
                "b = Sequential(fun1=Linear(2, 2), out=SELU())(a)"
            )
            self.out(
                f"b.requires_grad={b.requires_grad}: tb.Writer and tb.to_numpy take it as "
                "it is, no .detach().cpu().numpy()"
            )
            a_np, b_np = tb.to_numpy(a), tb.to_numpy(b)
            # torch tensors go in directly
            batches: list[tuple[Any, Any]] = [(a[:2], b[:2]), (a[2:], b[2:])]
        else:
            self.out("torch not installed: the same model in NumPy (Linear(2, 2) -> SELU)")
            rng = np.random.default_rng(0)
            a_np = rng.uniform(-2, 2, size=(4, 2)).astype(np.float32)
            w = rng.uniform(-0.7, 0.7, size=(2, 2)).astype(np.float32)
            bias = rng.uniform(-0.7, 0.7, size=2).astype(np.float32)
            z = a_np @ w.T + bias
            alpha, scale = 1.6732632423543772, 1.0507009873554805
            b_np = (scale * np.where(z > 0, z, alpha * np.expm1(z))).astype(np.float32)
            batches = [(a_np[:2], b_np[:2]), (a_np[2:], b_np[2:])]
        directory = self.out_dir or tempfile.mkdtemp(prefix="tensorbridge-demo-")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "db.npz")
        with tb.Writer(path) as writer:
            for a_batch, b_batch in batches:  # two batches, as a training loop would
                writer.append(a=a_batch, b=b_batch)
        self.out(f">>> with tb.Writer({path!r}) as w: w.append(a=..., b=...)  # two batches")
        with np.load(path, allow_pickle=False) as f:
            same = f["a"].tobytes() == a_np.tobytes() and f["b"].tobytes() == b_np.tobytes()
            self.out(
                f">>> np.load(path, allow_pickle=False): keys {sorted(f.files)}, "
                f"equal to what was written: {same}"
            )
        if not same:
            raise AssertionError("the .npz did not read back equal")
        self.out(_show(repr(a_np)))
        import io

        from .cli.inspect_cmd import inspect_file, render_text

        buf = io.StringIO()
        render_text(inspect_file(path, stats=True), buf)
        self.out(f"$ tensorbridge inspect --stats {path}")
        for line in buf.getvalue().rstrip("\n").split("\n"):
            self.out(line)
        self.summary["npz"] = path
        if self.out_dir is None:
            self.out(f"(the file is kept in {directory}; pass --out DIR to choose the place)")


def run(
    out: Out = print, *, out_dir: str | None = None, frameworks: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Run every demo step, printing lines through ``out``.

    ``frameworks`` limits which installed frameworks are used (for tests);
    by default every installed one is. Returns ``{"ran", "skipped", "failed",
    "npz", "missing"}``.
    """
    names = ("torch", "tensorflow", "jax", "cupy")
    installed = {n: _installed(n) for n in names}
    have = {n: installed[n] and (frameworks is None or n in frameworks) for n in names}
    import ml_dtypes

    from . import __version__

    out(f"tensorbridge {__version__} demo: PyTorch tensors to NumPy and back, done right")
    out(
        f"python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"ml_dtypes {ml_dtypes.__version__}"
    )
    missing = [n for n in names if not have[n]]
    out("frameworks used: " + ", ".join(["numpy"] + [n for n in names if have[n]]))
    if missing:
        out("not available (their steps are skipped): " + ", ".join(missing))
    demo = _Demo(out, have, out_dir)
    demo.step("np.ones([4, 4]) multiplied by 5 in TensorFlow", demo.tensorflow_multiply)
    demo.step("the shared-memory surprise, and copy=True", demo.shared_surprise)
    demo.step("a tensor that requires grad", demo.requires_grad)
    demo.step("int and float 3-D tensors", demo.three_d)
    demo.step("1-D and 2-D tensors", demo.one_and_two_d)
    demo.step("numpy.array(tensor) versus tb.to_numpy", demo.numpy_array)
    demo.step("from NumPy to torch, and to a device", demo.from_numpy_to_device)
    demo.step("bfloat16, which tensor.numpy() cannot do", demo.bfloat16)
    demo.step("export a small dataset with tb.Writer, read it back", demo.dataset)
    s = demo.summary
    out("")
    out(f"done: {len(s['ran'])} steps ran, {len(s['skipped'])} skipped, {len(s['failed'])} failed")
    s["missing"] = missing
    return s


def main(*, out_dir: str | None = None, quiet: bool = False) -> int:
    """``tensorbridge demo``: exit 0 when no step failed, 1 otherwise."""
    from .console import echo

    def out(text: str) -> None:
        if not quiet:
            for line in text.split("\n"):
                echo(line)
            sys.stdout.flush()

    summary = run(out, out_dir=out_dir)
    return 1 if summary["failed"] else 0
