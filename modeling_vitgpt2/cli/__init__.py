"""The command line: `vitgpt2 <command>` (installed with the package) and the scripts at the top of the checkout
(`train.py`, `eval.py`, `app.py`) are thin wiring over the subpackages below."""
