"""`CaptionTrainer`: `Seq2SeqTrainer` with caption-scored evaluation, checkpoints complete before counted, and a
stream that resumes where its checkpoint left it."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from unittest import mock

import datasets
import torch
import transformers.trainer
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers import Seq2SeqTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..evaluation.metrics import compute_metrics
from ..inference.loading import is_peft_model
from ..utils.io import naming_a_full_disk, write_json_atomic
from .checkpoints import (
    STREAM_POSITION_FOLDER,
    batch_change,
    read_checkpoint_manifest,
    read_stream_position,
    remove_checkpoint,
    rotate_complete_checkpoints,
    stream_change,
    write_checkpoint_manifest,
)

__all__ = ["CaptionTrainer", "saved_weight_bytes"]


logger = logging.getLogger(__name__)


class CaptionTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose evaluation writes a caption per validation image and scores them with CIDEr (and
    CLIPScore when a CLIP model is given), and whose checkpoints count only once completely written.

    Evaluation shards the images over the processes and gathers `(image, caption)` pairs, so each image is scored
    exactly once; the stock loop pads the last batch with duplicates, which would bias CIDEr.
    """

    def __init__(self, *args, eval_collator=None, clip_model: str | None = None, stream_identity: dict | None = None,
                 base_model_record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.stream_identity = stream_identity  # saved with each stream position, checked on resume
        # An adapter's base model, recorded in each manifest and checked on resume (`checkpoints.base_change`).
        self.base_model_record = base_model_record
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
                saved = self._stream_position.get("stream")
                change = stream_change(saved, self.stream_identity or {}) if saved is not None else None
                if change:
                    raise ValueError(
                        f"{resume_from_checkpoint} stopped in another stream than this run's: {change}. Its position "
                        "would skip or repeat samples here. Resume with the data settings it was saved with, or pass "
                        "--ignore_data_skip true to start this stream from its beginning."
                    )
            if not self.args.ignore_data_skip:  # which then trains from the data's beginning, whatever the batch
                change = batch_change(resume_from_checkpoint, self.args.world_size, self._global_batch_size)
                if change:
                    raise ValueError(change)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    @property
    def _global_batch_size(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            # Left by a run that stopped while writing it, or damaged and skipped when resuming: start it afresh,
            # so that no stale file (or stale manifest) mixes with the new ones.
            remove_checkpoint(folder)
        self.accelerator.wait_for_everyone()  # before any process writes its RNG state into the folder
        # The optimizer's file is written by torch.save, which reports a full disk as an internal assertion.
        with naming_a_full_disk(folder, _checkpoint_bytes(model)):
            self._write_checkpoint(model, trial, run_dir, folder)

    def _write_checkpoint(self, model, trial, run_dir: Path, folder: Path) -> None:
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
                              {"pass": loader.iteration, "data_loader": loader.state_dict(),
                               "stream": self.stream_identity})
        self.accelerator.wait_for_everyone()  # every process's files are in the folder
        if self.args.should_save:
            loss_sum = self._total_loss_scalar + self._tr_loss.item() + (self._loss_sum_before_resume or 0.0)
            write_checkpoint_manifest(folder, self.state.global_step, loss_sum, self.args.world_size,
                                      self._global_batch_size, self.base_model_record)
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


def _parameter_bytes(parameters) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in parameters)


def saved_weight_bytes(model: torch.nn.Module) -> int:
    """About how many bytes `save_pretrained` writes for `model`: an adapter's trainable weights, else every weight."""
    if is_peft_model(model):
        return _parameter_bytes(parameter for parameter in model.parameters() if parameter.requires_grad)
    return _parameter_bytes(model.parameters())


def _checkpoint_bytes(model: torch.nn.Module) -> int:
    """About how many bytes one checkpoint takes: the saved weights, and Adam's two moments per trainable weight."""
    return saved_weight_bytes(model) + 2 * _parameter_bytes(p for p in model.parameters() if p.requires_grad)


def _batches_read(loader_state: dict) -> int:
    # torchdata's `StatefulDataLoader` counts the batches of the pass in one key without workers, in a snapshot plus
    # the steps since it with workers.
    if "_num_yielded" in loader_state:
        return loader_state["_num_yielded"]
    return loader_state["_snapshot"]["_snapshot_step"] + loader_state["_steps_since_snapshot"]


