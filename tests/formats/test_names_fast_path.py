"""check_name's fast path (plain ASCII names) accepts exactly what the full checks accept."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorbridge.errors import UnsafeContentError
from tensorbridge.formats import names

ALPHABET = "ab0_.-:/\\\x00é\ud800 c"


def verdict(name: str, writing: bool) -> str | None:
    try:
        names.check_name(name, writing=writing)
    except UnsafeContentError as exc:
        return str(exc)
    return None


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=8), st.booleans())
def test_fast_path_agrees_with_the_full_checks(name, writing):
    fast = verdict(name, writing)
    real = names._PLAIN
    try:
        names._PLAIN = lambda s: None  # every name through the full checks
        full = verdict(name, writing)
    finally:
        names._PLAIN = real
    assert fast == full


@pytest.mark.parametrize("name", ["..", "a/../b", "c:/x", "c:\\x", "/abs", "", "x\x00"])
def test_refusals_the_fast_path_must_not_take(name):
    with pytest.raises(UnsafeContentError, match="refused"):
        names.check_name(name)
