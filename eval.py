"""Evaluate a captioner and CLIP: `python eval.py --help`, the same as `vitgpt2 eval` (caption, score, zero-shot,
attention, extremes).

A thin wrapper kept at the top of the checkout; the command lives in modeling_vitgpt2/cli/eval.py.
"""

import sys

from modeling_vitgpt2.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
