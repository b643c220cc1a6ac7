"""Checkpoints that count only once completely written (a manifest of sizes and SHA-256 sums, written last), are
verified before a resume and rotated only after a newer one is complete; and the lock that keeps a second run out of
an output folder."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..utils.errors import UserError
from ..utils.io import InvalidJSONError, file_digest, read_json, write_json_atomic
from .arguments import CaptionTrainingArguments
from .peft_methods import frozen_base_parameters

__all__ = [
    "CHECKPOINT_COMPLETE",
    "STREAM_POSITION_FOLDER",
    "OutputFolderInUseError",
    "base_change",
    "base_weights_digest",
    "batch_change",
    "checkpoint_problem",
    "hold_output_dir",
    "last_complete_checkpoint",
    "read_checkpoint_manifest",
    "read_stream_position",
    "remove_checkpoint",
    "stream_change",
    "resolve_resume",
    "rotate_complete_checkpoints",
    "run_settings",
    "settings_change",
    "write_checkpoint_manifest",
]


logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "checkpoint_complete.json"
# In a streamed run's checkpoints: where each process's stream stood (`process_<index>.json`).
STREAM_POSITION_FOLDER = "stream_position"


def _checkpoint_step(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
    return int(suffix) if folder.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and suffix.isdigit() else None


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders, oldest step first."""
    folders = [path for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
               if path.is_dir() and _checkpoint_step(path) is not None]
    return sorted(folders, key=_checkpoint_step)


def write_checkpoint_manifest(folder: Path, global_step: int, train_loss_sum: float, world_size: int = 1,
                              global_batch_size: int | None = None, base_model: dict | None = None) -> None:
    """Marks a checkpoint complete: `checkpoint_complete.json`, written last, lists every file's size and SHA-256
    (so that resuming can tell a damaged file), the sum of the step losses so far (for `train_loss`), the number
    of processes and the samples per optimizer step over all of them (a resume skips the trained batches in its own
    batch size: `batch_change`), and for an adapter the base model it trained on (`base_change`)."""
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_digest(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_COMPLETE
    }
    write_json_atomic(
        folder / CHECKPOINT_COMPLETE,
        {"global_step": global_step, "train_loss_sum": train_loss_sum, "world_size": world_size,
         "global_batch_size": global_batch_size, "files": files,
         **({"base_model": base_model} if base_model is not None else {})},
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
            remove_checkpoint(folder)


def remove_checkpoint(folder: Path) -> None:
    """Deletes the checkpoint `folder`, its manifest first (a kill halfway leaves it incomplete, not damaged and
    taken for complete). A symbolic link (a checkpoint moved to another disk and linked back) loses only the link:
    what it points to was put there by someone, and is theirs to delete."""
    if folder.is_symlink():
        logger.info(f"{folder} is a link to {folder.resolve()}: removing the link only, the folder it points to stays")
        folder.unlink()
        return
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



def _shards_named_as_now(saved: list, current: list) -> list[tuple[str, int | None]]:
    """The saved shard list as (path, size), with each shard that this run names by another path, when both paths
    resolve to the same file, under this run's path. A position indexes files, and a symbolic link (a scratch disk
    linked into the project, say) changes how they are named, not what is read. Only the same resolved file renames
    a shard: another file under another name stays another shard, whatever its size. A saved path that this run
    gives too keeps its name even where it now resolves elsewhere, as before: a link moved to the same data moved
    cannot be told from one moved to other data without reading both (the size still tells most). The shards of
    older checkpoints, saved as path and size only, keep their names too."""
    given = {shard[0] for shard in current}
    named_now: dict[str, str] = {}
    for shard in current:
        if len(shard) > 2 and shard[2] is not None:
            named_now.setdefault(shard[2], shard[0])
    renamed = []
    for shard in saved:
        name = shard[0]
        if name not in given and len(shard) > 2:
            name = named_now.get(shard[2], name)
        renamed.append((name, shard[1]))
    return renamed


def stream_change(saved: dict, current: dict) -> str | None:
    """What differs between the stream a checkpoint's position was taken in (`saved`) and this run's (`current`),
    both as `run.stream_identity` describes them, or None. The position is an index into that stream: applied to
    another shard list it would skip or repeat samples; to another shuffle buffer it does not even load."""
    changes = []
    saved_list = _shards_named_as_now(saved.get("shards") or [], current.get("shards") or [])
    current_list = [(shard[0], shard[1]) for shard in current.get("shards") or []]
    old_shards, new_shards = dict(saved_list), dict(current_list)
    removed = [name for name in old_shards if name not in new_shards]
    added = [name for name in new_shards if name not in old_shards]
    resized = [name for name in new_shards if name in old_shards and new_shards[name] != old_shards[name]]
    for what, names in (("no longer given", removed), ("new", added), ("changed size", resized)):
        if names:
            changes.append(f"{len(names)} shard(s) {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    old_order = [name for name, _ in saved_list]
    new_order = [name for name, _ in current_list]
    if not (removed or added) and old_order != new_order:
        # A shard given twice (to read it twice per pass) counts: the position is an index into the list as given.
        changes.append("the shards are in another order" if len(old_order) == len(new_order) else
                       f"the list names {len(new_order)} shard(s) counting repeats, was {len(old_order)}")
    for key, label in (("source", "the data source"), ("shuffle_buffer", "--shuffle_buffer"), ("seed", "--seed"),
                       ("pipeline", "the stream (--cache_encoder_features)")):
        if key == "seed" and saved.get("shuffle_buffer") != current.get("shuffle_buffer"):
            continue  # the seed orders a shuffle buffer only: said with the buffer's change
        if saved.get(key) != current.get(key):
            changes.append(f"{label} was {saved.get(key)!r}, is now {current.get(key)!r}")
    return "; ".join(changes) or None


def batch_change(checkpoint: str | os.PathLike, world_size: int, global_batch_size: int) -> str | None:
    """Why resuming `checkpoint` with `world_size` processes and `global_batch_size` samples per optimizer step would
    train other samples than an uninterrupted run, or None. Trainer skips the batches trained before in this run's
    batch size (and finds no RNG state of its own under another process count): with another size it trains samples
    again or leaves some out, without a word. Manifests written before they recorded these say nothing."""
    manifest = read_checkpoint_manifest(checkpoint)
    saved_processes, saved_batch = manifest.get("world_size"), manifest.get("global_batch_size")
    if saved_processes is None or (saved_processes, saved_batch) == (world_size, global_batch_size):
        return None
    return (
        f"{checkpoint} was written by {saved_processes} process(es) with a global batch of {saved_batch} samples; "
        f"this run has {world_size} with {global_batch_size}, so its skip of the trained batches would train samples "
        f"again or leave some out. Resume with {saved_processes} process(es) and the batch settings it was saved with "
        "(--per_device_train_batch_size, --gradient_accumulation_steps), or pass --ignore_data_skip true to start "
        "the data from its beginning"
    )


def base_weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the weights of a peft model's base that its checkpoints do not hold (`frozen_base_parameters`):
    names, dtypes, shapes and bytes, read in memory once per start (hashing base_model/'s file would read it from
    disk again, and a LoRA run on --model_name_or_path has no such file of its own)."""
    digest = hashlib.sha256()
    for name, parameter in frozen_base_parameters(model):
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def base_change(checkpoint: str | os.PathLike, current: dict) -> str | None:
    """The one-line refusal to resume the adapter `checkpoint` on another base model than it trained on, or None.
    `current` is this run's record, as the manifest keeps it: `{"sha256": base_weights_digest(...), "sources":
    {flag: value}}` (the flags the base is built from). Trainer restores the adapter alone: on other base weights
    (another --seed drawing a base built from scratch, other pretrained files with the same config) it would go on
    training without a word, and the saved adapter would no longer fit base_model/, which stays the first start's.
    Manifests written before they recorded the base say nothing."""
    saved = read_checkpoint_manifest(checkpoint).get("base_model")
    if not saved or saved.get("sha256") == current["sha256"]:
        return None
    before, now = saved.get("sources") or {}, current["sources"]
    differing = [name for name in dict.fromkeys([*before, *now]) if before.get(name) != now.get(name)]
    if not differing:
        given = " ".join(f"{name} {value}" for name, value in now.items() if value is not None)
        return (f"{checkpoint} was trained on other base-model weights than this run builds from the same {given}: "
                "the files they name have changed since (or another torch or timm version initialises the new "
                "weights otherwise). Restore those files, or start afresh without --resume_from_checkpoint")
    changes = ", ".join(f"{name} was {before.get(name)}, is now {now.get(name)}" for name in differing)
    restore = " ".join(f"{name} {before[name]}" if before.get(name) is not None else f"without {name}"
                       for name in differing)
    return (f"{checkpoint} was trained on another base model than this run builds ({changes}), and its adapter "
            f"would go on training on other weights. Resume with {restore}, or start afresh without "
            "--resume_from_checkpoint")


# adapter_config.json fields that give the trained weights their names and shapes: a checkpoint loads into the same.
ADAPTER_SHAPE_FIELDS = ("peft_type", "r", "target_modules", "modules_to_save")
# Base-model config fields that change neither its weights' names nor their shapes.
# `use_cache`: Trainer sets the model's to its `use_cache` argument (False by default), so a full run's checkpoint
# config says False where the model built again to resume it says True.
UNSHAPED_CONFIG_FIELDS = {"_name_or_path", "architectures", "auto_map", "transformers_version", "dtype",
                          "torch_dtype", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
                          "use_cache"}


def run_settings(adapter: dict | None, base_config: dict | None) -> dict[str, object]:
    """A run's settings that a checkpoint must share to be resumed, named as train.py's options: from its peft
    config (`adapter`, as adapter_config.json holds it; None for full training) and its base model's config."""
    adapter = adapter or {}
    base_config = base_config or {}
    trained_whole = sorted(adapter.get("modules_to_save") or [])
    peft_type = str(getattr(adapter.get("peft_type"), "value", adapter.get("peft_type") or ""))
    if not adapter:
        method = "full"
    elif peft_type == "LORA":
        method = "lora"
    else:  # the methods whose own modules train whole (peft_methods.layer_norm_tuning)
        method = next((name for module, name in (("attn_adapter", "adapter"), ("prefix", "prefix"))
                       if module in trained_whole), "cross_attention" if peft_type == "LN_TUNING" else peft_type)
    settings = {"--peft": method}
    if method == "lora":
        targets = adapter.get("target_modules")
        settings["--lora_rank"] = adapter.get("r")
        settings["--lora_target_modules"] = sorted(targets) if isinstance(targets, (list, set, tuple)) else targets
    settings |= {
        "--train_encoder": "true" if "encoder" in trained_whole else None,
        "--adapter_bottleneck": base_config.get("adapter_bottleneck") or None,  # 0: none
        "--num_virtual_tokens": base_config.get("prefix_length") or None,
        "modules_to_save": trained_whole or None,  # implied by the options above, for other methods
    }
    for name, value in sorted(base_config.items()):
        if name not in UNSHAPED_CONFIG_FIELDS | {"adapter_bottleneck", "prefix_length"}:
            settings[f"--model_config {name}"] = value
    return settings


def settings_change(checkpoint: str | os.PathLike, saved: dict, current: dict) -> str | None:
    """The one-line refusal to resume `checkpoint`, trained with the `saved` settings (`run_settings`), in a run with
    the `current` ones, or None when they agree. Other peft settings or another base model would not load its
    weights (a KeyError or a size mismatch deep in peft), or would train them on another model."""
    differing = [name for name in dict.fromkeys([*saved, *current]) if saved.get(name) != current.get(name)]
    if not differing:
        return None
    # The options say it where they differ, without what they imply (another method's targets, its modules).
    implied = ["modules_to_save"] + (["--lora_target_modules"] if "--peft" in differing else [])
    differing = [name for name in differing if name not in implied] or differing

    def options(settings: dict) -> str:
        return " ".join(f"{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
                        for name in differing if (value := settings.get(name)) is not None) or "none"

    return (f"{checkpoint} was trained with {options(saved)}; this run has {options(current)}: resume "
            "with those settings, or start afresh without --resume_from_checkpoint")


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



class OutputFolderInUseError(UserError, RuntimeError):
    """Another run (training, or a study) holds the output folder."""


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike, process_index: int = 0, job: str = "train"):
    """Holds a lock on the output folder for the run, so that a second run into it stops at once with an error naming
    the folder and the holder's pid, instead of both overwriting each other's checkpoints. Each process of a
    multi-process run holds its own lock file (`.<job>.lock.<process index>`); the OS releases it when the process
    ends, however it ends, so a killed run never leaves a stale lock. A run that ends deletes its lock file. `job`
    names the kind of run ("train", "study"): a study holds its folder while the training runs of its variants hold
    theirs inside it."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{job}.lock.{process_index}"
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            kind = "training run" if job == "train" else job
            raise OutputFolderInUseError(
                f"{folder} is in use by another {kind} (pid {holder}); wait for it to finish or choose another "
                "--output_dir"
            ) from None
        # A run that ended between our open and our lock deleted the file: a lock on it would hold nothing.
        if path.exists() and path.stat().st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock
        handle.close()


