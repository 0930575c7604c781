"""MLX models: an ``mlx.nn.Module`` is a dict of its parameters and submodules. Converted
to another framework it would be a model holding torch tensors or NumPy arrays, which
cannot run, so it is refused with the fix (its ``parameters()``); to MLX and to files it
works as it is."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
mlx_utils = pytest.importorskip("mlx.utils")


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("tgt", ["numpy", "torch"])
def test_a_model_to_another_framework_is_refused_with_the_fix(tgt):
    pytest.importorskip(tgt)
    m = _model()
    with pytest.raises(tb.ConversionError) as e:
        tb.convert({"model": m}, to=tgt)
    text = str(e.value)
    assert text.startswith("at ['model']['layers'][0]: Cannot handle an MLX model")
    assert "Fix: convert its parameters: model.parameters()" in text
    # the fix works, and gives back what model.update() takes
    params = tb.convert(m.parameters(), to=tgt)
    assert tuple(params["layers"][2]["weight"].shape) == (2, 4)
    m2 = _model()
    m2.update(tb.to_mlx(params))
    x = mx.ones((1, 3))
    assert np.array_equal(np.asarray(m2(x)), np.asarray(m(x)))


def test_a_model_to_mlx_is_rebuilt_and_runs():
    m = _model()
    m.layers[0].weight = mx.ones((4, 3), dtype=mx.float64)  # float64 stays float64
    out = tb.to_mlx({"model": m}, copy=True)["model"]
    assert type(out) is type(m) and out is not m
    assert out.layers[0].weight.dtype == mx.float64
    assert not tb.shares_memory(out.layers[2].weight, m.layers[2].weight)
    x = mx.ones((1, 3), dtype=mx.float64)
    assert np.array_equal(np.asarray(out.layers[0](x)), np.asarray(m.layers[0](x)))


def test_a_model_saves_with_mlx_names_and_loads_into_mlx(tmp_path):
    m = _model()
    m.set_dtype(mx.bfloat16)
    p = tmp_path / "m.safetensors"
    tb.save(m, p)
    flat = dict(mlx_utils.tree_flatten(m.parameters()))
    back = tb.load(p, to="mlx")
    assert sorted(back) == sorted(flat)
    for k, v in flat.items():
        assert back[k].dtype == mx.bfloat16 and np.array_equal(
            np.asarray(back[k].view(mx.uint16)), np.asarray(v.view(mx.uint16))
        )
    m2 = _model()
    m2.load_weights(str(p))  # MLX's own loader reads the file
    assert m2.layers[0].weight.dtype == mx.bfloat16
