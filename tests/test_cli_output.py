"""What the command line prints: hostile text from files is escaped in every command and
mode, NO_COLOR means no escape code at all, tables never cut a number, JSON is strict
and exact, and the small promises around it (in-place convert, the --format hint).

Commands run in-process through ``tensorbridge.cli.main`` (fast); a terminal is
simulated by making ``console.is_tty`` true, so rich draws its tables as on a real one.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import sys

import numpy as np
import pytest

import tensorbridge as tbm
import tensorbridge.console as console
from tensorbridge import cli
from tensorbridge.cli.common import json_safe, sniff
from tensorbridge.console import escape, print_table

# A name that would colour the table and forge a row, an OSC title sequence (BEL and ST
# ends), a C1 CSI, CR, a bidi override and isolate, and a lone surrogate.
EVIL = "w\x1b[7;31mred\nfake_row float32 [1] 4 B\r\u202eabc\u2066\x07\x9b2J\ud800"
#: writers refuse a lone surrogate (no encoding holds it): what convert gets
EVIL_WRITABLE = EVIL.replace("\ud800", "")
EVIL_ONLY_B = "only\x1b]0;retitled\x07\u200f"
META_KEY = "title\x1b]0;pwned\x07"
META_VALUE = "v\x1b]0;pwned\x1b\\\nsame: 99 tensors match\x1b[2J"
#: what must never reach a terminal raw, whatever the mode (rich's own codes on a colour
#: terminal are ESC [ ... m styles, cursor moves and CR: the payloads differ from those)
HOSTILE = ["\x1b[7;31m", "\x1b]0;", "\x1b[2J", "\x07", "\x9b", "\u202e", "\u2066", "\u200f"]
#: lines a hostile file tries to forge
FORGED = re.compile(r"^[\s│┃|]*(fake_row|same: 99)", re.M)


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A safetensors file written byte by byte, as a stranger could: the JSON header is
    ASCII-escaped, so names may hold anything, lone surrogates included."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, a in tensors.items():
        header[name] = {
            "dtype": {"float32": "F32", "float64": "F64"}[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


@pytest.fixture
def evil(tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    write_safetensors(
        a,
        {EVIL: np.array([1.0, 2.5e300, -3.0], np.float64), "ok": np.zeros(2, np.float32)},
        {META_KEY: META_VALUE},
    )
    write_safetensors(
        b,
        {
            EVIL: np.array([1.0, 2.0, -3.0], np.float64),
            "ok": np.zeros(2, np.float32),
            EVIL_ONLY_B: np.ones(1, np.float32),
        },
        {"k": "v"},
    )
    return a, b


@pytest.fixture
def evil_writable(tmp_path):
    c = tmp_path / "c.safetensors"
    write_safetensors(
        c,
        {EVIL_WRITABLE: np.array([1.0, 2.5e300, -3.0], np.float64), "ok": np.zeros(2, np.float32)},
        {META_KEY: META_VALUE},
    )
    return c


class _Stream(io.StringIO):
    tty = False

    def isatty(self) -> bool:
        return self.tty


def run_cli(monkeypatch, args, *, mode: str = "plain", columns: int = 200) -> tuple[int, str, str]:
    """``tensorbridge ARGS`` in-process; mode ``plain`` (piped), ``tty`` (a colour
    terminal), ``nocolor`` (a terminal with NO_COLOR=1) or ``json`` (piped, --json)."""
    out, err = _Stream(), _Stream()
    out.tty = err.tty = mode in ("tty", "nocolor")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        mp.setenv("COLUMNS", str(columns))
        if mode == "nocolor":
            mp.setenv("NO_COLOR", "1")
        else:
            mp.delenv("NO_COLOR", raising=False)
        if mode == "json":
            args = [args[0], "--json", *args[1:]]
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_safe(text: str, *, no_escape_codes: bool) -> None:
    for bad in HOSTILE:
        assert bad not in text, (bad, text)
    assert not FORGED.search(text), text
    text.encode("utf-8")  # no lone surrogate: printing it would have raised
    if no_escape_codes:
        assert "\x1b" not in text and "\r" not in text, text


TEXT_MODES = ["plain", "tty", "nocolor"]


class TestHostileTextIsEscapedEverywhere:
    """Names and metadata from a file, fed through every command in every mode."""

    @pytest.mark.parametrize("mode", TEXT_MODES)
    @pytest.mark.parametrize("stats", [False, True])
    @pytest.mark.parametrize("columns", [200, 80])  # a table; blocks (the name is too long)
    def test_inspect(self, monkeypatch, evil, mode, stats, columns):
        a, _ = evil
        code, out, err = run_cli(
            monkeypatch, ["inspect", a] + (["--stats"] if stats else []), mode=mode, columns=columns
        )
        assert code == 0, err
        assert_safe(out + err, no_escape_codes=mode != "tty")
        assert escape(EVIL) in out  # the name is shown, escaped, on one line
        assert escape(META_VALUE)[:40] in out  # metadata shown, escaped
        assert "2 tensors" in out

    @pytest.mark.parametrize("mode", TEXT_MODES)
    def test_diff(self, monkeypatch, evil, mode):
        a, b = evil
        code, out, err = run_cli(monkeypatch, ["diff", a, b], mode=mode)
        assert code == 1, err
        assert_safe(out + err, no_escape_codes=mode != "tty")
        assert escape(EVIL_ONLY_B) in out
        assert out.rstrip().splitlines()[-1].startswith("different: 1 of 2")

    @pytest.mark.parametrize("mode", TEXT_MODES)
    def test_convert(self, monkeypatch, evil_writable, tmp_path, mode):
        a = evil_writable
        dst = tmp_path / "out.npz"
        code, out, err = run_cli(monkeypatch, ["convert", a, dst], mode=mode)
        assert code == 0, err
        assert_safe(out + err, no_escape_codes=mode != "tty")
        assert escape(META_KEY) in err  # "npz files hold no metadata; left out: ..."
        with tbm.open(dst) as r:
            assert sorted(r.keys()) == sorted([EVIL_WRITABLE, "ok"])  # the names are exact

    @pytest.mark.parametrize("mode", TEXT_MODES + ["json"])
    def test_errors(self, monkeypatch, evil, tmp_path, mode):
        bad = tmp_path / "x\x1b]0;t\x07\nsame: 99 tensors match\u202e.safetensors"
        bad.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}')
        for args in (
            ["inspect", bad],
            ["diff", evil[0], bad],
            ["convert", bad, tmp_path / "o.npz"],
        ):
            code, out, err = run_cli(monkeypatch, args, mode=mode)
            assert code == 2
            assert "tensorbridge: error:" in err and "Fix:" in err
            assert_safe(err, no_escape_codes=True)
            if mode == "json":
                doc = json.loads(out)
                text = doc["error"] if "error" in doc else doc["errors"][0]["error"]
                assert str(bad) in text  # exact in JSON

    @pytest.mark.parametrize("args", [["inspect", "--stats"], ["diff"], ["convert"]])
    def test_json_is_exact_and_strict(self, monkeypatch, evil, evil_writable, tmp_path, args):
        a, b = evil
        tail = {
            "inspect": [a],
            "diff": [a, b],
            "convert": [evil_writable, tmp_path / "o.safetensors"],
        }
        code, out, err = run_cli(monkeypatch, args + tail[args[0]], mode="json")
        assert code in (0, 1), err
        for bad in HOSTILE + ["\x1b", "\r"]:
            assert bad not in out  # written as \uXXXX escapes
        doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
        if args[0] == "inspect":
            f = doc["files"][0]
            assert [t["name"] for t in f["tensors"]] == sorted(
                [EVIL, "ok"], key=console.natural_key
            )
            assert f["metadata"] == {META_KEY: META_VALUE}
        elif args[0] == "diff":
            assert doc["only_in_b"] == [EVIL_ONLY_B]
            assert {t["name"] for t in doc["tensors"]} == {EVIL, "ok"}
        else:
            assert doc["metadata_dropped"] == []
            with tbm.open(tmp_path / "o.safetensors") as r:
                assert sorted(r.keys()) == sorted([EVIL_WRITABLE, "ok"])
                assert r.metadata == {META_KEY: META_VALUE}


def test_escape_covers_every_class_of_dangerous_character():
    for c in [
        "\x00",
        "\x07",
        "\x08",
        "\t",
        "\n",
        "\r",
        "\x1b",
        "\x7f",
        "\x85",
        "\x9b",
        "\u061c",
        "\u200b",
        "\u200e",
        "\u200f",
        "\u2028",
        "\u2029",
        "\u202a",
        "\u202e",
        "\u2066",
        "\u2069",
        "\ufeff",
        "\ud800",
        "\udfff",
        "\U000e0001",
        "\xa0",
    ]:
        e = escape(f"a{c}b")
        assert e.isprintable() and e.isascii() and e.startswith("a\\") and e.endswith("b"), e
    assert escape("café 中文 ñ ∑ 🙂") == "café 中文 ñ ∑ 🙂"
    assert escape(escape(EVIL)) == escape(EVIL)  # idempotent: safe to apply twice


def test_no_color_means_no_escape_code_at_all(monkeypatch, tmp_path):
    p = tmp_path / "m.npz"
    np.savez(p, w=np.arange(3.0))
    code, out, err = run_cli(monkeypatch, ["inspect", p], mode="nocolor")
    assert code == 0 and "\x1b" not in out + err and "┃" in out + "┃"  # still a table
    code, out, _ = run_cli(monkeypatch, ["inspect", p], mode="tty")
    assert "\x1b[" in out  # the colour terminal does get styles (the check above can fail)
    code, out, _ = run_cli(monkeypatch, ["inspect", p], mode="plain")
    assert "\x1b" not in out and out.splitlines()[1].split() == ["name", "dtype", "shape", "size"]


@pytest.mark.parametrize("columns", [150, 60, 40])
def test_inspect_stats_on_a_narrow_terminal_keeps_every_digit_and_column(
    monkeypatch, tmp_path, columns
):
    p = tmp_path / "m.npz"
    np.savez(
        p,
        **{
            "encoder.layers.0.attention.weight": np.array([-1.234567e-300, 3e300]),
            "big": np.array([0, 2**64 - 1], np.uint64),
        },
    )
    _, doc_text, _ = run_cli(monkeypatch, ["inspect", "--stats", p], mode="json")
    tensors = json.loads(doc_text)["files"][0]["tensors"]
    code, out, err = run_cli(
        monkeypatch, ["inspect", "--stats", p], mode="nocolor", columns=columns
    )
    assert code == 0, err
    assert max(len(ln) for ln in out.splitlines() if str(p) not in ln) <= columns
    assert ("┃" in out) == (columns == 150)  # a table where it fits, else one block a tensor
    for head in ["dtype", "shape", "size", "min", "max", "mean", "std", "nan", "inf"]:
        assert re.search(rf"\b{head}\b", out), head
    for t in tensors:
        for key in ["min", "max", "mean", "std"]:
            text = console.format_number(t["stats"][key])
            assert re.search(rf"(?<![\d.e+-]){re.escape(text)}(?![\d.e+-])", out), (text, out)
    assert "18446744073709551615" in out and "…" not in out


def test_a_table_row_is_always_one_line_so_a_long_name_cannot_start_a_line(monkeypatch):
    monkeypatch.setattr(console, "is_tty", lambda stream=None: True)
    monkeypatch.setenv("NO_COLOR", "1")
    name = "a" * 30 + " fake_row float32 [1] 4 B"
    for columns, table in (("120", True), ("60", False)):
        monkeypatch.setenv("COLUMNS", columns)
        buf = io.StringIO()
        print_table(["name", "size"], [[name, "12345678 B"]], buf, align="lr")
        lines = buf.getvalue().splitlines()
        assert ("│" in buf.getvalue()) == table
        assert [ln for ln in lines if name in ln]  # whole, on one line
        assert not any(ln.lstrip().startswith("fake_row") for ln in lines)
        assert any("12345678 B" in ln for ln in lines)


def test_json_has_no_infinity_and_says_which_values_were_not_finite(monkeypatch, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=np.array([1.0, np.nan]))
    np.savez(b, x=np.array([1.0, 2.0]))
    code, out, _ = run_cli(monkeypatch, ["diff", a, b], mode="json")
    assert code == 1
    x = json.loads(out, parse_constant=lambda c: pytest.fail(c))["tensors"][0]
    assert x["max_abs_diff"] is None and x["max_rel_diff"] is None
    assert x["nonfinite"] == {"max_abs_diff": "inf", "max_rel_diff": "inf"}
    assert x["mismatches"] == 1
    assert json_safe({"v": [1.5, float("-inf")]}) == {"v": [1.5, None]}
    assert json_safe({"s": -0.0, "n": float("nan")}) == {
        "s": -0.0,
        "n": None,
        "nonfinite": {"n": "nan"},
    }


def _contents(path) -> dict[str, tuple[str, bytes]]:
    with tbm.open(path) as r:
        return {k: (r[k].dtype.name, r[k].tobytes()) for k in r.keys()}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt", ".h5", ".npy"])
def test_convert_in_place_replaces_the_file_atomically_and_exactly(monkeypatch, tmp_path, suffix):
    p = tmp_path / f"m{suffix}"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    tbm.save(w if suffix == ".npy" else {"w": w, "b": np.array([np.nan, -0.0])}, p)
    before = _contents(p)
    code, out, err = run_cli(monkeypatch, ["convert", p, p], mode="plain")
    assert code == 0, err
    assert "verified" in out
    assert _contents(p) == before
    assert sorted(os.listdir(tmp_path)) == [p.name]  # no temp file left
    code, _, err = run_cli(monkeypatch, ["convert", "--dtype", "float16", p, p], mode="plain")
    assert code == 0, err
    after = _contents(p)
    assert {d for d, _ in after.values()} == {"float16"}
    assert after["w" if "w" in after else next(iter(after))][1] == w.astype(np.float16).tobytes()


def test_a_file_with_the_wrong_suffix_gets_a_format_hint(monkeypatch, tmp_path):
    st = tmp_path / "model.bin"  # transformers' name, holding safetensors
    tbm.save({"w": np.ones(2, np.float32)}, st, format="safetensors")
    assert sniff(st) == "safetensors"
    code, _, err = run_cli(monkeypatch, ["inspect", st], mode="plain")
    assert code == 2 and "pass --format safetensors" in err
    code, _, err = run_cli(monkeypatch, ["convert", st, tmp_path / "o.npz"], mode="plain")
    assert code == 2 and "pass --src-format safetensors" in err
    code, _, err = run_cli(monkeypatch, ["diff", st, st], mode="plain")
    assert code == 2 and "pass --format-a safetensors" in err
    code, out, err = run_cli(monkeypatch, ["inspect", "--format", "safetensors", st])
    assert code == 0 and "w" in out
    code, _, _ = run_cli(
        monkeypatch, ["diff", "--format-a", "safetensors", "--format-b", "safetensors", st, st]
    )
    assert code == 0
    z = tmp_path / "data.safetensors"
    np.savez(z, w=np.ones(1))
    os.replace(tmp_path / "data.safetensors.npz", z)
    code, _, err = run_cli(monkeypatch, ["inspect", z], mode="plain")
    assert code == 2 and "pass --format npz" in err
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"not a tensor file at all")
    code, _, err = run_cli(monkeypatch, ["inspect", garbage], mode="plain")
    assert code == 2 and "Hint" not in err  # no guess when the bytes say nothing
