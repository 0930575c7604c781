"""Every container comes back as the same type, all items converted, attributes kept,
or is refused with its path: never with tensors left unconverted."""

from __future__ import annotations

import collections
import collections.abc as abc
import dataclasses
import os
import types

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge.tree import tree_leaves, tree_leaves_with_path


class KwOnlyDict(dict):
    def __init__(self, *, name, **items):
        super().__init__(**items)
        self.name = name


class PositionalDict(dict):
    def __init__(self, name, items):  # items in the wrong argument if rebuilt as t(items)
        super().__init__(items)
        self.name = name


class ShoutingDict(dict):
    def __setitem__(self, k, v):  # a rebuild must not run items through this
        super().__setitem__(k.upper(), v)


class DefaultDict(collections.defaultdict):
    pass


class SlotList(list):
    __slots__ = ("tag",)

    def __init__(self, tag, items=()):
        super().__init__(items)
        self.tag = tag


class Queue(collections.deque):
    def __init__(self, owner):
        super().__init__(maxlen=5)
        self.owner = owner


class Enc(collections.UserDict):
    def __init__(self, data, *, note):
        super().__init__(data)
        self.note = note


class Rows(collections.UserList):
    pass


class Chain(collections.ChainMap):
    pass


class NS(types.SimpleNamespace):
    pass


class Point(tuple):
    def __new__(cls, x, y):
        return super().__new__(cls, (x, y))


@dataclasses.dataclass
class DC:
    w: object
    extra: int = dataclasses.field(default=0, init=False)


def _containers(t):
    """(name, container holding t, how to read its items back) for every known kind."""
    od = collections.OrderedDict([("b", t), ("a", t)])
    od.move_to_end("b")
    od.version = 3
    dd = DefaultDict(list, {"k": t})
    dd.note = "dd"
    ctr = collections.Counter()
    dict.__setitem__(ctr, "c", t)
    q = Queue("me")
    q.extend([t, t])
    return [
        ("kwonly dict", KwOnlyDict(name="n", w=t), lambda c: [c["w"]]),
        ("positional dict", PositionalDict("n", {"w": t}), lambda c: [c["w"]]),
        ("shouting dict", ShoutingDict(w=t), lambda c: [dict.__getitem__(c, "w")]),
        ("ordered dict", od, lambda c: list(c.values())),
        ("defaultdict", dd, lambda c: [c["k"]]),
        ("counter", ctr, lambda c: [dict.__getitem__(c, "c")]),
        ("list subclass with slots", SlotList("s", [t]), lambda c: list(c)),
        ("deque", collections.deque([t, t], maxlen=4), lambda c: list(c)),
        ("deque subclass", q, lambda c: list(c)),
        ("UserDict", collections.UserDict({"a": t}), lambda c: [c["a"]]),
        ("UserDict subclass", Enc({"a": t}, note="x"), lambda c: [c["a"]]),
        ("UserList", Rows([t, [t]]), lambda c: [c[0], c[1][0]]),
        ("ChainMap", Chain({"a": t}, {"b": t}), lambda c: [c.maps[0]["a"], c.maps[1]["b"]]),
        (
            "MappingProxyType",
            types.MappingProxyType(collections.OrderedDict(a=t)),
            lambda c: [c["a"]],
        ),
        ("SimpleNamespace", NS(a=t, b=[t]), lambda c: [c.a, c.b[0]]),
        ("tuple subclass", Point(t, t), lambda c: list(c)),
        ("struct sequence", torch.return_types.max((t, t)), lambda c: list(c)),
        ("dataclass", DC(t), lambda c: [c.w]),
    ]


def _same_shape(a, b, seen=None):
    """a and b are the same types all the way down, with the same instance attributes."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, (np.ndarray, torch.Tensor)):
        return
    attrs_a = {k: v for k, v in getattr(a, "__dict__", {}).items() if k not in ("data", "maps")}
    attrs_b = {k: v for k, v in getattr(b, "__dict__", {}).items() if k not in ("data", "maps")}
    if not dataclasses.is_dataclass(a) and not isinstance(a, types.SimpleNamespace):
        assert attrs_a.keys() == attrs_b.keys()
        for k in attrs_a:
            assert attrs_a[k] is attrs_b[k]  # kept as they are


@pytest.mark.parametrize(
    "target,src,kind", [("numpy", torch.ones(2), np.ndarray), ("torch", np.ones(2), torch.Tensor)]
)
def test_every_known_container_keeps_its_type_attributes_and_converts_every_item(target, src, kind):
    for name, tree, items in _containers(src):
        out = tb.convert(tree, to=target)
        _same_shape(tree, out)
        got = items(out)
        assert got and all(type(x) is kind for x in got), name
        assert all(type(x) is type(src) for x in items(tree)), f"{name}: the input changed"
        assert len(tree_leaves(out)) == len(tree_leaves(tree)), name


def test_details_of_each_kind_survive():
    t = torch.arange(3.0)
    cs = {name: tb.to_numpy(c) for name, c, _ in _containers(t)}
    assert cs["kwonly dict"].name == "n" and list(cs["kwonly dict"]) == ["w"]
    assert cs["positional dict"].name == "n" and list(cs["positional dict"]) == ["w"]
    assert list(dict.keys(cs["shouting dict"])) == ["w"]
    assert list(cs["ordered dict"]) == ["a", "b"] and cs["ordered dict"].version == 3
    cs["ordered dict"].move_to_end("a")  # the OrderedDict's own order is intact
    assert list(cs["ordered dict"]) == ["b", "a"]
    assert cs["defaultdict"].default_factory is list and cs["defaultdict"].note == "dd"
    assert cs["list subclass with slots"].tag == "s"
    assert cs["deque"].maxlen == 4 and cs["deque subclass"].maxlen == 5
    assert cs["deque subclass"].owner == "me"
    assert cs["UserDict subclass"].note == "x"
    assert [type(m) for m in cs["ChainMap"].maps] == [dict, dict]
    proxy = cs["MappingProxyType"]
    assert type(proxy.copy()) is collections.OrderedDict
    assert type(cs["struct sequence"].values) is np.ndarray
    assert cs["dataclass"].extra == 0


def test_state_dict_metadata_survives_a_round_trip_and_loads():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    sd = model.state_dict()
    assert sd._metadata  # torch's per-module versions, used by load_state_dict
    back = tb.to_torch(tb.to_numpy(sd))
    assert type(back) is collections.OrderedDict and back._metadata == sd._metadata
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].numpy().tobytes() == sd[k].numpy().tobytes()
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    fresh.load_state_dict(back)


def test_a_real_batch_encoding_keeps_its_type_encodings_and_methods():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding(
        {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.ones((1, 3), np.int64)},
        n_sequences=1,
    )
    out = tb.to_torch(enc)
    assert type(out) is transformers.BatchEncoding
    assert out.n_sequences == 1 and out.encodings is None
    assert type(out["input_ids"]) is torch.Tensor and out.input_ids.tolist() == [[1, 2, 3]]
    assert list(out.keys()) == ["input_ids", "attention_mask"]
    assert type(enc["input_ids"]) is np.ndarray  # input untouched
    back = tb.to_numpy(out)
    assert (
        type(back) is transformers.BatchEncoding
        and back["input_ids"].tobytes() == enc["input_ids"].tobytes()
    )


def test_converted_items_are_zero_copy_inside_every_container():
    a = np.zeros(4, np.float32)
    for name, tree, items in _containers(a):
        got = items(tb.to_torch(tree))
        got[0][0] = 7.0
        assert a[0] == 7.0, name
        a[0] = 0.0


class Registry(abc.Mapping):
    def __init__(self, d):
        self._d = d

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


class Frames(abc.Sequence):
    def __init__(self, items):
        self._items = items

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)


@pytest.mark.parametrize(
    "make,kind",
    [
        (lambda t: Registry({"w": t}), "Registry"),
        (lambda t: Frames([t]), "Frames"),
        (lambda t: Frames([{"deep": [t]}]), "Frames"),
        (lambda t: {t}, "set"),
        (lambda t: frozenset([t]), "frozenset"),
    ],
)
def test_unknown_containers_holding_tensors_are_refused_with_their_path(make, kind):
    t = torch.ones(1)
    tree = {"batch": [1, make(t)]}
    for call in (
        lambda: tb.to_numpy(tree),
        lambda: tb.to_jax(tree),
        lambda: tb.explain(tree, to="numpy"),
        lambda: tree_leaves(tree),
        lambda: list(tree_leaves_with_path(tree)),
    ):
        with pytest.raises(
            tb.ConversionError,
            match=rf"^at \['batch'\]\[1\]: Cannot handle a .*{kind} "
            r"holding tensors: .*Fix: ",
        ):
            call()
    with pytest.raises(tb.ConversionError, match=kind):
        tb.to_numpy(make(t))  # at the root too


def test_unknown_containers_without_tensors_are_leaves():
    reg, frames, s = Registry({"lr": 0.1}), Frames(["a", 1]), {1, 2}
    out = tb.to_torch({"cfg": reg, "f": frames, "s": s, "x": np.ones(1)})
    assert out["cfg"] is reg and out["f"] is frames and out["s"] is s
    assert type(out["x"]) is torch.Tensor


def test_tensors_in_instance_attributes_are_refused_not_left_behind():
    d = collections.OrderedDict(a=np.ones(1))
    d.cache = {"w": np.ones(1)}
    with pytest.raises(
        tb.ConversionError,
        match=r"^at \['m'\]\.cache: Cannot handle the attribute "
        r"'cache' of a collections.OrderedDict: .*unconverted",
    ):
        tb.to_torch({"m": d})
    ns = KwOnlyDict(name=torch.ones(1), w=1)
    with pytest.raises(tb.ConversionError, match=r"^at \.name: "):
        tb.to_numpy(ns)


def test_a_container_that_cannot_be_made_without_its_constructor_is_refused_by_name():
    class Strict(dict):
        def __new__(cls, needed):
            return super().__new__(cls)

        def __init__(self, needed):
            super().__init__(a=np.ones(1))

    with pytest.raises(
        tb.ConversionError,
        match=r"^at \['s'\]: Cannot handle a .*Strict: it cannot be "
        r"rebuilt without calling its constructor.*register_container",
    ):
        tb.to_numpy({"s": Strict(1)})


def test_a_user_registration_wins_over_the_built_in_kinds():
    class Params(collections.UserDict):
        pass

    tb.register_container(
        Params,
        lambda p: ([p["w"]], ["w"], None),
        lambda aux, kids: Params(w=kids[0], registered=True),
    )
    out = tb.to_torch(Params(w=np.ones(1)))
    assert out["registered"] is True
    with pytest.raises(TypeError, match="built-in 'dict'"):
        tb.register_container(dict, lambda d: d, lambda a, k: k)


def test_saving_a_batch_encoding_names_its_tensors_by_key(tmp_path):
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": np.array([[1, 2]]), "mask": np.ones((1, 2))})
    tb.save({"batch": enc, "q": collections.deque([np.zeros(1)])}, tmp_path / "b.safetensors")
    assert sorted(tb.load(tmp_path / "b.safetensors")) == ["batch.input_ids", "batch.mask", "q.0"]


def test_tuples_of_c_types_and_unchanged_tuples():
    shape = torch.Size([2, 3])  # tuple.__new__ refuses this C subclass
    out = tb.to_numpy({"shape": shape, "t": torch.ones(1), "sizes": (1, "a")})
    assert out["shape"] is shape and out["sizes"] == (1, "a") and type(out["t"]) is np.ndarray
    stat = tb.to_numpy(os.stat("."))  # a struct sequence of ints: itself
    assert type(stat) is os.stat_result
