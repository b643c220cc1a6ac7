"""Parameter-efficient fine-tuning set-up: which weights train for each method, through `peft`.

Every method trains the newly initialised cross-attention (and its LayerNorm) fully, since no pretrained weights
exist for it; the encoder stays frozen unless asked. The methods:

- `lora`: LoRA (rank 4 by default) on the decoder's self-attention projections (`peft.LoraConfig`).
- `adapter`: bottleneck adapters after the self-attention and after the cross-attention of every block.
- `prefix`: 100 learned key/value vectors per block prepended to the self-attention.
- `cross_attention`: only the cross-attention trains (SmallCap-style).
- `full`: the whole decoder trains (no `peft` wrapper).

peft has no bottleneck adapters, and its prefix tuning is silently dropped at generation by transformers 5.x
(peft 0.21 re-injects the prefix as `past_key_values`, which `generate` no longer passes on). So adapters and the
prefix are modules of the model itself (`ViTGPT2Config.adapter_bottleneck` / `prefix_length`), trained and saved
by peft as `modules_to_save` next to a LayerNorm-tuning config on the cross-attention norms. Each run therefore
saves a standard peft adapter folder that `PeftModel.from_pretrained(base, folder)` loads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from peft import LNTuningConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

PEFT_METHODS = ("lora", "adapter", "prefix", "cross_attention", "full")
CROSS_ATTENTION_NORM = "ln_cross_attn"
CROSS_ATTENTION = "crossattention"
DEFAULT_LORA_TARGETS = r"decoder\.h\.\d+\.attn\.(c_attn|c_proj)"


@dataclass
class PeftArguments:
    """How the captioner is fine-tuned (the `--peft` group of train.py)."""

    peft: str | None = field(
        default=None,
        metadata={
            "help": "lora | adapter | prefix | cross_attention | full. Default: full for a model trained from scratch, "
            "lora for pretrained weights.",
            "choices": list(PEFT_METHODS),
        },
    )
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module name suffixes for LoRA (e.g. c_attn c_proj c_fc). Default: the decoder's self-attention "
            "projections. Cross-attention is always trained fully, so LoRA there is skipped."
        },
    )
    adapter_bottleneck: int = field(default=64, metadata={"help": "Width of the bottleneck adapters."})
    num_virtual_tokens: int = field(default=100, metadata={"help": "Prefix length for prefix tuning."})
    train_encoder: bool | None = field(
        default=None,
        metadata={"help": "Train the image encoder too. Default: yes for a model trained from scratch (its encoder "
                  "starts random), no for pretrained weights."},
    )
    max_trainable_params: int | None = field(
        default=None, metadata={"help": "Refuse to start when more parameters than this would train (e.g. 35000000)."}
    )

    def __post_init__(self):
        if self.peft is not None and self.peft not in PEFT_METHODS:
            raise ValueError(f"--peft {self.peft!r} is not one of {', '.join(PEFT_METHODS)}")


def resolve_method(arguments: PeftArguments, from_scratch: bool) -> str:
    """The method to use, filling in the defaults that depend on the start: a model trained from scratch trains
    fully, encoder included; pretrained weights get LoRA with the encoder frozen."""
    if arguments.train_encoder is None:
        arguments.train_encoder = from_scratch
    return arguments.peft or ("full" if from_scratch else "lora")


def config_overrides(method: str, arguments: PeftArguments) -> dict:
    """Model-config fields the method's modules need, given when the base model is built or loaded."""
    if method == "adapter":
        return {"adapter_bottleneck": arguments.adapter_bottleneck}
    if method == "prefix":
        return {"prefix_length": arguments.num_virtual_tokens}
    return {}


def apply_peft(model: nn.Module, method: str, arguments: PeftArguments) -> nn.Module:
    """Freezes what the method does not train and wraps the model with peft where the method uses it."""
    if method == "full":
        for parameter in model.encoder.parameters():
            parameter.requires_grad = bool(arguments.train_encoder)
        return model

    encoder = ["encoder"] if arguments.train_encoder else []
    if method == "lora":
        config = LoraConfig(
            r=arguments.lora_rank,
            lora_alpha=arguments.lora_alpha,
            lora_dropout=arguments.lora_dropout,
            target_modules=arguments.lora_target_modules or DEFAULT_LORA_TARGETS,
            fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
            modules_to_save=[CROSS_ATTENTION, CROSS_ATTENTION_NORM] + encoder,
        )
    else:
        own_modules = {"adapter": ["attn_adapter", "cross_adapter"], "prefix": ["prefix"], "cross_attention": []}
        config = LNTuningConfig(
            target_modules=[CROSS_ATTENTION_NORM],
            modules_to_save=[CROSS_ATTENTION] + own_modules[method] + encoder,
        )
    with warnings.catch_warnings():
        # LN tuning warns about any LayerNorm subclass it does not list, although it copies them generically.
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft keeps a frozen original beside each trainable copy of a
    `modules_to_save` module or tuned LayerNorm, and those originals are not counted."""
    trainable = total = 0
    for name, parameter in model.named_parameters():
        if ".original_module." in name or f"{CROSS_ATTENTION_NORM}.base_layer." in name:
            continue
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def check_trainable_budget(trainable: int, limit: int | None, method: str) -> None:
    if limit is not None and trainable > limit:
        raise ValueError(
            f"--peft {method} trains {trainable:,} parameters, over --max_trainable_params {limit:,}. Use a smaller "
            "rank / bottleneck / prefix, or another method (cross_attention trains the least)."
        )


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)
