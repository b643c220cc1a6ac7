"""Fine-tune the ViT -> GPT-2 captioner with `Trainer` and peft: `python train.py --help`, the same as `vitgpt2 train`.

A thin wrapper kept at the top of the checkout, so that `python train.py` and `accelerate launch train.py` work as
they always did; the command lives in modeling_vitgpt2/cli/train.py.
"""

import sys

from modeling_vitgpt2.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
