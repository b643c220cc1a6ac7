"""`train.py` / `vitgpt2 train`: fine-tune the ViT -> GPT-2 captioner with `Trainer` and peft.

    python train.py                                         # the built-in default job: the synthetic shapes set,
                                                            # a small model from scratch
    python train.py --output_dir x --num_train_epochs 1    # the default job with those two changes
    python train.py configs/course_lora.yaml --learning_rate 1e-4   # a config file, with one change
    accelerate launch --num_processes 2 train.py ...        # data-parallel

Settings come from the built-in defaults (`--help` shows them), then the YAML/JSON file when one is given first,
then the flags.
"""


import sys
from pathlib import Path

from ..applications.hub import check_push_settings, push_training_output, without_trainer_push
from ..training.arguments import parse_train_arguments, read_config_file
from ..training.run import run_training
from ..utils.errors import run_command

__all__ = ["main", "parse_arguments", "train"]
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def parse_arguments(argv: list[str], prog: str | None = None):
    """(model, data, peft, training) arguments: the defaults, then the config file if it comes first, then flags."""
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        return parse_train_arguments(read_config_file(Path(argv[0])), argv[1:], prog=prog)
    return parse_train_arguments({}, argv, prog=prog)


def train(model_args, data_args, peft_args, training_args) -> dict:
    """Trains and saves, then pushes the output folder with its model card when `--push_to_hub` asks."""
    if training_args.push_to_hub:
        check_push_settings(training_args)  # a missing token or repo id must stop the run now, not after training
    # Trainer's own push would replace the model card with a generic one: the push happens once, below.
    metrics = run_training(model_args, data_args, peft_args, without_trainer_push(training_args))
    if training_args.process_index == 0:
        summary = " | ".join(f"{key}: {value:.4f}" for key, value in metrics.items() if isinstance(value, float))
        print(f"[train] final evaluation: {summary}" if metrics else "[train] no evaluation (--eval_strategy no)")
        print(f"[train] saved to {training_args.output_dir}")
        if training_args.push_to_hub:
            push_training_output(training_args, training_args.output_dir)
    return metrics


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    """Trains with the arguments of `argv`; the exit status: 0, or 2 after one line naming a bad input, a busy
    output folder or an unreachable Hub."""
    def train_with_arguments() -> None:
        train(*parse_arguments(sys.argv[1:] if argv is None else argv, prog=prog))

    return run_command(prog, train_with_arguments)
