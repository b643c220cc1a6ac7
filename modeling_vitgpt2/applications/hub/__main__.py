"""`python -m modeling_vitgpt2.applications.hub card|push|space ...`, the same as `vitgpt2 hub`."""

import sys

from .command import main

__all__ = []

if __name__ == "__main__":
    sys.exit(main(prog="python -m modeling_vitgpt2.applications.hub"))
