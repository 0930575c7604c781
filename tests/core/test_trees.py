"""Nested structures: container types preserved, custom containers, error paths."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict, defaultdict, namedtuple

import numpy as np
import pytest
import torch

import tensorbridge as tb

Pair = namedtuple("Pair", "a b")


@dataclasses.dataclass
class Batch:
    x: object
    y: object
    tag: str = "train"


@dataclasses.dataclass(frozen=True)
class Frozen:
    w: object


def test_container_types_are_preserved():
    t = torch.ones(2)
    tree = {
        "od": OrderedDict([("z", t), ("a", t)]),
        "dd": defaultdict(list, {"k": t}),
        "list": [t, (t, None)],
        "nt": Pair(t, 3),
        "dc": Batch(t, [t]),
        "fz": Frozen(t),
        "none": None,
    }
    out = tb.to_numpy(tree)
    assert type(out["od"]) is OrderedDict and list(out["od"]) == ["z", "a"]
    assert type(out["dd"]) is defaultdict and out["dd"].default_factory is list
    assert isinstance(out["list"][1], tuple) and out["list"][1][1] is None
    assert type(out["nt"]) is Pair and out["nt"].b == 3
    assert (
        type(out["dc"]) is Batch
        and out["dc"].tag == "train"
        and isinstance(out["dc"].y[0], np.ndarray)
    )
    assert type(out["fz"]) is Frozen and isinstance(out["fz"].w, np.ndarray)
    assert out["none"] is None
    assert isinstance(tree["dc"].x, torch.Tensor)  # the input is not modified


def test_custom_container_registration():
    class Box:
        def __init__(self, items):
            self.items = items

    tb.register_container(
        Box, lambda b: (b.items, list(range(len(b.items))), None), lambda aux, kids: Box(kids)
    )
    out = tb.to_torch(Box([np.ones(1), np.zeros(1)]))
    assert isinstance(out, Box) and all(isinstance(i, torch.Tensor) for i in out.items)


def test_error_names_the_path():
    tree = {"layers": [{"weight": np.ones(2)}, {"weight": np.array(["oops"])}]}
    with pytest.raises(tb.ConversionError) as err:
        tb.to_torch(tree)
    assert str(err.value).startswith("at ['layers'][1]['weight']: ")


def test_explain_a_tree_lists_each_tensor():
    text = str(tb.explain({"a": torch.ones(1), "b": [np.zeros(1)], "c": "skip"}, to="numpy"))
    assert "['a']" in text and "['b'][0]" in text and "['c']" not in text


def test_registration_is_thread_safe():
    errors = []

    def register(i):
        try:
            cls = type(f"C{i}", (), {})
            tb.register_container(cls, lambda o: ([], [], None), lambda aux, kids: cls())
            tb.to_numpy({"x": [np.ones(1)] * 10})
        except Exception as e:  # pragma: no cover - the assertion reports it
            errors.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_register_container_rejects_non_classes():
    with pytest.raises(TypeError, match="Expected a class"):
        tb.register_container("dict", lambda o: o, lambda a, k: k)


def test_registered_dict_subclass_uses_its_own_flatten():
    class Params(dict):
        pass

    tb.register_container(
        Params,
        lambda p: ([p["w"]], ["w"], None),
        lambda aux, kids: Params(w=kids[0], registered=True),
    )
    out = tb.to_torch(Params(w=np.ones(1), skipped=np.ones(1)))
    assert out["registered"] is True and "skipped" not in out


def test_a_structure_that_contains_itself_is_refused():
    cyclic = [np.ones(1)]
    cyclic.append(cyclic)
    for call in (
        lambda: tb.to_numpy(cyclic),
        lambda: tb.explain(cyclic, to="torch"),
        lambda: tb.save({"x": cyclic}, "/nonexistent/never-written.npz"),
    ):
        with pytest.raises(tb.ConversionError, match="contains itself.*Fix"):
            call()


def test_numpy_scalars_become_zero_d_arrays():
    out = tb.to_numpy(np.float32(1.5))
    assert type(out) is np.ndarray and out.shape == () and out.dtype == np.float32


def test_tree_leaves_walks_as_tree_leaves_with_path_does():
    from tensorbridge.tree import tree_leaves, tree_leaves_with_path

    class Params(dict):
        pass

    tb.register_container(
        Params, lambda p: ([p["w"]], ["w"], None), lambda aux, kids: Params(w=kids[0])
    )
    a, b, c, d, e = (np.full(1, i) for i in range(5))
    tree = {
        "od": OrderedDict([("z", a), ("y", None)]),
        "nt": Pair(b, [c, (d,)]),
        "dc": Batch(e, None),
        "p": Params(w=a),
        "s": "text",
        "n": 3,
    }
    for _ in range(2):  # before and after tree_map filled the leaf-type cache
        got = tree_leaves(tree)
        want = [x for _, x in tree_leaves_with_path(tree)]
        assert len(got) == len(want) and all(x is y for x, y in zip(got, want, strict=True))
        tb.to_numpy(tree)
    arrays = [x for x in tree_leaves(tree) if isinstance(x, np.ndarray)]
    assert len(arrays) == 6 and all(x is y for x, y in zip(arrays, [a, b, c, d, e, a], strict=True))
    loop: list = []
    loop.append(loop)
    with pytest.raises(tb.ConversionError, match="contains itself"):
        tree_leaves(loop)
