"""``python -m tensorbridge``: the same command line as ``tensorbridge``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
