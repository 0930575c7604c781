"""Every ```python block of docs/guide.md runs, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_has_code():
    assert len(BLOCKS) >= 10


@pytest.mark.filterwarnings("ignore::UserWarning:torch")
# numpy.array(tensor), as the tutorial writes it, makes torch warn under NumPy 2.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_guide_blocks_run_in_order(capsys):
    namespace: dict = {}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"{GUIDE}:block{i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message carries the block
            raise AssertionError(f"guide block {i} failed:\n{block}") from exc
    printed = capsys.readouterr().out
    expected = re.search(r"prints\n\n```text\n(.*?)```", GUIDE.read_text(), flags=re.S).group(1)
    assert expected in printed
