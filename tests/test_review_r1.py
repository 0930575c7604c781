"""Review findings: containers a new user hands over that the earlier tests did not use."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

import tensorbridge as tb


@dataclasses.dataclass(slots=True)
class _Slotted:
    x: Any
    y: int = 0


def test_slots_dataclass_converts() -> None:
    out = tb.to_numpy(_Slotted(torch.arange(3), 5))
    assert type(out) is _Slotted and out.y == 5
    assert isinstance(out.x, np.ndarray) and out.x.tolist() == [0, 1, 2]


class _Mirrored(dict):
    """Like transformers' ModelOutput: every item is also an instance attribute."""

    def __setitem__(self, k: str, v: Any) -> None:
        super().__setitem__(k, v)
        object.__setattr__(self, k, v)


def test_dict_whose_attributes_mirror_its_items() -> None:
    d = _Mirrored()
    d["logits"] = torch.ones(2)
    d.extra = "kept"
    out = tb.to_numpy(d)
    assert type(out) is _Mirrored and out.extra == "kept"
    assert isinstance(out["logits"], np.ndarray) and out.logits is out["logits"]


def test_an_attribute_not_mirroring_its_item_is_still_refused() -> None:
    d = _Mirrored()
    d["logits"] = torch.ones(2)
    object.__setattr__(d, "logits", torch.zeros(2))  # a different tensor under the same name
    try:
        tb.to_numpy(d)
    except tb.ConversionError as e:
        assert "the attribute 'logits'" in str(e)
    else:
        raise AssertionError("a tensor in an attribute came back unconverted")


def test_transformers_model_output_converts() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    o = BaseModelOutputWithPooling(
        last_hidden_state=torch.ones(1, 2, 3), pooler_output=torch.zeros(1, 3)
    )
    out = tb.to_numpy(o)
    assert type(out) is BaseModelOutputWithPooling and list(out.keys()) == list(o.keys())
    assert isinstance(out.last_hidden_state, np.ndarray) and out[0] is out.last_hidden_state
    assert out.pooler_output is out["pooler_output"] and out.hidden_states is None
    back = tb.to_torch(out)
    assert (
        torch.equal(back.last_hidden_state, o.last_hidden_state) and back[1] is back.pooler_output
    )


def test_empty_npz_reads_as_empty(tmp_path) -> None:
    np.savez(tmp_path / "np.npz")  # numpy writes an archive with no members
    assert tb.load(tmp_path / "np.npz") == {}
    tb.save({}, tmp_path / "tb.npz")
    assert tb.load(tmp_path / "tb.npz") == {}
    with np.load(tmp_path / "tb.npz") as z:
        assert z.files == []


def test_read_slice_names_a_wrong_index_type(tmp_path) -> None:
    import pytest

    p = tmp_path / "x.safetensors"
    tb.save({"a": np.arange(10.0)}, p)
    with tb.open(p) as r:
        for index in (2.0, True, slice(1.0, 2), slice(0, np.float64(3)), "1"):
            with pytest.raises(tb.ConversionError, match="takes an int or a slice of ints"):
                r.read_slice("a", index)
        with pytest.raises(tb.ConversionError, match="out of range"):
            r.read_slice("a", 10)
        assert r.read_slice("a", np.int64(-1)).tolist() == 9.0
        assert r.read_slice("a", slice(np.int32(8), None)).tolist() == [8.0, 9.0]


class _InstanceInterface:
    def __init__(self, a: np.ndarray) -> None:
        self.__array_interface__ = a.__array_interface__
        self._a = a


class _InstanceShape:
    def __init__(self, a: np.ndarray) -> None:
        self.a, self.shape, self.dtype = a, a.shape, a.dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.a


def test_array_protocol_on_the_instance_is_converted_not_left_unconverted() -> None:
    """NumPy reads __array_interface__/__array__ from the instance; so does tensorbridge
    (tests/core/test_protocol_instance.py has the rest)."""
    a = np.arange(4, dtype=np.float32)
    for x in (_InstanceInterface(a), _InstanceShape(a)):
        assert tb.to_torch(x).numpy().tobytes() == a.tobytes()
        assert tb.to_numpy({"k": x})["k"].tobytes() == a.tobytes()


def test_sharded_save_removes_the_single_file_it_supersedes(tmp_path) -> None:
    from safetensors.numpy import save_file

    for variant in ("", ".fp16"):
        d = tmp_path / f"ck{variant}"
        d.mkdir()
        # what save_pretrained wrote before; from_pretrained reads it before any index
        save_file({"w": np.zeros(4, np.float32)}, str(d / f"model{variant}.safetensors"))
        save_file({"w": np.zeros(4, np.float32)}, str(d / "other.safetensors"))
        index = d / f"model.safetensors.index{variant}.json"
        tb.save(
            {"w": np.ones(4, np.float32), "b": np.ones(64, np.float32)},
            index if variant else f"{d}/",
            max_shard_size=64,
        )
        names = sorted(p.name for p in d.iterdir())
        assert f"model{variant}.safetensors" not in names and "other.safetensors" in names
        assert tb.load(index)["w"].tolist() == [1.0] * 4
