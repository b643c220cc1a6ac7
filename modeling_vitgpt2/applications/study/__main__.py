"""`python -m modeling_vitgpt2.applications.study`, the same as `vitgpt2 study`."""

import sys

from .command import main

__all__ = []

if __name__ == "__main__":
    sys.exit(main(prog="python -m modeling_vitgpt2.applications.study"))
