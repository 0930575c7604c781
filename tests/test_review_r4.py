"""What a new user meets first: the CLI's help lists every format it reads."""

from tensorbridge.cli import build_parser
from tensorbridge.formats import FORMAT_MODULES


def test_main_help_names_every_format_in_the_table():
    text = build_parser().format_help()
    missing = [name for name in FORMAT_MODULES if name != "sharded" and f".{name}" not in text]
    assert missing == [], f"`tensorbridge --help` does not list {missing} (cli/__init__.py)"
    assert "sharded checkpoints" in text
