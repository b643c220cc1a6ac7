"""Fine-tune the ViT -> GPT-2 captioner with `Trainer` and peft.

    python train.py                                   # built-in synthetic shapes set, small model from scratch
    python train.py configs/course_lora.yaml          # arguments from a YAML/JSON file
    python train.py --encoder vit_large_patch14_clip_224.openai --decoder openai-community/gpt2 \\
        --train_json p2_data/train.json --train_images p2_data/images/train \\
        --val_json p2_data/val.json --val_images p2_data/images/val --peft lora --output_dir outputs/lora
    accelerate launch --num_processes 2 train.py ...  # data-parallel

Run `python train.py --help` for every option.
"""

import sys
from pathlib import Path

from transformers import HfArgumentParser

from modeling_vitgpt2.hub import check_push_settings, push_training_output, without_trainer_push
from modeling_vitgpt2.training import (
    CaptionTrainingArguments,
    DataArguments,
    ModelArguments,
    PeftArguments,
    run_training,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "synthetic_default.yaml"


def parse_arguments(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, PeftArguments, CaptionTrainingArguments))
    if not argv:
        argv = [str(DEFAULT_CONFIG)]
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv[0])
        if not path.is_file():
            raise SystemExit(f"config file not found: {path}")
        if path.suffix == ".json":
            return parser.parse_json_file(str(path), allow_extra_keys=False)
        return parser.parse_yaml_file(str(path), allow_extra_keys=False)
    return parser.parse_args_into_dataclasses(args=argv)


def train(model_args, data_args, peft_args, training_args) -> dict:
    """Trains and saves, then pushes the output folder with its model card when `--push_to_hub` asks."""
    if training_args.push_to_hub:
        check_push_settings(training_args)  # a missing token or repo id must stop the run now, not after training
    # Trainer's own push would replace the model card with a generic one: the push happens once, below.
    metrics = run_training(model_args, data_args, peft_args, without_trainer_push(training_args))
    if training_args.process_index == 0:
        summary = " | ".join(f"{key}: {value:.4f}" for key, value in metrics.items() if isinstance(value, float))
        print(f"[train] final evaluation: {summary}")
        print(f"[train] saved to {training_args.output_dir}")
        if training_args.push_to_hub:
            push_training_output(training_args, training_args.output_dir)
    return metrics


def main(argv: list[str] | None = None) -> None:
    train(*parse_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
