"""The type information shipped with tensorbridge matches what runs.

``_api.pyi`` declares the overloads type checkers see for the conversion functions;
``tensorbridge/convert.py`` holds the functions that run. Their parameters (names,
kinds, defaults, annotations) must agree, or a user's type checker would accept calls
that fail, or refuse calls that work. (``mypy`` checks ``tests/typing_api.py`` against
the overloads themselves.)
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import tensorbridge

runtime = importlib.import_module("tensorbridge.convert")  # (tensorbridge.convert is the function)

STUB = Path(tensorbridge.__file__).with_name("_api.pyi")


def _stub_functions() -> dict[str, ast.FunctionDef]:
    """The last declaration of each function in the stub: the catch-all overload."""
    tree = ast.parse(STUB.read_text())
    out: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
    return out


def _params(fn: ast.FunctionDef) -> list[tuple[str, str, str | None, str | None]]:
    a = fn.args
    rows = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        rows.append(
            (
                arg.arg,
                kind,
                repr(ast.literal_eval(default)) if default else None,
                ast.unparse(arg.annotation) if arg.annotation else None,
            )
        )
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        rows.append(
            (
                arg.arg,
                "KEYWORD_ONLY",
                repr(ast.literal_eval(default)) if default else None,
                ast.unparse(arg.annotation) if arg.annotation else None,
            )
        )
    return rows


def _runtime_params(fn) -> list[tuple[str, str, str | None, str | None]]:
    rows = []
    for p in inspect.signature(fn).parameters.values():
        default = None if p.default is p.empty else repr(p.default)
        rows.append(
            (p.name, p.kind.name, default, None if p.annotation is p.empty else str(p.annotation))
        )
    return rows


STUBBED = [
    "convert",
    "to_numpy",
    "to_torch",
    "to_tensorflow",
    "to_tf",
    "to_jax",
    "to_cupy",
    "to_mlx",
    "explain",
]


def test_the_stub_declares_exactly_the_functions_imported_from_it():
    assert sorted(_stub_functions()) == sorted(STUBBED)
    assert STUB.with_name("py.typed").is_file()


@pytest.mark.parametrize("name", STUBBED)
def test_stub_and_runtime_signatures_agree(name):
    stub = _params(_stub_functions()[name])
    real = _runtime_params(getattr(runtime, name))
    # the first parameter is typed per overload in the stub (Any in the catch-all)
    assert [r[:3] for r in stub] == [r[:3] for r in real], (
        f"{name}: update src/tensorbridge/_api.pyi to the signature in convert.py"
    )
    assert stub[1:] == real[1:], f"{name}: update the annotations in src/tensorbridge/_api.pyi"
    assert getattr(tensorbridge, name) is getattr(runtime, name)  # what runs is convert.py's
