"""The command line's option groups (`ARGUMENT_GROUPS`: model, data, PEFT, training) and their parsing checks;
`train.py` and the study parse with the same groups."""

from __future__ import annotations

import json
import logging
import os
import re
import typing
from argparse import ArgumentError, ArgumentParser
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from ..data.synthetic import (
    DEFAULT_DOMAIN,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
)
from ..inference.generation import generation_kwargs
from .peft_methods import PeftArguments

__all__ = [
    "ARGUMENT_GROUPS",
    "CaptionTrainingArguments",
    "ConfigLoader",
    "DataArguments",
    "ModelArguments",
    "PeftArguments",
    "json_argument",
    "parse_train_arguments",
    "read_config_file",
]


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which captioner to train: an existing one, pretrained parts, or a new one from a config."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A ViTGPT2 model folder or Hub id to fine-tune."}
    )
    encoder: str | None = field(
        default=None,
        metadata={"help": "Pretrained timm encoder: a name with its tag (vit_large_patch14_clip_224.openai), an "
                  "hf-hub:timm/... id, or a local weights file (architecture from --model_config encoder_name)."},
    )
    decoder: str | None = field(
        default=None, metadata={"help": "Pretrained GPT-2: a Hub id (openai-community/gpt2) or a local folder."}
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "JSON of ViTGPT2Config fields. From scratch: changes to the built-in small model "
                  "(DEFAULT_SCRATCH_MODEL: a 3-layer, 128-wide ViT and GPT-2 on 64 px images); with "
                  "--encoder/--decoder or --model_name_or_path: overrides (encoder_kwargs, cross_attention_layers, "
                  "dropouts)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer for a model trained from scratch; default: a byte-level BPE trained on the "
                  "training captions."},
    )
    tokenizer_vocab_size: int = field(default=1000, metadata={"help": "Vocabulary size of that trained tokenizer."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager."})


@dataclass
class DataArguments:
    """Where the captions come from. With none of the sources given, a built-in synthetic set is written and used."""

    train_json: str | None = field(default=None, metadata={"help": "COCO-style captions of the training images."})
    train_images: str | None = field(default=None, metadata={"help": "Folder of the training images."})
    val_json: str | None = field(default=None, metadata={"help": "COCO-style captions of the validation images."})
    val_images: str | None = field(default=None, metadata={"help": "Folder of the validation images."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` id or a local folder (e.g. an imagefolder with metadata)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    val_split: str = field(default="validation", metadata={"help": "Split to evaluate on."})
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    caption_column: str = field(default="caption", metadata={"help": "Caption column (a string or a list)."})
    skip_bad_images: bool = field(default=False, metadata={"help": "Log and skip unreadable images."})
    max_caption_length: int = field(default=40, metadata={"help": "Tokens per caption, start and end included."})
    max_train_captions: int | None = field(default=None, metadata={"help": "Use only the first N captions."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Evaluate on only the first N images."})
    synthetic_dir: str = field(
        default="outputs/synthetic-shapes", metadata={"help": "Where the built-in synthetic set is written."}
    )
    synthetic_train_images: int = field(default=DEFAULT_NUM_TRAIN, metadata={"help": "Synthetic training images."})
    synthetic_val_images: int = field(default=DEFAULT_NUM_VAL, metadata={"help": "Synthetic validation images."})
    synthetic_image_size: int = field(default=DEFAULT_IMAGE_SIZE, metadata={"help": "Synthetic image side in pixels."})
    synthetic_domain: str = field(
        default=DEFAULT_DOMAIN,
        metadata={"help": "shapes, or shifted: new colours and caption phrasing (the built-in study's target).",
                  "choices": ["shapes", "shifted"]},
    )
    clip_model: str | None = field(
        default=None, metadata={"help": "CLIP model (folder or id) for CLIPScore during evaluation; skipped if unset."}
    )
    cache_encoder_features: bool = field(
        default=False, metadata={"help": "Encode each image once and train from the cached features (frozen encoder; "
                                  "with --train_shards, one feature shard per tar)."}
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Feature cache folder (default: OUTPUT_DIR/../feature-cache)."}
    )
    train_shards: str | None = field(
        default=None,
        metadata={"help": "Stream training samples from webdataset tar shards as img2dataset writes them "
                  "(KEY.jpg + KEY.txt/KEY.json): braces, globs or a comma list, e.g. 'data/{00000..00099}.tar'. "
                  "Needs --max_steps."},
    )
    val_shards: str | None = field(
        default=None, metadata={"help": "Validation shards (the first --max_eval_images samples are used)."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream --dataset_name (datasets' streaming=True) instead of reading it first. Needs "
                  "--max_steps."},
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={"help": "Streamed data: shuffle the shard order and a buffer of this many samples each epoch "
                  "(0: read in order)."},
    )

    @property
    def uses_synthetic(self) -> bool:
        return not any([self.train_json, self.train_images, self.dataset_name, self.train_shards])

    @property
    def streamed(self) -> bool:
        return bool(self.train_shards or self.streaming)

    def synthetic_options(self) -> dict:
        """`write_synthetic_coco`'s arguments for the built-in set these arguments describe."""
        return {"num_train": self.synthetic_train_images, "num_val": self.synthetic_val_images,
                "image_size": self.synthetic_image_size, "domain": self.synthetic_domain}


@dataclass
class CaptionTrainingArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` whose defaults are the built-in default job (`python train.py`: the small model from
    scratch on the synthetic set, AdamW 1e-3, batch 32, 4 epochs, cosine schedule, beam 3), with evaluation by CIDEr
    every epoch, keeping the best checkpoint. `configs/course_lora.yaml` holds the original report's recipe.

    Generation options also take transformers' `generate` names: `num_beams` (= `generation_num_beams`),
    `max_length` (= `generation_max_length`) and `max_new_tokens`."""

    output_dir: str = field(default="outputs/synthetic-default", metadata={"help": "Where the model and metrics go."})
    learning_rate: float = field(default=1e-3)
    weight_decay: float = field(default=0.01)
    warmup_steps: float = field(default=100)
    per_device_train_batch_size: int = field(default=32)
    per_device_eval_batch_size: int = field(default=64)
    num_train_epochs: float = field(default=4.0)
    lr_scheduler_type: str = field(default="cosine")
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=1)
    load_best_model_at_end: bool = field(default=True)
    metric_for_best_model: str | None = field(default="cider")
    greater_is_better: bool | None = field(default=True)
    logging_steps: float = field(default=50)
    seed: int = field(default=0)
    remove_unused_columns: bool = field(default=False)
    predict_with_generate: bool = field(default=True)
    generation_num_beams: int | None = field(default=None, metadata={"help": "The same as --num_beams."})
    generation_max_length: int | None = field(default=None, metadata={"help": "The same as --max_length."})
    num_beams: int | None = field(default=None, metadata={"help": "Beams for captions (validation and the saved "
                                                            "generation_config.json). Default: 3."})
    max_length: int | None = field(default=None, metadata={"help": "Caption length limit in tokens, the start token "
                                                             "included. Default: 40."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Limit on generated tokens; takes precedence "
                                                                 "over --max_length, as in `generate`."})
    merge: bool = field(default=False, metadata={"help": "Save PEFT runs as a merged full model."})

    def __post_init__(self):
        self.num_beams = self.generation_num_beams = _one_value("num_beams", self.num_beams, self.generation_num_beams, 3)
        self.max_length = self.generation_max_length = _one_value(
            "max_length", self.max_length, self.generation_max_length, 40
        )
        # A launcher (torchrun, accelerate launch --multi_gpu) asking for several processes on a machine without an
        # accelerator would otherwise start independent single-process runs that overwrite one folder; on the CPU,
        # data parallelism goes through gloo, which `use_cpu` selects.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not torch.accelerator.is_available():
            logger.warning("WORLD_SIZE=%s on a machine without an accelerator: training data-parallel on the CPU "
                           "(gloo), as with --use_cpu", os.environ["WORLD_SIZE"])
            self.use_cpu = True
        super().__post_init__()

    def generation_settings(self) -> dict:
        """The keyword arguments of `generate` these arguments ask for."""
        return generation_kwargs(self.num_beams, self.max_length, self.max_new_tokens)


# train.py's option groups, in its order; the study checks and parses its files with the same groups.
ARGUMENT_GROUPS = (ModelArguments, DataArguments, PeftArguments, CaptionTrainingArguments)


def _one_value(name: str, value, alias_value, default):
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"--{name} {value} and --generation_{name} {alias_value} disagree: give one of them")
    return value if value is not None else alias_value if alias_value is not None else default


def json_argument(value: str | dict | None, name: str) -> dict:
    if value is None or isinstance(value, dict):
        return dict(value or {})
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{name} must be a JSON object, e.g. '{{\"n_layer\": 4}}': {error}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{name} must be a JSON object, got {type(parsed).__name__}")
    return parsed



class ConfigLoader(yaml.SafeLoader):
    """YAML as config files and studies read it: only true/false (True, TRUE, ...) are booleans, as in YAML 1.2, so
    that `eval_strategy: no` is the string of `--eval_strategy no` (YAML 1.1 reads no/yes/on/off as booleans). JSON
    reads as before."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_config_file(path: Path) -> dict:
    """A YAML/JSON file of settings (`train.py CONFIG`, a study's `base.train_config`), checked against the options
    before anything runs."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        settings = yaml.load(path.read_text(), Loader=ConfigLoader) or {}  # JSON is YAML
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML/JSON: {error}") from error
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must map option names to values, got a {type(settings).__name__}")
    known = {item.name for group in ARGUMENT_GROUPS for item in fields(group)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)} (see --help)")
    return settings


@cache
def _optional_options() -> frozenset[str]:
    """The options whose type admits None (`int | None`, ...): a file's null sets them to None."""
    return frozenset(name for group in ARGUMENT_GROUPS for name, hint in typing.get_type_hints(group).items()
                     if type(None) in typing.get_args(hint))


def _token(value) -> str:
    """A value as the command line spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)  # what --model_config and the JSON options of TrainingArguments take
    return str(value)


def _value_tokens(parser: ArgumentParser, values: dict) -> list[str]:
    """`values` as command-line flags, for the parser to convert and check as it does the real ones. A null sets an
    optional option to None (no flag can), and is refused for the others."""
    tokens = []
    for key, value in values.items():
        action = parser._option_string_actions.get(f"--{key}")
        if action is None or action.dest != key:
            raise ValueError(f"unknown option {key} (see --help)")
        if value is None:
            if key not in _optional_options():
                raise ArgumentError(action, "takes a value, not null")
            parser.set_defaults(**{key: None})
        elif action.nargs in ("+", "*"):
            items = value if isinstance(value, (list, tuple)) else [value]
            tokens += [f"--{key}", *map(_token, items)]
        elif isinstance(value, (list, tuple)):
            raise ArgumentError(action, f"expected one argument, got a list: {list(value)!r}")
        else:
            tokens.append(f"--{key}={_token(value)}")  # `=`: a value starting with '-' is not read as an option
    return tokens


def parse_train_arguments(values: dict, argv: Sequence[str] = (), prog: str | None = None,
                          exit_on_error: bool = True):
    """(model, data, peft, training) arguments: the defaults, then `values` (option names to values, from a config
    file or a study), then the command-line flags `argv`. `values` are parsed as flags placed before `argv`, so they
    take, convert and refuse what the flags do (`lora_target_modules: c_attn` is `--lora_target_modules c_attn`, a
    list; `lora_rank: 8.0` is refused as `--lora_rank 8.0` is; PyYAML's string '1e-2' becomes 0.01), and `argv`
    overrides them. A null sets an option whose type admits None to None. With `exit_on_error=False` a value that
    does not convert raises `argparse.ArgumentError` instead of exiting."""
    parser = HfArgumentParser(ARGUMENT_GROUPS, prog=prog, exit_on_error=exit_on_error)
    try:
        tokens = _value_tokens(parser, values)
    except ArgumentError as error:
        if exit_on_error:
            parser.error(str(error))
        raise
    return parser.parse_args_into_dataclasses(args=[*tokens, *argv], look_for_args_file=False)
