"""Parameter-efficient fine-tuning: the registry of methods, and setting a model up for one of them through `peft`.

A method is one `PeftMethod` record in `PEFT_METHODS`: its `--peft` name, the title and Hub tag its model card
shows, a sentence saying what trains, the model-config fields its own modules need, and the peft config that
freezes everything else. `train.py`, the model card and the Hub code all read the record, so adding a method is
`register_peft_method(PeftMethod(...))`, imported before training or publishing.

Every method trains the newly initialised cross-attention (and its LayerNorm) fully, since no pretrained weights
exist for it; the encoder stays frozen unless asked. The built-in methods:

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from peft import LNTuningConfig, LoraConfig, PeftConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

__all__ = [
    "CROSS_ATTENTION",
    "CROSS_ATTENTION_NORM",
    "PEFT_METHODS",
    "PeftArguments",
    "PeftMethod",
    "apply_peft",
    "check_trainable_budget",
    "config_overrides",
    "count_parameters",
    "frozen_base_parameters",
    "layer_norm_tuning",
    "peft_method",
    "register_peft_method",
    "resolve_method",
]

CROSS_ATTENTION_NORM = "ln_cross_attn"
CROSS_ATTENTION = "crossattention"
DEFAULT_LORA_TARGETS = r"decoder\.h\.\d+\.attn\.(c_attn|c_proj)"


@dataclass(frozen=True)
class PeftMethod:
    """One fine-tuning method, as `train.py --peft`, the model card and the Hub code know it.

    peft_config: `(arguments, always_trained)` -> the peft config that trains the method's weights plus the modules
        named in `always_trained` (the new cross-attention, and the encoder when asked) as `modules_to_save`;
        None for a method that trains the model without a peft wrapper.
    describe: `(the run's PeftArguments as a dict)` -> the model card's sentence on what trained.
    model_config: `(arguments)` -> ViTGPT2Config fields the method's own modules need when the base model is built.
    """

    name: str
    title: str
    describe: Callable[[dict], str]
    peft_config: Callable[[PeftArguments, list[str]], PeftConfig] | None
    tag: str | None = None
    model_config: Callable[[PeftArguments], dict] = lambda arguments: {}

    @property
    def uses_peft(self) -> bool:
        return self.peft_config is not None


PEFT_METHODS: dict[str, PeftMethod] = {}


def register_peft_method(method: PeftMethod, exist_ok: bool = False) -> PeftMethod:
    if method.name in PEFT_METHODS and not exist_ok:
        raise ValueError(f"a PEFT method named {method.name!r} is already registered")
    PEFT_METHODS[method.name] = method
    return method


def peft_method(name: str) -> PeftMethod:
    """The registered method called `name`; an error listing the registered ones otherwise."""
    try:
        return PEFT_METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown PEFT method {name!r}: registered are {', '.join(PEFT_METHODS)} (add one with "
            "modeling_vitgpt2.training.peft_methods.register_peft_method, imported before training or publishing)"
        ) from None


@dataclass
class PeftArguments:
    """How the captioner is fine-tuned (the `--peft` group of train.py)."""

    peft: str | None = field(
        default=None,
        metadata={
            "help": "A registered method (modeling_vitgpt2.training.peft_methods.PEFT_METHODS): lora | adapter | prefix | "
            "cross_attention | full. Default: full for a model trained from scratch, lora for pretrained weights."
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
        if self.peft is not None:
            peft_method(self.peft)


def layer_norm_tuning(own_modules: list[str]) -> Callable[[PeftArguments, list[str]], PeftConfig]:
    """The peft config of a method whose trained weights are modules of the model (`own_modules`): peft saves them,
    with the cross-attention, as `modules_to_save`, and tunes the cross-attention's LayerNorm."""

    def config(arguments: PeftArguments, always_trained: list[str]) -> PeftConfig:
        modules = [name for name in always_trained if name != CROSS_ATTENTION_NORM] + own_modules
        return LNTuningConfig(target_modules=[CROSS_ATTENTION_NORM], modules_to_save=modules)

    return config


def _lora_config(arguments: PeftArguments, always_trained: list[str]) -> PeftConfig:
    return LoraConfig(
        r=arguments.lora_rank,
        lora_alpha=arguments.lora_alpha,
        lora_dropout=arguments.lora_dropout,
        target_modules=arguments.lora_target_modules or DEFAULT_LORA_TARGETS,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
        modules_to_save=always_trained,
    )


def _describe_lora(peft: dict) -> str:
    targets = peft.get("lora_target_modules")
    where = f"the decoder modules `{'`, `'.join(targets)}`" if targets else "the decoder's self-attention projections"
    return (
        f"LoRA (rank {peft['lora_rank']}, alpha {peft['lora_alpha']}, dropout {peft['lora_dropout']}) on {where}; "
        "the newly initialised cross-attention and its LayerNorm train fully."
    )


for _method in (
    PeftMethod(
        name="lora", title="LoRA", tag="lora", describe=_describe_lora, peft_config=_lora_config,
    ),
    PeftMethod(
        name="adapter",
        title="bottleneck adapters",
        tag="bottleneck-adapters",
        describe=lambda peft: (
            f"Bottleneck adapters (width {peft['adapter_bottleneck']}, Houlsby et al.) after the self-attention and "
            "the cross-attention of every block; the newly initialised cross-attention and its LayerNorm train fully."
        ),
        peft_config=layer_norm_tuning(["attn_adapter", "cross_adapter"]),
        model_config=lambda arguments: {"adapter_bottleneck": arguments.adapter_bottleneck},
    ),
    PeftMethod(
        name="prefix",
        title="prefix tuning",
        tag="prefix-tuning",
        describe=lambda peft: (
            f"Prefix tuning: {peft['num_virtual_tokens']} learned key/value vectors prepended to every block's "
            "self-attention, in training and in generation alike; the newly initialised cross-attention and its "
            "LayerNorm train fully."
        ),
        peft_config=layer_norm_tuning(["prefix"]),
        model_config=lambda arguments: {"prefix_length": arguments.num_virtual_tokens},
    ),
    PeftMethod(
        name="cross_attention",
        title="cross-attention tuning",
        tag="cross-attention-tuning",
        describe=lambda peft: "Only the cross-attention (and its LayerNorm) trains; the rest of the decoder is frozen.",
        peft_config=layer_norm_tuning([]),
    ),
    PeftMethod(
        name="full", title="full training", describe=lambda peft: "The whole decoder trains.", peft_config=None,
    ),
):
    register_peft_method(_method)


def resolve_method(arguments: PeftArguments, from_scratch: bool) -> tuple[str, PeftArguments]:
    """(the method to use, the arguments with the defaults that depend on the start filled in): a model trained
    from scratch trains fully, encoder included; pretrained weights get LoRA with the encoder frozen. The given
    arguments are left as they are."""
    if arguments.train_encoder is None:
        arguments = replace(arguments, train_encoder=from_scratch)
    return arguments.peft or ("full" if from_scratch else "lora"), arguments


def config_overrides(method: str, arguments: PeftArguments) -> dict:
    """Model-config fields the method's modules need, given when the base model is built or loaded."""
    return peft_method(method).model_config(arguments)


def apply_peft(model: nn.Module, method: str, arguments: PeftArguments) -> nn.Module:
    """Freezes what the method does not train and wraps the model with peft where the method uses it."""
    record = peft_method(method)
    if not record.uses_peft:
        for parameter in model.encoder.parameters():
            parameter.requires_grad = bool(arguments.train_encoder)
        return model
    always_trained = [CROSS_ATTENTION, CROSS_ATTENTION_NORM] + (["encoder"] if arguments.train_encoder else [])
    config = record.peft_config(arguments, always_trained)
    tied = _tied_module_groups(model)
    with warnings.catch_warnings():
        # LN tuning warns about any LayerNorm subclass it does not list, although it copies them generically.
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        peft_model = get_peft_model(model, config)
    _refuse_adapted_tied_weights(peft_model.get_base_model(), tied, method, arguments)
    return peft_model


def _tied_module_groups(model: nn.Module) -> list[list[str]]:
    """The names of the modules that share a parameter, one list per shared parameter (GPT-2's LM head and its
    token embedding: `["decoder.wte", "lm_head"]`)."""
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name.rpartition(".")[0])
    return [names for names in owners.values() if len(names) > 1]


def _refuse_adapted_tied_weights(model: nn.Module, tied: list[list[str]], method: str,
                                 arguments: PeftArguments) -> None:
    """Refuses an adapter on a module whose weight another module shares (`_tied_module_groups`). Unmerged, the
    adapter changes that module alone; merged (`--merge`, int8 loading) it changes the one shared weight, so the
    other module changes too, and the merged model captions differently from the adapter it came from. peft 0.21's
    `ensure_weight_tying` does not keep them together either (measured: merged and unmerged logits still differ
    with it, for LoRA on `wte` and on `lm_head`)."""
    for names in tied:
        adapted = [name for name in names if _adapted(model, name)]
        if not adapted:
            continue
        others = [name for name in names if name not in adapted]
        flag = (f"--lora_target_modules {' '.join(arguments.lora_target_modules)}"
                if method == "lora" and arguments.lora_target_modules else f"--peft {method}")
        what = (f"adapts {', '.join(adapted)}, which shares its weight with {', '.join(others)}" if others else
                f"adapts {' and '.join(adapted)}, which share one weight")
        advice = ("leave wte and lm_head out of --lora_target_modules (c_attn c_proj c_fc adapt the decoder's "
                  "blocks), or train them with --peft full" if method == "lora" else
                  "choose a method that leaves wte and lm_head frozen, or train them with --peft full")
        raise ValueError(
            f"{flag} {what} (GPT-2 ties its LM head to its token embedding): merging the adapter (--merge, int8 "
            f"loading) would change both, so the merged model would caption differently from the adapter; {advice}"
        )


def _adapted(model: nn.Module, name: str) -> bool:
    """Whether peft wrapped the module `name` or one of the modules holding it (a trained copy of a parent holds
    a copy of the shared weight that the other module no longer shares)."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:end])), (BaseTunerLayer, AuxiliaryTrainingWrapper))
               for end in range(1, len(parts) + 1))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft keeps a frozen original beside each trainable copy of a
    `modules_to_save` module or tuned LayerNorm, and those originals are not counted."""
    trainable = total = 0
    for name, parameter in model.named_parameters():
        if _replaced_by_trained_copy(name):
            continue
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def _replaced_by_trained_copy(name: str) -> bool:
    return ".original_module." in name or f"{CROSS_ATTENTION_NORM}.base_layer." in name


def frozen_base_parameters(model: nn.Module):
    """(name, parameter) for each weight of a peft model's base that its adapter does not carry: the frozen ones,
    less the originals of the modules it trains copies of. Named as in the base model alone."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad or _replaced_by_trained_copy(name):
            continue
        yield name.removeprefix("base_model.model.").replace(".base_layer.", "."), parameter


def check_trainable_budget(trainable: int, limit: int | None, method: str) -> None:
    if limit is not None and trainable > limit:
        raise ValueError(
            f"--peft {method} trains {trainable:,} parameters, over --max_trainable_params {limit:,}. Use a smaller "
            "rank / bottleneck / prefix, or another method (cross_attention trains the least)."
        )

