"""Fine-tuning with `Trainer` and peft: arguments, the trainer, checkpoints, the PEFT method registry, the tokenizer."""
