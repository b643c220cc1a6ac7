"""`python -m modeling_vitgpt2.cli <command> ...`: the `vitgpt2` command where no console script is on PATH."""

import sys

from .main import main

__all__ = []

if __name__ == "__main__":
    sys.exit(main())
