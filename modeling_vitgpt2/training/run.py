"""Fine-tuning the captioner with `Seq2SeqTrainer`: arguments, model and data assembly, CIDEr-based evaluation,
atomic checkpoints and saving. `train.py` is the command line over `run_training`."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import datasets
import torch
import transformers.trainer
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import AutoTokenizer, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.captions import CaptionCollator, load_coco_captions, load_hf_captions, references_per_image
from ..data.synthetic import (
    DEFAULT_DOMAIN,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    write_synthetic_coco,
)
from ..evaluation.metrics import compute_metrics
from ..inference.generation import generation_kwargs
from ..inference.loading import BASE_MODEL_FOLDER, is_peft_model
from ..model.configuration_vitgpt2 import ViTGPT2Config
from ..model.modeling_vitgpt2 import ViTGPT2ForConditionalGeneration
from ..model.processing_vitgpt2 import ViTGPT2Processor
from ..utils.errors import UserError
from ..utils.io import InvalidJSONError, file_digest, read_json, write_json_atomic
from .peft_methods import (
    PeftArguments,
    apply_peft,
    check_trainable_budget,
    config_overrides,
    count_parameters,
    peft_method,
    resolve_method,
)
from .tokenizer import train_caption_tokenizer

__all__ = [
    "ARGUMENT_GROUPS",
    "CaptionTrainer",
    "CaptionTrainingArguments",
    "DataArguments",
    "ModelArguments",
    "PeftArguments",
    "load_caption_data",
    "run_training",
]


logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "checkpoint_complete.json"
# In a streamed run's checkpoints: where each process's stream stood (`process_<index>.json`).
STREAM_POSITION_FOLDER = "stream_position"


# What `python train.py` trains when it builds a model from scratch; `--model_config` changes single fields of it.
# Sized with the synthetic set's defaults to finish in minutes on 2 CPU cores.
DEFAULT_SCRATCH_MODEL = {
    "encoder_name": "vit_base_patch16_224",
    "encoder_kwargs": {"img_size": 64, "patch_size": 16, "embed_dim": 128, "depth": 3, "num_heads": 4},
    "encoder_hidden_size": 128,
    "n_positions": 64,
    "n_embd": 128,
    "n_layer": 3,
    "n_head": 4,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
# A run whose first steps predict more than this many seconds says so, with its size, while it can still be stopped.
LONG_RUN_SECONDS = 3600
# --model_config fields that leave a from-scratch model the default's size.
SIZE_NEUTRAL_FIELDS = {"resid_pdrop", "embd_pdrop", "attn_pdrop", "initializer_range", "layer_norm_epsilon"}


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


def _json_argument(value: str | dict | None, name: str) -> dict:
    if value is None or isinstance(value, dict):
        return dict(value or {})
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{name} must be a JSON object, e.g. '{{\"n_layer\": 4}}': {error}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{name} must be a JSON object, got {type(parsed).__name__}")
    return parsed


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_caption_data(data_args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training captions, one row per validation image with its references). With no source given, the built-in
    synthetic set is written to `--synthetic_dir` and read from there."""
    if data_args.uses_synthetic:
        paths = write_synthetic_coco(data_args.synthetic_dir, **data_args.synthetic_options())
        data_args = dataclasses.replace(data_args, train_json=str(paths.train_json), train_images=str(paths.train_images),
                                        val_json=str(paths.val_json), val_images=str(paths.val_images))
    if data_args.train_json or data_args.train_images:
        missing = [name for name in ("train_json", "train_images", "val_json", "val_images")
                   if not getattr(data_args, name)]
        if missing:
            raise ValueError(f"the COCO layout needs --{' --'.join(missing)} too")
        train = load_coco_captions(data_args.train_json, data_args.train_images, data_args.skip_bad_images)
        val = load_coco_captions(data_args.val_json, data_args.val_images, data_args.skip_bad_images)
    else:
        common = dict(
            image_column=data_args.image_column,
            caption_column=data_args.caption_column,
            skip_bad_images=data_args.skip_bad_images,
        )
        if data_args.dataset_config_name:
            common["name"] = data_args.dataset_config_name
        train = load_hf_captions(data_args.dataset_name, split=data_args.train_split, **common)
        val = load_hf_captions(data_args.dataset_name, split=data_args.val_split, **common)
    if data_args.max_train_captions is not None:
        train = train.select(range(min(data_args.max_train_captions, len(train))))
    val_images = references_per_image(val)
    if data_args.max_eval_images is not None:
        val_images = val_images.select(range(min(data_args.max_eval_images, len(val_images))))
    return train, val_images


# Captions read from the start of a stream to train the tokenizer of a model built from scratch.
TOKENIZER_SAMPLE_CAPTIONS = 20_000


def load_streamed_caption_data(data_args: DataArguments, seed: int):
    """(training stream of decoded rows, captions to train a tokenizer on, validation images, this process's
    `StreamCounts`). The validation set is small and read into memory: --val_shards, the COCO layout
    (--val_json/--val_images) or the dataset's --val_split."""
    from ..data.streaming import (
        StreamCounts,
        decoded_rows,
        first_captions,
        materialise,
        stream_hf_dataset,
        stream_webdataset,
    )

    if data_args.train_shards:
        raw = stream_webdataset(data_args.train_shards)
    elif data_args.dataset_name:
        raw = stream_hf_dataset(data_args.dataset_name, data_args.train_split, data_args.image_column,
                                data_args.caption_column, data_args.dataset_config_name)
    else:
        raise ValueError("--streaming needs --dataset_name (or give --train_shards)")
    counts = StreamCounts()
    train = _shuffled(decoded_rows(raw, counts), data_args, seed)

    if data_args.val_json or data_args.val_images:
        if not (data_args.val_json and data_args.val_images):
            raise ValueError("--val_json and --val_images go together")
        val = load_coco_captions(data_args.val_json, data_args.val_images, data_args.skip_bad_images)
    elif data_args.val_shards or data_args.dataset_name:
        source = stream_webdataset(data_args.val_shards) if data_args.val_shards else stream_hf_dataset(
            data_args.dataset_name, data_args.val_split, data_args.image_column, data_args.caption_column,
            data_args.dataset_config_name)
        val = materialise(decoded_rows(source, StreamCounts()), data_args.max_eval_images)
    else:
        raise ValueError("streamed training needs a validation set: --val_shards, or --val_json and --val_images")
    val_images = references_per_image(val)
    if data_args.max_eval_images is not None:
        val_images = val_images.select(range(min(data_args.max_eval_images, len(val_images))))
    return train, (lambda: first_captions(raw, TOKENIZER_SAMPLE_CAPTIONS)), val_images, counts


def _shuffled(stream: datasets.IterableDataset, data_args: DataArguments, seed: int) -> datasets.IterableDataset:
    """A training stream with its shard order and a `--shuffle_buffer` of samples shuffled, seeded (the image
    stream and the stream of cached features alike, so that both give the same batches)."""
    if data_args.shuffle_buffer > 0:
        return stream.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer)
    return stream


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_processor_and_model(
    model_args: ModelArguments, overrides: dict, train_captions: list[str]
) -> tuple[ViTGPT2Processor, ViTGPT2ForConditionalGeneration, bool]:
    """(processor, base model, trained from scratch?) from whichever source the arguments name."""
    model_config = _json_argument(model_args.model_config, "model_config")
    attention = {"attn_implementation": model_args.attn_implementation}
    from_scratch = not (model_args.model_name_or_path or model_args.encoder or model_args.decoder)
    if from_scratch:
        model_config = {**DEFAULT_SCRATCH_MODEL, **model_config}
    if model_args.model_name_or_path:
        processor = ViTGPT2Processor.from_pretrained(model_args.model_name_or_path)
        model = ViTGPT2ForConditionalGeneration.from_pretrained(
            model_args.model_name_or_path, **model_config, **overrides, **attention
        )
        return processor, model, False
    if model_args.encoder or model_args.decoder:
        if not (model_args.encoder and model_args.decoder):
            raise ValueError("--encoder and --decoder go together (or give --model_name_or_path)")
        model = ViTGPT2ForConditionalGeneration.from_encoder_decoder_pretrained(
            model_args.encoder, model_args.decoder, **model_config, **overrides
        )
        model.set_attn_implementation(model_args.attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(model_args.decoder)
        return ViTGPT2Processor.from_timm_model(model.encoder.model, tokenizer), model, False

    if model_args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    else:
        tokenizer = train_caption_tokenizer(train_captions, vocab_size=model_args.tokenizer_vocab_size)
    end = tokenizer.eos_token_id
    config = ViTGPT2Config(
        **{
            "vocab_size": len(tokenizer),
            "bos_token_id": end,
            "eos_token_id": end,
            "pad_token_id": end,
            "decoder_start_token_id": end,
            **model_config,
            **overrides,
        }
    )
    config._attn_implementation = model_args.attn_implementation
    model = ViTGPT2ForConditionalGeneration(config)
    return ViTGPT2Processor.from_timm_model(model.encoder.model, tokenizer), model, True


# ----------------------------------------------------------------------------------------------------------------
# Trainer


class CaptionTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose evaluation writes a caption per validation image and scores them with CIDEr (and
    CLIPScore when a CLIP model is given), and whose checkpoints count only once completely written.

    Evaluation shards the images over the processes and gathers `(image, caption)` pairs, so each image is scored
    exactly once; the stock loop pads the last batch with duplicates, which would bias CIDEr.
    """

    def __init__(self, *args, eval_collator=None, clip_model: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.clip_model = clip_model
        self._clip = None
        self._stream_position = None
        if self._streamed:
            # accelerate then builds torchdata's `StatefulDataLoader`, whose `state_dict()` holds the stream's
            # position (datasets' `IterableDataset.state_dict()`); Trainer 5.24's `AcceleratorConfig` has no field
            # for it, and saves no data loader state in checkpoints (`_save_checkpoint` below does).
            self.accelerator.dataloader_config.use_stateful_dataloader = True

    @property
    def _streamed(self) -> bool:
        return isinstance(self.train_dataset, datasets.IterableDataset)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        requested = (self.args.fsdp_plugin_args is not None
                     or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
        if not (requested and state.distributed_type == DistributedType.MULTI_CPU):
            return
        # accelerate 1.15 turns FSDP on for GPUs and other accelerators only (AcceleratorState.__init__), so on the
        # CPU it would train plain data-parallel and drop the FSDP settings; torch's FSDP2 (`fully_shard`) does run
        # on the CPU over gloo. The same switch as accelerate's for GPUs, so that its own FSDP2 path shards the model.
        plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on the CPU works with FSDP2 only: set fsdp_version: 2 in the accelerate config "
                             "(configs/accelerate/fsdp_cpu.yaml)")
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # FSDP2 gives the model a class of its own made in torch (`FSDPViTGPT2ForConditionalGeneration`); saved
        # under it, the folder's auto_map would name a torch module and torch's FSDP sources would be copied in.
        model_class = type(self.model)
        if isinstance(self.model, FSDPModule):
            self.model.__class__ = next(base for base in model_class.__bases__ if base is not FSDPModule)
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.model.__class__ = model_class

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        images = eval_dataset if eval_dataset is not None else self.eval_dataset
        state = PartialState()
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        settings = {**self.args.generation_settings(), **gen_kwargs}
        my_rows = list(range(state.process_index, len(images), state.num_processes))
        batch_size = self.args.per_device_eval_batch_size
        captions = {}
        progress = tqdm(total=len(my_rows), desc="captioning validation images", disable=not state.is_main_process)
        batches = [my_rows[start : start + batch_size] for start in range(0, len(my_rows), batch_size)]
        spare_batches = 0
        if self.is_fsdp_enabled:
            # Each forward of a sharded model gathers its weights from every process: all processes must make the
            # same calls, step for step (`synced_gpus`, which generate turns on by itself only for FSDP1 or for
            # models that transformers sharded), and as many batches, so one with fewer images captions spare ones.
            settings["synced_gpus"] = True
            most = math.ceil(math.ceil(len(images) / state.num_processes) / batch_size)
            spare_batches = most - len(batches)
        for number, batch_rows in enumerate(batches + [[0]] * spare_batches):
            rows = [images[index] for index in batch_rows]
            batch = self.eval_collator(rows)
            inputs = {key: value.to(self.args.device) for key, value in batch.items()}
            with torch.inference_mode():
                sequences = model.generate(**inputs, **settings)
            if number < len(batches):
                for row, caption in zip(rows, self.processing_class.batch_decode(sequences)):
                    captions[row["image_name"]] = caption
                progress.update(len(rows))
        progress.close()
        model.train(was_training)

        predictions = {}
        for part in gather_object([captions]):
            predictions.update(part)
        references = {row["image_name"]: row["references"] for row in images}
        sources = {row["image_name"]: row.get("image_path") or row.get("image") for row in images}
        scores = compute_metrics(predictions, references, during_training=True, clip=self._loaded_clip(),
                                 images=sources if self.clip_model else None,
                                 training_captions=self._training_captions(), progress=state.is_main_process)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in scores.values.items()}
        metrics[f"{metric_key_prefix}_images"] = len(predictions)
        if state.is_main_process and scores.skipped and not getattr(self, "_told_skipped", False):
            for name, reason in scores.skipped.items():
                logger.info("%s skipped during evaluation: %s", name, reason)
            self._told_skipped = True
        if state.is_main_process:
            write_json_atomic(Path(self.args.output_dir) / "eval_predictions.json", predictions)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _loaded_clip(self):
        from ..evaluation.clip_score import load_clip

        if self.clip_model and self._clip is None:
            self._clip = load_clip(self.clip_model, device=self.args.device)
        return self._clip

    def _training_captions(self) -> list[str] | None:
        # A stream has no end to read them from: the novelty metrics then say they were skipped.
        if not isinstance(self.train_dataset, datasets.Dataset) or "caption" not in self.train_dataset.column_names:
            return None
        return list(self.train_dataset["caption"])

    # -- checkpoints: complete before counted, verified before resumed, older ones deleted only after a newer one is
    # complete. Trainer's own save writes the files; these overrides order what happens around it.

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        self._loss_sum_before_resume = self._stream_position = None
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self._loss_sum_before_resume = read_checkpoint_manifest(resume_from_checkpoint).get("train_loss_sum")
            if self._streamed and not self.args.ignore_data_skip:
                self._stream_position = read_stream_position(resume_from_checkpoint, self.args.process_index,
                                                             self.args.world_size)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            # Left by a run that stopped while writing it, or damaged and skipped when resuming: start it afresh,
            # so that no stale file (or stale manifest) mixes with the new ones.
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()  # before any process writes its RNG state into the folder
        save_total_limit = self.args.save_total_limit
        # Trainer rotates at the end of its save, before the manifest below exists: a kill in between would leave
        # no complete checkpoint at all. Rotation runs here instead, once this checkpoint is complete.
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        if self._streamed:
            # Each process reads shards of its own. accelerate's snapshot of the data loader is taken as of the last
            # batch it handed to training (it reads one batch ahead), which is where a resume must continue.
            loader = self.callback_handler.train_dataloader
            write_json_atomic(folder / STREAM_POSITION_FOLDER / f"process_{self.args.process_index}.json",
                              {"pass": loader.iteration, "data_loader": loader.state_dict()})
        self.accelerator.wait_for_everyone()  # every process's files are in the folder
        if self.args.should_save:
            loss_sum = self._total_loss_scalar + self._tr_loss.item() + (self._loss_sum_before_resume or 0.0)
            write_checkpoint_manifest(folder, self.state.global_step, loss_sum)
            rotate_complete_checkpoints(run_dir, self.state.global_step, save_total_limit,
                                        self.state.best_model_checkpoint)

    def _init_training_state(self, *args, **kwargs):
        epochs_trained, batches_trained = super()._init_training_state(*args, **kwargs)
        position = self._stream_position
        if position is None:
            return epochs_trained, batches_trained
        if position["data_loader"]["_iterator_finished"]:
            # Saved at the last batch of a pass: the next pass starts from its beginning.
            self._stream_position = None
            return position["pass"] + 1, 0
        # Trainer takes a stream's pass for `max_steps` steps; the position knows which pass it was in and how far,
        # which keeps Trainer's step and epoch counts those of an uninterrupted run.
        return position["pass"], _batches_read(position["data_loader"])

    def _run_epoch(self, *args, **kwargs):
        if self.state.global_step >= self.state.max_steps:
            # Resumed from the run's last checkpoint: nothing is left to train, but Trainer would run one more step
            # before it checks.
            self.control.should_training_stop = True
            return
        position, self._stream_position = self._stream_position, None
        if position is None:
            return super()._run_epoch(*args, **kwargs)
        kwargs["train_dataloader"].load_state_dict(position["data_loader"])
        logger.info(f"Continuing the stream from the checkpoint's position, pass {position['pass']} after "
                    f"{_batches_read(position['data_loader'])} batches: the trained samples are not decoded again")
        # The stream now continues where the checkpoint left it. Trainer would still fast-forward past the batches
        # trained before (accelerate's `skip_first_batches`), reading them again and skipping as many new ones.
        with mock.patch.object(transformers.trainer, "skip_first_batches", lambda loader, num_batches: loader):
            return super()._run_epoch(*args, **kwargs)

    def _finalize_training(self, trial, num_train_samples, start_time):
        # Trainer's `train_loss` averages the steps of this call only. After a resume, fold in the loss sum the
        # checkpoint recorded, scaled so that Trainer's division by this call's steps gives the whole run's mean.
        resumed_at = self._initial_global_step
        if resumed_at and self._loss_sum_before_resume is not None:
            self._total_loss_scalar += self._tr_loss.item()
            self._tr_loss -= self._tr_loss
            whole_run = self._loss_sum_before_resume + self._total_loss_scalar
            steps_here = max(self.state.global_step - resumed_at, 0.001)  # Trainer's guard against zero steps
            self._total_loss_scalar = whole_run * steps_here / self.state.global_step
        return super()._finalize_training(trial, num_train_samples, start_time)


def _checkpoint_step(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
    return int(suffix) if folder.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and suffix.isdigit() else None


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders, oldest step first."""
    folders = [path for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
               if path.is_dir() and _checkpoint_step(path) is not None]
    return sorted(folders, key=_checkpoint_step)


def write_checkpoint_manifest(folder: Path, global_step: int, train_loss_sum: float) -> None:
    """Marks a checkpoint complete: `checkpoint_complete.json`, written last, lists every file's size and SHA-256
    (so that resuming can tell a damaged file) and the sum of the step losses so far (for `train_loss`)."""
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_digest(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_COMPLETE
    }
    write_json_atomic(
        folder / CHECKPOINT_COMPLETE, {"global_step": global_step, "train_loss_sum": train_loss_sum, "files": files}
    )


def read_checkpoint_manifest(folder: str | os.PathLike) -> dict:
    manifest = read_json(Path(folder) / CHECKPOINT_COMPLETE, "checkpoint manifest")
    if not isinstance(manifest, dict):
        raise InvalidJSONError(f"{Path(folder) / CHECKPOINT_COMPLETE} must hold a JSON object")
    return manifest


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from (naming the file), or None when every file matches its manifest."""
    folder = Path(folder)
    if not (folder / CHECKPOINT_COMPLETE).is_file():
        return f"{folder} was not completely written (no {CHECKPOINT_COMPLETE}: the run stopped while saving it)"
    try:
        manifest = read_checkpoint_manifest(folder)
    except ValueError as error:
        return str(error)
    for name, expected in manifest.get("files", {}).items():  # manifests of older versions list no files
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes where {expected['size']} were written (truncated?)"
        if file_digest(path) != expected["sha256"]:
            return f"{path} does not match the SHA-256 recorded when it was written (damaged)"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint folder that was completely written and whose files are intact; each newer one that is
    not is named in a warning."""
    for folder in reversed(_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        logger.warning(f"not resuming from {folder.name}: {problem}; trying the one before it")
    return None


def rotate_complete_checkpoints(output_dir: Path, newest_step: int, limit: int | None, best: str | None) -> None:
    """Keeps the `limit` newest complete checkpoints up to `newest_step` (and the best one); deletes older complete
    ones and incomplete ones older than the newest, whose writing was interrupted. Called only once the checkpoint
    of `newest_step` is complete, so a complete checkpoint always remains. The manifest goes first, so a kill
    halfway through a deletion leaves a folder that is not taken for complete."""
    if not limit or limit <= 0:
        return
    older = [folder for folder in _checkpoints(output_dir) if _checkpoint_step(folder) <= newest_step]
    complete = [folder for folder in older if (folder / CHECKPOINT_COMPLETE).is_file()]
    keep = set(complete[-limit:])
    if best is not None:
        keep.add(Path(best))
    for folder in older:
        if folder not in keep:
            logger.info(f"Deleting older checkpoint [{folder}] due to args.save_total_limit")
            (folder / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)


def read_stream_position(folder: str | os.PathLike, process_index: int, num_processes: int) -> dict:
    """Where this process's stream stood when the checkpoint `folder` was saved."""
    positions = Path(folder) / STREAM_POSITION_FOLDER
    saved = len(list(positions.glob("process_*.json")))
    if saved == 0:
        raise ValueError(f"{folder} holds no stream position ({STREAM_POSITION_FOLDER}/, written by this package's "
                         "streamed runs since they resume without reading the stream again): start afresh without "
                         "--resume_from_checkpoint, or pass --ignore_data_skip true to restart the stream from its "
                         "beginning")
    if saved != num_processes:
        raise ValueError(
            f"{positions} holds the stream positions of {saved} processes, but this run has {num_processes}: resume "
            f"with {saved} processes (each reads shards of its own), or start afresh without --resume_from_checkpoint"
        )
    return read_json(positions / f"process_{process_index}.json", "stream position")


def _batches_read(loader_state: dict) -> int:
    # torchdata's `StatefulDataLoader` counts the batches of the pass in one key without workers, in a snapshot plus
    # the steps since it with workers.
    if "_num_yielded" in loader_state:
        return loader_state["_num_yielded"]
    return loader_state["_snapshot"]["_snapshot_step"] + loader_state["_steps_since_snapshot"]


def resolve_resume(training_args: CaptionTrainingArguments) -> str | None:
    requested = training_args.resume_from_checkpoint
    if requested in (None, "", "False", "false"):
        return None
    if requested in (True, "True", "true", "last"):
        checkpoint = last_complete_checkpoint(training_args.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"no complete checkpoint in {training_args.output_dir} to resume from; drop --resume_from_checkpoint "
                "to start afresh"
            )
        return checkpoint
    problem = checkpoint_problem(requested)
    if problem is not None:
        raise FileNotFoundError(
            f"cannot resume from {requested}: {problem}. Use --resume_from_checkpoint true to pick the newest intact "
            "checkpoint"
        )
    return requested


# ----------------------------------------------------------------------------------------------------------------
# The run


class OutputFolderInUseError(UserError, RuntimeError):
    """Another training run holds the output folder."""


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike, process_index: int):
    """Holds a lock on the output folder for the run, so that a second run into it stops at once with an error naming
    the folder and the holder's pid, instead of both overwriting each other's checkpoints. Each process of a
    multi-process run holds its own lock file (`.train.lock.<process index>`); the OS releases it when the process
    ends, however it ends, so a killed run never leaves a stale lock."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".train.lock.{process_index}"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise OutputFolderInUseError(
                f"{folder} is in use by another training run (pid {holder}); wait for it to finish or choose another "
                "--output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    peft_args: PeftArguments,
    training_args: CaptionTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> dict:
    """Trains, evaluates and saves; returns the final evaluation metrics. Publishing is the Hub layer's job:
    `train.py --push_to_hub` calls `modeling_vitgpt2.applications.hub.push_training_output` once this returns. `callbacks` are
    added to the Trainer's (the study uses them to show progress). Holds the output folder for the run
    (`hold_output_dir`)."""
    if training_args.push_to_hub:
        raise ValueError(
            "run_training does not push: Trainer's own push would replace the model card with a generic one. Train "
            "with push_to_hub=False, then call modeling_vitgpt2.applications.hub.push_training_output(training_args, output_dir) "
            "(train.py --push_to_hub does both)"
        )
    if training_args.hub_token is not None:
        # Trainer pickles its arguments whole into every checkpoint's training_args.bin; no file may hold a token.
        training_args = dataclasses.replace(training_args, hub_token=None)
    with hold_output_dir(training_args.output_dir, training_args.process_index):
        return _run_training(model_args, data_args, peft_args, training_args, callbacks)


def _run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    peft_args: PeftArguments,
    training_args: CaptionTrainingArguments,
    callbacks: list[TrainerCallback] | None,
) -> dict:
    set_seed(training_args.seed)
    state = PartialState()
    check_requested_sharding(state)
    stream_counts = None
    if data_args.streamed:
        training_args = _streamed_training_args(data_args, training_args)
        with state.main_process_first():
            train_rows, tokenizer_captions, val_images, stream_counts = load_streamed_caption_data(
                data_args, training_args.seed
            )
    else:
        with state.main_process_first():
            train_rows, val_images = load_caption_data(data_args)
        tokenizer_captions = lambda: list(train_rows["caption"])  # noqa: E731

    from_scratch = not (model_args.model_name_or_path or model_args.encoder or model_args.decoder)
    method, peft_args = resolve_method(peft_args, from_scratch)
    processor, model, from_scratch = build_processor_and_model(
        model_args, config_overrides(method, peft_args), tokenizer_captions() if from_scratch else []
    )
    generation = model.generation_config
    generation.update(**training_args.generation_settings())

    output_dir = Path(training_args.output_dir)
    if peft_method(method).uses_peft and (not model_args.model_name_or_path or config_overrides(method, peft_args)):
        # A PEFT adapter needs its base model. One built here (from scratch, from pretrained parts, or with new
        # adapter/prefix modules) is saved once so that `PeftModel.from_pretrained(base, OUTPUT_DIR)` finds it.
        base_dir = output_dir / BASE_MODEL_FOLDER
        if state.is_main_process:
            model.save_pretrained(base_dir)
            processor.save_pretrained(base_dir)
        _record_base(model, str(base_dir.resolve()))
    elif model_args.model_name_or_path:
        _record_base(model, model_args.model_name_or_path)

    model = apply_peft(model, method, peft_args)
    trainable, total = count_parameters(model)
    logger.warning(
        f"--peft {method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    if state.is_main_process:
        print(f"[train] method={method} trainable={trainable:,} total={total:,} ({100 * trainable / total:.2f}%)")
        if from_scratch and _changes_default_size(model_args):
            default_total = sum(p.numel() for p in _default_scratch_model(len(processor.tokenizer)).parameters())
            print(
                f"[train] NOTE: training a model of {total:,} parameters from scratch, not the built-in default's "
                f"{default_total:,} (--model_config changes its size). The time per step shows after the first steps."
            )
    check_trainable_budget(trainable, peft_args.max_trainable_params, method)

    collator = CaptionCollator(processor, max_length=data_args.max_caption_length)
    eval_collator = collator
    callbacks = [RunTimeEstimate(trainable, total), *(callbacks or [])]
    if data_args.cache_encoder_features:
        collator, eval_collator, page_out, train_rows = _feature_cache_collators(
            data_args, training_args, peft_args, model, processor, collator, train_rows, val_images, stream_counts
        )
        callbacks.append(page_out)

    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=val_images,
        data_collator=collator,
        processing_class=processor,
        eval_collator=eval_collator,
        clip_model=data_args.clip_model,
        callbacks=callbacks,
    )
    resume = resolve_resume(training_args)
    resumed_at_step = read_checkpoint_manifest(resume)["global_step"] if resume else 0  # rotation may delete it
    train_result = trainer.train(resume_from_checkpoint=resume)
    # Under FSDP each process holds its shard of the weights (DTensors), elsewhere all of them. Counted before the
    # evaluation, which leaves the FSDP units that do not reshard after a forward (the root's) gathered.
    parameters_held = gather_object([sum(
        (parameter.to_local() if isinstance(parameter, DTensor) else parameter).numel()
        for parameter in trainer.model_wrapped.parameters()
    )])
    metrics = trainer.evaluate()
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_metrics("eval", metrics)
    if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # The weights are sharded over the processes: Trainer gathers them (every process takes part) and saves.
        trainer.save_model(str(output_dir))
        if state.is_main_process:
            processor.save_pretrained(output_dir)
    else:
        save_trained_model(trainer.model, processor, output_dir, training_args.merge, state)
    stream_summary = _stream_summary(data_args, training_args, stream_counts, resumed_at_step)
    if state.is_main_process:
        write_json_atomic(
            output_dir / "training_summary.json",
            {
                "peft_method": method,
                "trainable_parameters": trainable,
                "total_parameters": total,
                "world_size": state.num_processes,
                "parameters_held_per_process": parameters_held,
                "distributed_type": str(getattr(state.distributed_type, "value", state.distributed_type)),
                "train_captions": len(train_rows) if isinstance(train_rows, datasets.Dataset) else None,
                **({"stream": stream_summary} if stream_summary else {}),
                "eval_images": len(val_images),
                "hyperparameters": {
                    "learning_rate": training_args.learning_rate,
                    "weight_decay": training_args.weight_decay,
                    "per_device_train_batch_size": training_args.per_device_train_batch_size,
                    "num_train_epochs": training_args.num_train_epochs,
                    "max_steps": training_args.max_steps,
                    "optim": getattr(training_args.optim, "value", training_args.optim),
                    "lr_scheduler_type": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
                    "num_beams": generation.num_beams,
                },
                "peft": {key: value for key, value in vars(peft_args).items()},
                "sources": {
                    "model_name_or_path": model_args.model_name_or_path,
                    "encoder": model_args.encoder,
                    "decoder": model_args.decoder,
                    "dataset_name": data_args.dataset_name,
                    "synthetic_data": data_args.uses_synthetic,
                },
            },
        )
    return metrics


def check_requested_sharding(state: PartialState) -> None:
    """Refuses a run whose accelerate config asks for DeepSpeed on the CPU. accelerate 1.15 turns DeepSpeed on only
    `not cpu` (`AcceleratorState.__init__`): with `use_cpu` it trains plain data-parallel without a word, so a run
    meant to shard the model would hold all of it in every process; without `use_cpu`, on a machine without GPUs,
    each process counts itself the only one while DeepSpeed sees them all, and DeepSpeed's batch check fails."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and (
        state.distributed_type != DistributedType.DEEPSPEED
    ):
        raise ValueError(
            "the accelerate config asks for DeepSpeed, which accelerate 1.15 runs on GPUs only: here it would train "
            f"this job as {state.distributed_type.value} (plain data-parallel). Run "
            "configs/accelerate/deepspeed_zero2.yaml on GPUs, or shard on the CPU with configs/accelerate/fsdp_cpu.yaml."
        )


def _streamed_training_args(data_args: DataArguments,
                            training_args: CaptionTrainingArguments) -> CaptionTrainingArguments:
    """Checks a streamed run's settings; returns the training arguments it trains with."""
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError("a stream has no length to count epochs in: give --max_steps (the schedule runs over them)")
    if data_args.cache_encoder_features and not data_args.train_shards:
        raise ValueError("--cache_encoder_features on a stream needs --train_shards (webdataset tar files: the "
                         "features are kept shard by shard); for --dataset_name, drop --streaming")
    # Each process reads its own shards (accelerate's `IterableDataset.shard`), instead of process 0 reading every
    # batch and sending the others their slices (accelerate's default for iterable datasets).
    return dataclasses.replace(
        training_args, accelerator_config=dataclasses.replace(training_args.accelerator_config, dispatch_batches=False)
    )


def _stream_summary(data_args: DataArguments, training_args: CaptionTrainingArguments, counts,
                    resumed_at_step: int) -> dict | None:
    """Used and skipped samples summed over the processes (every process must call this). A resumed run counts what
    it read itself, from the step it resumed at: the samples before were not read again."""
    if counts is None:
        return None
    summary = {"train_shards": data_args.train_shards, "dataset_name": data_args.dataset_name if data_args.streaming
               else None, "counted_from_step": resumed_at_step}
    if training_args.dataloader_num_workers > 0:
        summary["samples"] = ("not counted: with --dataloader_num_workers > 0 the counts stay in the workers; the "
                              "log has a line per skipped sample")
        return summary
    parts = gather_object([counts])
    summary["used_samples"] = sum(part.used for part in parts)
    summary["skipped_samples"] = sum(part.skipped for part in parts)
    summary["skipped_by_reason"] = dict(sum((part.reasons for part in parts), start=type(counts.reasons)()))
    if summary["skipped_samples"]:
        logger.warning(f"skipped {summary['skipped_samples']} bad sample(s) of the stream: "
                       f"{summary['skipped_by_reason']}")
    return summary


def _record_base(model: ViTGPT2ForConditionalGeneration, name_or_path: str) -> None:
    # peft writes the base model's `name_or_path` into adapter_config.json as `base_model_name_or_path`.
    model.name_or_path = name_or_path
    model.config._name_or_path = name_or_path


def save_trained_model(model, processor: ViTGPT2Processor, output_dir: Path, merge: bool, state: PartialState) -> None:
    """PEFT runs: a standard peft adapter folder (or, with `merge`, a merged full model); full runs: the model."""
    if not state.is_main_process:
        return
    if is_peft_model(model) and merge:
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def _changes_default_size(model_args: ModelArguments) -> bool:
    changed = _json_argument(model_args.model_config, "model_config")
    # The default tokenizer_vocab_size is the default model's.
    return model_args.tokenizer_vocab_size != ModelArguments.tokenizer_vocab_size or any(
        changed[name] != DEFAULT_SCRATCH_MODEL.get(name) for name in set(changed) - SIZE_NEUTRAL_FIELDS
    )


def _default_scratch_model(vocab_size: int) -> ViTGPT2ForConditionalGeneration:
    return ViTGPT2ForConditionalGeneration(ViTGPT2Config(**DEFAULT_SCRATCH_MODEL, vocab_size=vocab_size))


class RunTimeEstimate(TrainerCallback):
    """After the first steps, says how long the training steps will take, and warns with the model's size when
    that is over an hour (`LONG_RUN_SECONDS`), while the run can still be stopped cheaply. The first step is left
    out of the rate: it pays for warm-up."""

    def __init__(self, trainable: int, total: int, measured_steps: int = 2, clock=time.perf_counter):
        self.trainable, self.total, self.measured_steps, self.clock = trainable, total, measured_steps, clock
        self.started: float | None = None
        self.start_step = 0
        self.estimate: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.estimate is not None:
            return
        if self.started is None:
            self.started, self.start_step = self.clock(), state.global_step
            return
        measured = state.global_step - self.start_step
        if measured < self.measured_steps:
            return
        per_step = (self.clock() - self.started) / measured
        self.estimate = per_step * (state.max_steps - state.global_step)
        if not state.is_world_process_zero:
            return
        message = (
            f"[train] {per_step:.2f} s per step: about {_duration(self.estimate)} for the remaining "
            f"{state.max_steps - state.global_step:,} of {state.max_steps:,} steps (evaluation not included)"
        )
        if self.estimate > LONG_RUN_SECONDS:
            message += (
                f"\n[train] WARNING: this run is long: {self.total:,} parameters ({self.trainable:,} trained). Stop "
                "it (Ctrl-C) and shrink it (--max_steps, --num_train_epochs, a smaller --model_config) if that is "
                "not what you meant."
            )
            logger.warning(message)
        print(message, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class PageOutEncoderCallback(TrainerCallback):
    """With `--cache_encoder_features` nothing runs the encoder while training, so its weights wait in a memory-mapped
    file (`page_out_encoder`) from the start of training, after the Trainer has placed the model, and go back to the
    model's device at the end, so that the trained model can caption pixels again."""

    def __init__(self, model: ViTGPT2ForConditionalGeneration, folder: Path):
        self.model, self.folder = model, folder
        self.device: torch.device | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from ..data.feature_cache import page_out_encoder

        if isinstance(next(self.model.get_encoder().parameters()), DTensor):
            return  # sharded by FSDP: each process holds its share only, and offloading it is FSDP's setting
        self.device = next(self.model.get_encoder().parameters()).device
        try:
            page_out_encoder(self.model, self.folder)
        except OSError as error:  # a full disk costs the memory saving, not the run
            logger.warning("Keeping the encoder in memory: paging it out to %s failed (%s).", self.folder, error)

    def on_train_end(self, args, state, control, **kwargs):
        if self.device is not None:
            self.model.get_encoder().to(self.device)


def _feature_cache_collators(data_args, training_args, peft_args, model, processor, collator, train_rows, val_images,
                             stream_counts):
    """(training collator, evaluation collator, the callback paging the encoder out, training rows): with
    --train_shards the rows become a stream of cached features, whose bad samples `stream_counts` counts."""
    from ..data.feature_cache import CachedFeatureCollator, EncoderFeatureCache, stream_feature_shards
    from ..data.streaming import expand_shards

    if peft_args.train_encoder:
        raise ValueError("--cache_encoder_features needs a frozen encoder: pass --train_encoder false")
    cache_dir = Path(data_args.feature_cache_dir or Path(training_args.output_dir).parent / "feature-cache")
    base = model.get_base_model() if is_peft_model(model) else model
    # The pre-pass runs wherever the encoder is: on the training device, where Trainer would put the model anyway.
    base.to(training_args.device)
    cache = EncoderFeatureCache(cache_dir, base, processor)
    if data_args.train_shards:
        shards = cache.build_shards(expand_shards(data_args.train_shards),
                                    batch_size=training_args.per_device_eval_batch_size)
        train_rows = _shuffled(stream_feature_shards(shards, stream_counts), data_args, training_args.seed)
    else:
        # One call per dataset: `build` reads a dataset's `image_path` column directly, without a dict per row.
        cache.build(train_rows, batch_size=training_args.per_device_eval_batch_size)
    cache.build(val_images, batch_size=training_args.per_device_eval_batch_size)
    collators = CachedFeatureCollator(collator, cache), CachedFeatureCollator(collator, cache)
    return *collators, PageOutEncoderCallback(base, cache_dir), train_rows
