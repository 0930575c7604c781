"""What a user's type checker sees (checked by mypy, listed in pyproject.toml; never run).

The return type follows the argument: arrays and scalars come back as the target's array
type, dicts/lists/tuples as themselves, anything else as Any. An argument whose own type
holds Any (a NumPy array: its shape is typed Any) matches both a precise overload and the
catch-all, and mypy then answers Any: never wrong, only less precise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from typing_extensions import assert_type

import tensorbridge as tb
from tensorbridge.convert import TreePlan
from tensorbridge.plan import Plan


@dataclass
class Batch:
    x: Any


def check(a: np.ndarray, batch: Batch) -> None:
    import jax
    import torch

    t = torch.ones(2)
    params = {"w": t}
    assert_type(tb.to_numpy(t), np.ndarray)
    assert_type(tb.to_numpy(1.5), np.ndarray)
    assert_type(tb.to_numpy(True), np.ndarray)
    assert_type(tb.to_numpy(params), dict[str, Any])
    assert_type(tb.to_numpy([t, t]), list[Any])
    assert_type(tb.to_numpy((t, 2)), tuple[Any, ...])
    assert_type(tb.to_numpy(batch), Any)  # a dataclass is a container, never "an array"
    assert_type(tb.to_numpy(a), Any)  # see above
    assert_type(tb.to_torch(2), torch.Tensor)
    assert_type(tb.to_jax(t), jax.Array)
    assert_type(tb.convert(t, to="numpy"), np.ndarray)
    assert_type(tb.convert(t, to="jax"), jax.Array)
    assert_type(tb.convert(1.5, to="torch"), torch.Tensor)
    assert_type(tb.convert(t, to="tensorflow"), Any)
    assert_type(tb.convert(params, to="jax"), dict[str, Any])
    assert_type(tb.explain(t, to="numpy"), Plan)
    assert_type(tb.explain(params, to="numpy"), TreePlan)
    assert_type(tb.shares_memory(a, t), bool)
    with tb.open("model.safetensors") as reader:
        assert_type(reader.read("w"), np.ndarray)


def check_devices(a: np.ndarray, path: str) -> None:
    """``device=`` takes what docs/guide.md ("Devices") lists: strings, CUDA indices,
    framework device objects."""
    import jax
    import torch

    t = torch.ones(2)
    assert_type(tb.to_torch(t, device=torch.device("cpu")), torch.Tensor)
    assert_type(tb.to_torch(t, device=0), torch.Tensor)
    assert_type(tb.to_jax(t, device=jax.devices()[0]), jax.Array)
    assert_type(tb.convert(t, to="torch", device=torch.device("cpu")), torch.Tensor)
    assert_type(tb.explain(t, to="torch", device=0), Plan)
    tb.to_tf(a, device=0)
    tb.load(path, to="torch", device=torch.device("cpu"))


def check_dtypes(a: np.ndarray) -> None:
    """``dtype=`` takes canonical names and framework dtype objects (docs/guide.md)."""
    import torch

    t = torch.ones(2)
    assert_type(tb.to_torch(t, dtype=torch.float16), torch.Tensor)
    assert_type(tb.to_torch(t, dtype="bfloat16"), torch.Tensor)
    assert_type(tb.convert(t, to="torch", dtype=torch.bfloat16), torch.Tensor)
    tb.to_numpy(t, dtype=np.float16)
    tb.to_numpy(t, dtype=np.dtype("float32"))
    tb.explain(t, to="numpy", dtype=np.float16)
