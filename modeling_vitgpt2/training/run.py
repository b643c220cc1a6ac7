"""One training run: data and model assembly from the parsed arguments, the run itself (`run_training`, which
`train.py` calls) with its callbacks, and saving the trained model."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, gather_object
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, IntervalStrategy, TrainerCallback, set_seed

from ..data.captions import CaptionCollator, load_coco_captions, load_hf_captions, references_per_image
from ..data.streaming import EmptyStreamCheck
from ..data.synthetic import synthetic_set
from ..inference.loading import BASE_MODEL_FOLDER, is_peft_model
from ..model.configuration_vitgpt2 import ViTGPT2Config
from ..model.modeling_vitgpt2 import ViTGPT2ForConditionalGeneration
from ..model.processing_vitgpt2 import ViTGPT2Processor
from ..utils.io import naming_a_full_disk, read_json, write_json_atomic
from .arguments import CaptionTrainingArguments, DataArguments, ModelArguments, json_argument
from .checkpoints import (
    base_change,
    base_weights_digest,
    hold_output_dir,
    read_checkpoint_manifest,
    resolve_resume,
    run_settings,
    settings_change,
)
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
from .trainer import CaptionTrainer, saved_weight_bytes

__all__ = [
    "DEFAULT_SCRATCH_MODEL",
    "PageOutEncoderCallback",
    "RunTimeEstimate",
    "build_processor_and_model",
    "check_requested_sharding",
    "load_caption_data",
    "load_streamed_caption_data",
    "run_training",
    "save_trained_model",
    "stream_identity",
]


logger = logging.getLogger(__name__)


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



# ----------------------------------------------------------------------------------------------------------------
# Data


def load_caption_data(data_args: DataArguments, held: contextlib.ExitStack,
                      say: Callable[[str], None] = print) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training captions, one row per validation image with its references). With no source given, the built-in
    synthetic set is read from `--synthetic_dir`, written there first unless it holds the set of these options
    already, and kept from being rewritten with other options until `held` closes (`synthetic_set`, which `say`s
    when it writes the set or waits for another run's writing)."""
    if data_args.uses_synthetic:
        paths = held.enter_context(synthetic_set(data_args.synthetic_dir, data_args.synthetic_options(), say,
                                                 job="training run", setting="--synthetic_dir"))
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


def load_streamed_caption_data(data_args: DataArguments, seed: int, evaluates: bool = True):
    """(training stream of decoded rows, captions to train a tokenizer on, validation images, this process's
    `StreamCounts`). The validation set is small and read into memory: --val_shards, the COCO layout
    (--val_json/--val_images) or the dataset's --val_split; a run that `evaluates` not at all (--eval_strategy no)
    may give none (validation images None)."""
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
    train = decoded_rows(_shuffled(raw, data_args, seed), counts)

    if data_args.val_json or data_args.val_images:
        if not (data_args.val_json and data_args.val_images):
            raise ValueError("--val_json and --val_images go together")
        val = load_coco_captions(data_args.val_json, data_args.val_images, data_args.skip_bad_images)
    elif data_args.val_shards or data_args.dataset_name:
        source = stream_webdataset(data_args.val_shards) if data_args.val_shards else stream_hf_dataset(
            data_args.dataset_name, data_args.val_split, data_args.image_column, data_args.caption_column,
            data_args.dataset_config_name)
        val = materialise(decoded_rows(source, StreamCounts(), keep_shard=True), data_args.max_eval_images)
    elif evaluates:
        raise ValueError("streamed training needs a validation set: --val_shards, or --val_json and --val_images "
                         "(or --eval_strategy no, to train without evaluating)")
    else:
        return train, (lambda: first_captions(raw, TOKENIZER_SAMPLE_CAPTIONS)), None, counts
    val_images = references_per_image(val)
    if data_args.max_eval_images is not None:
        val_images = val_images.select(range(min(data_args.max_eval_images, len(val_images))))
    return train, (lambda: first_captions(raw, TOKENIZER_SAMPLE_CAPTIONS)), val_images, counts


def stream_identity(data_args: DataArguments, seed: int) -> dict:
    """What a saved stream position is an index into: the shard list (each shard's absolute path as given, its size,
    and the file that path resolves to), or the dataset and split, the shuffle buffer and its seed, and whether the
    stream is of images or of cached features."""
    from ..data.streaming import expand_shards

    if data_args.train_shards:
        # The resolved file lets a resume name the same shards another way (through a symbolic link, or the real path
        # of a linked folder) without being taken for another stream (`stream_change`).
        shards = [[name, None, None] if "://" in name else
                  [os.path.abspath(name), os.path.getsize(name), os.path.realpath(name)]
                  for name in expand_shards(data_args.train_shards)]
        source = "--train_shards"
    else:
        shards = []
        source = f"{data_args.dataset_name} {data_args.dataset_config_name or ''} split {data_args.train_split}"
    return {"source": source, "shards": shards, "shuffle_buffer": data_args.shuffle_buffer,
            "seed": seed if data_args.shuffle_buffer > 0 else None,
            "pipeline": "cached features" if data_args.cache_encoder_features else "images"}


def _shuffled(stream: datasets.IterableDataset, data_args: DataArguments, seed: int) -> datasets.IterableDataset:
    """A training stream with its shard order and a `--shuffle_buffer` of samples shuffled, seeded (the image
    stream and the stream of cached features alike, so that both give the same batches). The buffer holds what the
    stream holds at this point: shuffle undecoded samples (encoded image bytes), not decoded images."""
    if data_args.shuffle_buffer > 0:
        return stream.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer)
    return stream


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_processor_and_model(
    model_args: ModelArguments, overrides: dict, train_captions: list[str]
) -> tuple[ViTGPT2Processor, ViTGPT2ForConditionalGeneration, bool]:
    """(processor, base model, trained from scratch?) from whichever source the arguments name."""
    model_config = json_argument(model_args.model_config, "model_config")
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
# The run


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
    (`hold_output_dir`), and the synthetic set it trains on, if any (`load_caption_data`)."""
    if training_args.push_to_hub:
        raise ValueError(
            "run_training does not push: Trainer's own push would replace the model card with a generic one. Train "
            "with push_to_hub=False, then call modeling_vitgpt2.applications.hub.push_training_output(training_args, output_dir) "
            "(train.py --push_to_hub does both)"
        )
    if training_args.hub_token is not None:
        # Trainer pickles its arguments whole into every checkpoint's training_args.bin; no file may hold a token.
        training_args = dataclasses.replace(training_args, hub_token=None)
    with hold_output_dir(training_args.output_dir, training_args.process_index), contextlib.ExitStack() as held:
        return _run_training(model_args, data_args, peft_args, training_args, callbacks, held)


def _run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    peft_args: PeftArguments,
    training_args: CaptionTrainingArguments,
    callbacks: list[TrainerCallback] | None,
    held: contextlib.ExitStack,
) -> dict:
    set_seed(training_args.seed)
    state = PartialState()
    check_requested_sharding(state)
    stream_counts = None
    if data_args.streamed:
        training_args = _streamed_training_args(data_args, training_args)
        with state.main_process_first():
            train_rows, tokenizer_captions, val_images, stream_counts = load_streamed_caption_data(
                data_args, training_args.seed, evaluates=training_args.eval_strategy != IntervalStrategy.NO
            )
    else:
        def say(message: str) -> None:
            # The main process checks (and writes) a synthetic set alone while the others wait here, so its
            # waiting is for another run; theirs would mostly be for each other's quick look at the marker.
            if state.is_main_process:
                print(f"[train] {message}", flush=True)

        with state.main_process_first():
            train_rows, val_images = load_caption_data(data_args, held, say)
        tokenizer_captions = lambda: list(train_rows["caption"])  # noqa: E731

    from_scratch = not (model_args.model_name_or_path or model_args.encoder or model_args.decoder)
    method, peft_args = resolve_method(peft_args, from_scratch)
    processor, model, from_scratch = build_processor_and_model(
        model_args, config_overrides(method, peft_args), tokenizer_captions() if from_scratch else []
    )
    generation = model.generation_config
    generation.update(**training_args.generation_settings())

    output_dir = Path(training_args.output_dir)
    resume = resolve_resume(training_args)
    base_config = model.config.to_dict()
    staged_base = None
    if peft_method(method).uses_peft and (not model_args.model_name_or_path or config_overrides(method, peft_args)):
        # A PEFT adapter needs its base model. One built here (from scratch, from pretrained parts, or with new
        # adapter/prefix modules) is saved once so that `PeftModel.from_pretrained(base, OUTPUT_DIR)` finds it.
        base_dir = output_dir / BASE_MODEL_FOLDER
        if not (resume and base_dir.is_dir()):  # the one a resumed checkpoint was trained on stays
            # Saved now, while the model is the base alone, beside the folder: it replaces base_model/ only once
            # nothing can refuse the run, so a refused start leaves an earlier run's adapter its own base.
            staged_base = _stage_base_model(model, processor, base_dir, state)
        _record_base(model, str(base_dir.resolve()))
    elif model_args.model_name_or_path:
        # A local folder by its absolute path: relative, it named the base only from the folder training ran in, and
        # a push from elsewhere took it for a Hub id (publishing an adapter whose base does not exist).
        name = model_args.model_name_or_path
        _record_base(model, str(Path(name).resolve()) if Path(name).is_dir() else name)
    # Every check that can refuse the run comes before the new base model replaces base_model/.
    with _placed_when_accepted(staged_base, state):
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
        # The base built again here is checked against the one the checkpoint trained on, rather than loaded from
        # base_model/ instead: a LoRA run on --model_name_or_path has no base_model/ of its own, and a flag changed
        # since would be dropped without a word. A full run's checkpoint holds every weight: nothing to check.
        keeps_checkpoints = resume or training_args.save_strategy != "no"
        base_record = (_base_record(model, model_args, training_args.seed)
                       if is_peft_model(model) and keeps_checkpoints else None)
        if resume:
            _check_resume_settings(resume, model, base_config, base_record)

        collator = CaptionCollator(processor, max_length=data_args.max_caption_length)
        eval_collator = collator
        callbacks = [RunTimeEstimate(trainable, total), *(callbacks or [])]
        if stream_counts is not None:
            callbacks.append(EmptyStreamCheck(stream_counts, data_args.train_shards or data_args.dataset_name))
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
            stream_identity=stream_identity(data_args, training_args.seed) if data_args.streamed else None,
            base_model_record=base_record,
        )

    resumed_at_step = read_checkpoint_manifest(resume)["global_step"] if resume else 0  # rotation may delete it
    train_result = trainer.train(resume_from_checkpoint=resume)
    # Under FSDP each process holds its shard of the weights (DTensors), elsewhere all of them. Counted before the
    # evaluation, which leaves the FSDP units that do not reshard after a forward (the root's) gathered.
    parameters_held = gather_object([sum(
        (parameter.to_local() if isinstance(parameter, DTensor) else parameter).numel()
        for parameter in trainer.model_wrapped.parameters()
    )])
    # A stream trained with --eval_strategy no may have no validation set: no final evaluation then.
    metrics = trainer.evaluate() if val_images is not None else {}
    trainer.save_metrics("train", train_result.metrics)
    if val_images is not None:
        trainer.save_metrics("eval", metrics)
    if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # The weights are sharded over the processes: Trainer gathers them (every process takes part) and saves.
        with naming_a_full_disk(output_dir, saved_weight_bytes(trainer.model)):
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
                "eval_images": len(val_images) if val_images is not None else None,
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
    by_shard = {}
    for part in parts:
        for shard, reasons in part.by_shard.items():
            by_shard[shard] = dict(Counter(by_shard.get(shard, {})) + reasons)
    summary["skipped_by_shard"] = dict(sorted(by_shard.items()))
    if summary["skipped_samples"]:
        logger.warning(f"skipped {summary['skipped_samples']} bad sample(s) of the stream: "
                       f"{summary['skipped_by_reason']}; by shard: {summary['skipped_by_shard']}")
    return summary


def _stage_base_model(model: ViTGPT2ForConditionalGeneration, processor: ViTGPT2Processor, base_dir: Path,
                      state: PartialState) -> Path:
    """Saves the base model and processor into a new folder beside `base_dir` (written by the main process);
    `_placed_when_accepted` renames it into place."""
    staged = base_dir.with_name(f".{base_dir.name}.new")
    if state.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while saving it
        with naming_a_full_disk(staged, saved_weight_bytes(model)):
            model.save_pretrained(staged)
            processor.save_pretrained(staged)
    return staged


@contextlib.contextmanager
def _placed_when_accepted(staged: Path | None, state: PartialState):
    """Replaces base_model/ with the `staged` one once the block has run, or deletes the staged one when the block
    raised (the run was refused): an earlier run's adapter keeps the base it was trained on until a run starts."""
    try:
        yield
    except BaseException:
        if staged is not None and state.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    if staged is None or not state.is_main_process:
        return
    base_dir = staged.with_name(staged.name.removeprefix(".").removesuffix(".new"))
    # A folder cannot be renamed over a full one: the old one is moved aside first, so base_model/ is always
    # either the old one or the new one complete, never a mix (a kill in between leaves none, and the old aside).
    old = base_dir.with_name(f".{base_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if base_dir.exists():
        base_dir.rename(old)
    staged.rename(base_dir)
    shutil.rmtree(old, ignore_errors=True)


def _check_resume_settings(checkpoint: str, model, base_config: dict, base_record: dict | None) -> None:
    """Refuses, in one line, to resume `checkpoint` with other peft settings or another base model than it was
    trained with: its config (`settings_change`) or, for an adapter, its weights (`base_change`, from this run's
    `base_record`); `base_config` is this run's base model's, `model` this run's (peft) model."""
    checkpoint_dir = Path(checkpoint)
    adapter_file = checkpoint_dir / "adapter_config.json"
    saved_adapter = read_json(adapter_file, "adapter config") if adapter_file.is_file() else None
    current_adapter = model.peft_config["default"].to_dict() if is_peft_model(model) else None
    # A full model's checkpoint holds its config; an adapter's base model is the output folder's base_model/ (or a
    # model named by --model_name_or_path, which this run loads again as it is).
    base_folder = checkpoint_dir.parent / BASE_MODEL_FOLDER if saved_adapter else checkpoint_dir
    saved_base = ViTGPT2Config.from_pretrained(base_folder).to_dict() if (base_folder / "config.json").is_file() else None
    change = settings_change(checkpoint, run_settings(saved_adapter, saved_base),
                             run_settings(current_adapter, base_config if saved_base is not None else None))
    if change is None and base_record is not None:
        change = base_change(checkpoint, base_record)
    if change:
        raise ValueError(change)


def _base_record(model, model_args: ModelArguments, seed: int) -> dict:
    """What a peft run's checkpoints record of its base model (`base_change`): the digest of the weights the adapter
    does not carry, and the flags that gave them, named as train.py's, to say which one changed."""
    sources = {"--model_name_or_path": model_args.model_name_or_path, "--encoder": model_args.encoder,
               "--decoder": model_args.decoder, "--seed": seed}
    return {"sha256": base_weights_digest(model), "sources": sources}


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
    with naming_a_full_disk(output_dir, saved_weight_bytes(model)):
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)


def _changes_default_size(model_args: ModelArguments) -> bool:
    changed = json_argument(model_args.model_config, "model_config")
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
        sources = expand_shards(data_args.train_shards)
        shards = cache.build_shards(sources, batch_size=training_args.per_device_eval_batch_size)
        train_rows = stream_feature_shards(shards, stream_counts, sources,
                                           reorder=lambda rows: _shuffled(rows, data_args, training_args.seed))
    else:
        # One call per dataset: `build` reads a dataset's `image_path` column directly, without a dict per row.
        cache.build(train_rows, batch_size=training_args.per_device_eval_batch_size)
    if val_images is not None:
        cache.build(val_images, batch_size=training_args.per_device_eval_batch_size)
    collators = CachedFeatureCollator(collator, cache), CachedFeatureCollator(collator, cache)
    return *collators, PageOutEncoderCallback(base, cache_dir), train_rows
