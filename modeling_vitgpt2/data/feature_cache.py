"""Encoder-feature cache: with a frozen encoder and no image augmentation, encode each image once.

Training with a frozen ViT spends most of every step re-encoding the same images. `EncoderFeatureCache.build(rows)`
encodes every unique image once (a batched pre-pass under `torch.inference_mode`, with a progress bar) into a float16
memmap on disk, and `CachedFeatureCollator` then hands the model `encoder_outputs` read from it, so the encoder never
runs during training or evaluation (`train.py --cache_encoder_features`). `page_out_encoder` then moves the idle
encoder's weights into a memory-mapped file for the length of training, out of RAM or off the GPU.

What a cache is keyed by, so that any change recomputes:

- the encoder: a SHA-256 over its state dict (names, dtypes, shapes and bytes of every tensor), its architecture
  (`config.encoder_name`, `encoder_kwargs`) and the timm version. A different encoder gets a different folder.
- the image transform: `processor.image_processor.to_dict()` as canonical JSON, and the transformers version. A
  different transform gets a different folder.
- each image: a file or an undecoded `datasets` image by a SHA-256 of its bytes (`bytes:...`; a file is read once per
  process and remembered while its inode, size and times stay the same); a decoded PIL image or array by a hash of
  its RGB pixels (`pixels:...`). A changed image has a new key, even one copied over another with its size and
  modification time kept, so `build` encodes it again into a new row (its old row is left unused).

On disk, `<cache_dir>/encoder-features-<digest of encoder and transform>/` holds:

- `features.f16`: raw float16 rows of shape `(tokens, width)`, one per image, C order; rows are only ever appended,
  never rewritten, so a reader of an older index always sees the rows it knows.
- `index.json`: the encoder/transform identity, the row count and shape, and `{image key: row}`. It is written to a
  temporary file and `os.replace`d, only after the rows it names are flushed to disk, so a pre-pass killed at any
  moment leaves either the previous index or none: a half-written cache never looks valid. The pre-pass also commits
  every `checkpoint_every` images, so a killed pre-pass resumes where it last committed.

Multi-process training (torchrun): call `build` on every process. It holds a file lock in the cache folder, so one
process (whichever takes the lock first) encodes and the others block until it is done, then read the finished
index and encode nothing. This is preferred over `accelerate.PartialState().main_process_first()`, whose
torch.distributed barrier times out after `ddp_timeout` (30 minutes by default), which a ViT-L pre-pass over COCO
can exceed; a file lock waits as long as the build takes, and also protects against two separate jobs sharing a
cache folder. Where the file system has no working locks (some NFS set-ups), build on the main process alone inside
`main_process_first()` with a larger `ddp_timeout`.

Datasets with in-memory images: pass `without_image_decoding(dataset)` both to `build` and to the `Trainer`. Images
are then keyed by their file bytes, and training never decodes an image at all; with decoded images every image is
decoded and its pixels hashed, to find its key, once per row.

Streamed webdataset shards (`train.py --train_shards ... --cache_encoder_features`): `build_shards(shards)` writes,
for each input tar, one feature shard `shards/<name>-<SHA-256 of the input tar>.tar` in the same folder (so keyed by
encoder, transform and the shard's bytes alike), itself a webdataset tar with, per input sample and in its order,
`KEY.npy` (the float16 features; empty for a bad sample) and `KEY.json` (`{"caption", "skipped"}`: the reason a bad
sample is skipped, as the image stream counts it, else ""). A shard is written whole to a temporary file and renamed
(io_utils' atomic writer), then its record `<name>.json` with its size: a shard without a record, or of another size,
is encoded again, so a killed pre-pass resumes at its first incomplete shard. Under accelerate/torchrun process `p`
of `n` hashes and encodes the shards `p, p + n, ...` only (each shard written once, by one process), the processes
exchange the hashes, and each waits, by polling the folder rather than in a collective that would time out, until
every shard is complete. A process whose pre-pass fails leaves `shards/.failed-<run>-<process>.json` naming itself, the
shard and the error before it exits; the others, waiting, find it and stop with that error instead of waiting
forever. Its failure is often a full disk, so the record needs no room then: a process with shards to encode writes
it before it starts, as a placeholder of fixed size, and a failure overwrites those bytes and renames the file (see
`FailureSignal`). A process killed outright (SIGKILL, the out-of-memory killer) writes nothing: each holds a flock
on its placeholder, which the kernel releases when the process dies, so the others find it unlocked and stop too.
Each process of a run also holds a shared flock on `shards/.run-<run>.lock` (`RunLock`): the next pre-pass deletes
the records of earlier runs only once none of their processes holds it, so two jobs can share a cache folder.
Across machines this needs flock to work on the shared folder (local disks and most NFS v4 mounts), as the per-shard
locks always did; where it does not, the pre-pass stops at once, saying so. `stream_feature_shards` then streams the
feature shards through `datasets` like the image shards (same order, same split over processes and the same shuffle),
so training reads features instead of decoding images.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import mmap
import os
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import timm
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import gather_object
from filelock import FileLock
from PIL import Image
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from ..model.processing_vitgpt2 import ImageLoadError, as_rgb_image
from ..utils.errors import UserError
from ..utils.io import (
    PathLike,
    atomic_path,
    file_digest,
    leftover_temporaries,
    naming_a_full_disk,
    read_json,
    write_json_atomic,
)
from .captions import CaptionCollator, image_source
from .prepass_signals import FailureSignal, RunLock, delete_ended_runs
from .streaming import BadSample, StreamCounts, decode_sample, stream_webdataset

__all__ = [
    "CachedEncoderOutput",
    "CachedFeatureCollator",
    "EncoderFeatureCache",
    "FEATURES_COLUMN",
    "FeatureCacheMissError",
    "PrePassFailedError",
    "encoder_fingerprint",
    "image_key",
    "page_out_encoder",
    "reclaim_pages",
    "feature_shard_rows",
    "stream_feature_shards",
    "transform_fingerprint",
    "without_image_decoding",
]


logger = logging.getLogger(__name__)

# Bump when the on-disk layout or the way features are computed changes: old caches then stop matching.
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
DATA_FILE = "features.f16"
LOCK_FILE = "build.lock"
STORAGE_DTYPE = np.float16
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)  # Linux's value; Python builds on older headers lack the name
SHARDS_FOLDER = "shards"
FEATURES_COLUMN = "encoder_features"  # streamed rows carry their features in this column


class PrePassFailedError(UserError):
    """Another process of a multi-process job failed its part of the streamed pre-pass; the message names it."""


class FeatureCacheMissError(LookupError):
    """An image that the cache holds no features for; the message names it and says how to build them."""


# ----------------------------------------------------------------------------------------------------------------
# Keys: what the encoder and the transform are, and which image a row holds


def encoder_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The encoder's identity: architecture, timm version, and a SHA-256 over every state-dict tensor.

    Streams tensor by tensor (one CPU copy of one tensor at a time). SHA-256 rather than BLAKE2 because CPUs with
    SHA extensions hash it faster.
    """
    encoder = model.get_encoder()
    timm_model = getattr(encoder, "model", encoder)
    digest = hashlib.sha256()
    for name, tensor in timm_model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    config = getattr(model, "config", None)
    fingerprint = {
        "class": type(timm_model).__name__,
        "encoder_name": getattr(config, "encoder_name", None),
        "encoder_kwargs": getattr(config, "encoder_kwargs", None),
        "timm": timm.__version__,
        "weights_sha256": digest.hexdigest(),
    }
    # It changes the features but no weight; named only when set, so that the caches of models that leave timm's
    # epsilon alone keep their identity.
    if getattr(config, "encoder_layer_norm_eps", None) is not None:
        fingerprint["encoder_layer_norm_eps"] = config.encoder_layer_norm_eps
    return fingerprint


def transform_fingerprint(processor: Any) -> dict[str, Any]:
    """The image transform's identity: its full settings and the transformers version that applies them.

    Leaves out `auto_map`, which says where the class is loaded from, not what it computes: saving a processor adds
    it, so the process of a job that saved the base model would otherwise key a cache apart from the others."""
    settings = {key: value for key, value in processor.image_processor.to_dict().items() if key != "auto_map"}
    return {"image_processor": settings, "transformers": transformers.__version__}


def _name_of(item: Any) -> str:
    """How an error message names an item's image: its file, else its `image_name`."""
    image = image_source(item)
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, Mapping) and image.get("path"):
        return str(image["path"])
    if isinstance(item, Mapping) and item.get("image_name") is not None:
        return f"image {item['image_name']}"
    return "an in-memory image"


_content_keys: dict[tuple, str] = {}  # (path, inode, size, mtime, ctime) -> key: a file is hashed once per process


def _file_key(path: PathLike) -> str:
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    # Any write to the file, or a replacement (`cp -p`, `rsync -a` and `tar` keep the mtime but not the ctime, which
    # no user call can set back), changes this signature, so a remembered key is never stale.
    signature = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    key = _content_keys.get(signature)
    if key is None:
        key = _content_keys[signature] = "bytes:" + file_digest(path)
    return key


def image_key(item: Any) -> str:
    """The cache key of one image, given as a caption row, a path, a PIL image/array or an undecoded image dict.

    Files and undecoded bytes are keyed by the SHA-256 of their bytes (a file is read once per process and while its
    size, times and inode stay the same, its key is remembered); decoded images by the SHA-256 of their RGB pixels,
    which is what the transform sees. A file replaced by another with the same size and modification time (as
    `cp -p` or `rsync -a` leave it) therefore gets a new key, never the old image's features.
    """
    image = image_source(item)
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            return "bytes:" + hashlib.sha256(image["bytes"]).hexdigest()
        image = image["path"]
    if isinstance(image, (str, os.PathLike)):
        return _file_key(image)
    rgb = as_rgb_image(image, name=_name_of(item))
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}|".encode())
    digest.update(rgb.tobytes())
    return "pixels:" + digest.hexdigest()


def _decode(item: Any) -> Image.Image:
    return as_rgb_image(image_source(item), name=_name_of(item))


def without_image_decoding(rows: datasets.Dataset) -> datasets.Dataset:
    """`rows` with its `image` column left undecoded (`{"bytes", "path"}` dicts), for building and training from the
    cache: images are then keyed by their bytes and never decoded during training. Other datasets pass through."""
    image_feature = rows.features.get("image") if isinstance(rows, datasets.Dataset) else None
    if isinstance(image_feature, datasets.Image) and image_feature.decode:
        return rows.cast_column("image", datasets.Image(decode=False))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The cache


def _empty_index() -> dict[str, Any]:
    return {"rows": 0, "tokens": None, "width": None, "images": {}}


class EncoderFeatureCache:
    """Encoder features of images, computed once and kept on disk (see the module docstring for keys and layout).

    `EncoderFeatureCache(cache_dir, model, processor)` fingerprints the model's encoder and the processor's image
    transform, and opens (or prepares) the matching folder under `cache_dir`. Create it once the model is final
    (weights loaded, encoder frozen), since later changes to the encoder are not seen.

    `build(rows)` encodes the images not yet cached; `features(item)` / `batch_features(items)` read them back as
    float16 tensors of shape `(tokens, width)` / `(batch, tokens, width)`. Items are caption rows (with `image_path`
    or `image`), paths, PIL images or undecoded `datasets` image dicts.
    """

    def __init__(self, cache_dir: PathLike, model: torch.nn.Module, processor: Any):
        self.model = model
        self.processor = processor
        identity = {
            "format_version": FORMAT_VERSION,
            "encoder": encoder_fingerprint(model),
            "transform": transform_fingerprint(processor),
        }
        # A JSON round trip, so that it compares equal to the copy read back from index.json (tuples become lists).
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(cache_dir) / f"encoder-features-{digest}"
        self._index = self._read_index()
        self._features: np.memmap | None = None  # read-only view of the committed rows, opened on first use

    def __len__(self) -> int:
        """The number of images cached."""
        return len(self._index["images"])

    def __contains__(self, item: Any) -> bool:
        return image_key(item) in self._index["images"]

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver get a pickled copy: leave the model behind (they only read)
        # and the memmap too (pickling one copies its whole content); the copy reopens the file itself.
        state = self.__dict__.copy()
        state["model"] = None
        state["_features"] = None
        return state

    @property
    def data_path(self) -> Path:
        return self.folder / DATA_FILE

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_FILE

    # -- reading ---------------------------------------------------------------------------------------------------

    def _read_index(self) -> dict[str, Any]:
        """The committed index, or an empty one when there is none or it cannot be trusted (then it is rebuilt)."""
        if not self.index_path.is_file():
            return _empty_index()
        try:
            index = read_json(self.index_path, "feature cache index")
            expected_bytes = index["rows"] * index["tokens"] * index["width"] * np.dtype(STORAGE_DTYPE).itemsize
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("Ignoring the unreadable cache index %s (%r); it will be rebuilt.", self.index_path, error)
            return _empty_index()
        if index.get("identity") != self.identity:
            logger.warning("Ignoring %s: built for another encoder or transform; it will be rebuilt.", self.index_path)
            return _empty_index()
        actual_bytes = self.data_path.stat().st_size if self.data_path.is_file() else 0
        if actual_bytes < expected_bytes:
            logger.warning(
                "Ignoring %s: %s holds %d bytes where the index needs %d (deleted or truncated?); it will be rebuilt.",
                self.index_path, self.data_path, actual_bytes, expected_bytes,
            )
            return _empty_index()
        return index

    def _reader(self) -> np.memmap:
        if self._features is None:
            index = self._index
            self._features = np.memmap(
                self.data_path, dtype=STORAGE_DTYPE, mode="r", shape=(index["rows"], index["tokens"], index["width"])
            )
        return self._features

    def _row_of(self, item: Any) -> int:
        key = image_key(item)
        row = self._index["images"].get(key)
        if row is None:
            # Another process may have committed since this object read the index.
            self._index, self._features = self._read_index(), None
            row = self._index["images"].get(key)
        if row is None:
            raise FeatureCacheMissError(
                f"{_name_of(item)} has no features in the encoder-feature cache {self.folder}: it is new, or it "
                "changed after the cache was built. Run EncoderFeatureCache.build() over these rows before training "
                "(train.py --cache_encoder_features does)."
            )
        return row

    def batch_features(self, items: Sequence[Any]) -> torch.Tensor:
        """The cached features of `items`, a float16 tensor of shape `(len(items), tokens, width)`."""
        rows = [self._row_of(item) for item in items]
        return torch.from_numpy(self._reader()[rows])  # indexing with a list copies the rows out of the memmap

    def features(self, item: Any) -> torch.Tensor:
        """The cached features of one item, a float16 tensor of shape `(tokens, width)`."""
        return self.batch_features([item])[0]

    # -- building --------------------------------------------------------------------------------------------------

    def build(
        self,
        rows: Sequence[Any],
        batch_size: int = 16,
        num_workers: int = 8,
        checkpoint_every: int = 4096,
    ) -> EncoderFeatureCache:
        """Encodes every image of `rows` that the cache does not hold yet; returns the cache.

        rows: a caption dataset (`load_coco_captions`/`load_hf_captions`, best through `without_image_decoding`), or
            any sequence of rows, paths, PIL images or undecoded image dicts. Repeated images are encoded once.
        batch_size: images per encoder call. num_workers: threads decoding and transforming the next batch while the
            encoder runs on this one.
        checkpoint_every: images between commits of the index, so that a killed pre-pass resumes from there.

        Safe to call from every process of a multi-process job at once (see the module docstring): one encodes, the
        others wait for it and then find nothing missing. Missing or unreadable images raise `ImageLoadError` naming
        the file.
        """
        self._check_frozen()
        if isinstance(rows, datasets.Dataset) and "image_path" in rows.column_names:
            # Caption rows repeat each image; read the paths alone rather than one dict per row.
            items: Sequence[Any] = list(dict.fromkeys(rows["image_path"]))
        else:
            items = rows
            image_feature = rows.features.get("image") if isinstance(rows, datasets.Dataset) else None
            if isinstance(image_feature, datasets.Image) and image_feature.decode:
                logger.warning(
                    "Decoding every image to find its cache key; pass without_image_decoding(dataset) to build() "
                    "and to the Trainer to key images by their bytes instead (much faster, and training then "
                    "decodes no image)."
                )

        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.folder / LOCK_FILE):
            # Whoever held the lock before us may have built (part of) it: start from the index on disk.
            self._index, self._features = self._read_index(), None
            missing: dict[str, int] = {}  # image key -> position of its first item
            for position, item in enumerate(tqdm(items, desc="Checking the feature cache", unit="row")):
                key = image_key(item)
                if key not in self._index["images"] and key not in missing:
                    missing[key] = position
            if missing:
                self._encode(items, missing, batch_size, num_workers, checkpoint_every)
        logger.info("Encoder-feature cache %s holds %d images.", self.folder, len(self))
        return self

    def _check_frozen(self) -> None:
        if self.model is None:
            raise RuntimeError(
                "this copy of the cache was pickled without its model and can only read; build where it was created"
            )
        encoder = self.model.get_encoder()
        trainable = [name for name, parameter in encoder.named_parameters() if parameter.requires_grad]
        if trainable:
            raise ValueError(
                f"the encoder has {len(trainable)} trainable tensors (e.g. {trainable[0]}): cached features would be "
                "stale after the first optimizer step. Freeze it first (model.encoder.requires_grad_(False)), or "
                "train without the cache."
            )

    def _pixel_batches(
        self, items: Sequence[Any], positions: list[int], batch_size: int, num_workers: int
    ) -> Iterator[torch.Tensor]:
        """Pixel values of `items[positions]` in batches; the next batch is prepared in the background while the
        caller encodes the current one."""
        chunks = [positions[start : start + batch_size] for start in range(0, len(positions), batch_size)]
        return _prefetched(chunks, lambda position: _decode(items[position]),
                           lambda chunk, images: self.processor(images=images, return_tensors="pt")["pixel_values"],
                           num_workers)

    def _encode(
        self,
        items: Sequence[Any],
        missing: dict[str, int],
        batch_size: int,
        num_workers: int,
        checkpoint_every: int,
    ) -> None:
        """Appends the features of the `missing` images after the committed rows, committing as it goes."""
        keys = list(missing)
        images = dict(self._index["images"])
        first_row = self._index["rows"]
        total_rows = first_row + len(keys)
        writer: np.memmap | None = None
        done = committed = 0
        encoder = self.model.get_encoder()
        was_training = encoder.training
        encoder.eval()  # a frozen encoder's features are its eval-mode ones (no dropout / drop-path)
        try:
            pixel_batches = self._pixel_batches(items, list(missing.values()), batch_size, num_workers)
            progress = tqdm(total=len(keys), desc="Encoding images", unit="image")
            # `closing`: on an error, stop the prefetching threads now rather than whenever the generator is collected.
            with torch.inference_mode(), closing(pixel_batches), progress:
                for pixel_values in pixel_batches:
                    features = _encoded(encoder, pixel_values)
                    if writer is None:
                        writer = self._open_writer(total_rows, features.shape[1], features.shape[2])
                    count = features.shape[0]
                    writer[first_row + done : first_row + done + count] = features
                    images.update(zip(keys[done : done + count], range(first_row + done, first_row + done + count)))
                    done += count
                    progress.update(count)
                    if done - committed >= checkpoint_every:
                        self._commit(writer, images, first_row + done)
                        committed = done
            self._commit(writer, images, total_rows)
        finally:
            encoder.train(was_training)

    # -- streams: one feature shard per webdataset shard -------------------------------------------------------------

    def build_shards(
        self, shards: Sequence[str], batch_size: int = 16, num_workers: int = 8, poll_seconds: float = 2.0
    ) -> list[Path]:
        """Encodes the webdataset tar `shards` (local files, in training order) into feature shards; returns their
        paths, in the same order, once every one is complete. Call it on every process of a multi-process job at
        once: process `p` of `n` hashes and encodes shards `p, p + n, ...` only, then waits for the others' (see the
        module docstring). Shards complete from an earlier run with the same encoder, transform and bytes are kept.
        """
        self._check_frozen()
        remote = [shard for shard in shards if "://" in shard]
        if remote:
            raise ValueError(
                f"the feature cache keys each shard by its bytes, so it needs local shards; {remote[0]} is remote. "
                "Copy the shards to a local disk, or train without --cache_encoder_features"
            )
        state = PartialState()
        mine = range(state.process_index, len(shards), state.num_processes)
        joined = gather_object([(str(self.folder), uuid.uuid4().hex)])
        folders, run = {folder for folder, _ in joined}, joined[0][1]
        if len(folders) > 1:  # each would wait for shards the others write elsewhere
            raise ValueError(f"the processes key the feature cache differently ({', '.join(sorted(folders))}): "
                             "their encoder weights or image processor settings differ")
        markers = self.folder / SHARDS_FOLDER
        markers.mkdir(parents=True, exist_ok=True)
        # Held before the cleanup and this process's reservation, until this returns or raises: another job's cleanup
        # then leaves this run's records alone.
        with RunLock(markers, run):
            if state.is_main_process:
                delete_ended_runs(markers, run)
            hashed = [(index, file_digest(shards[index])) for index in tqdm(mine, desc="Hashing shards", unit="shard")]

            def feature_shard(index: int, digest: str) -> Path:
                return markers / f"{Path(shards[index]).name.removesuffix('.tar')}-{digest[:16]}.tar"

            # Reserved (and locked) before the collective below: on a disk already full this process stops there,
            # and its launcher (torchrun) stops the others, instead of failing later where it could not tell them;
            # and every reservation exists before any process waits on it. Only a process with shards to encode
            # reserves, so that a run reading complete shards needs no room.
            with FailureSignal(markers, run, state.process_index,
                                reserve=any(not _complete_shard(feature_shard(*pair)) for pair in hashed)) as signal:
                digests = dict(gather_object(hashed))  # a short collective: hashing is quick next to encoding
                paths = [feature_shard(index, digests[index]) for index in range(len(shards))]
                index = None
                try:
                    for index in tqdm(mine, desc="Encoding shards", unit="shard"):
                        self._build_shard(shards[index], digests[index], paths[index], batch_size, num_workers)
                except BaseException as error:  # Ctrl-C too: the others must not wait for this process's shards
                    signal.fail(shards[index] if index is not None else None, f"{type(error).__name__}: {error}")
                    raise
            # Its shards complete, this process's reservation is gone: its end, however it comes, stops nobody.
            writers = [None if process == state.process_index else FailureSignal.paths(markers, run, process)
                       for process in range(state.num_processes)]
            self._wait_for_shards(shards, paths, writers, poll_seconds)
        return paths

    def _wait_for_shards(self, shards: Sequence[str], paths: list[Path], writers: list[tuple[Path, Path] | None],
                         poll_seconds: float) -> None:
        """Polls until every feature shard is complete (no collective: another process's pre-pass may outlast
        torch.distributed's timeout), saying what it waits for whenever that changes. `writers[p]` holds the
        reservation and failure record paths of process `p` (None for this process), which writes shards `p, p + n,
        ...`: stops with the error of a process that owes a missing shard and left a failure record, or that ended
        without one (see `FailureSignal.ended_silently`)."""
        waiting, shown = [index for index, path in enumerate(paths) if not _complete_shard(path)], None
        while waiting:
            if len(waiting) != shown:
                shown = len(waiting)
                logger.warning("Waiting for %d of %d feature shards that other processes encode (next: %s).",
                               len(waiting), len(paths), shards[waiting[0]])
            owing = [record for record in dict.fromkeys(writers[index % len(writers)] for index in waiting) if record]
            # Failure records first: a record says more than a reservation left unlocked.
            reason = next((FailureSignal.describe(failed) for _, failed in owing if failed.exists()), None)
            if reason is None:
                reason = next(filter(None, (FailureSignal.ended_silently(reserved) for reserved, _ in owing)), None)
            if reason is not None:
                raise PrePassFailedError(
                    f"{reason}; this process stops too ({len(waiting)} feature shard(s) missing, e.g. for "
                    f"{shards[waiting[0]]}). Fix the cause and run again: the complete shards are kept."
                )
            time.sleep(poll_seconds)
            waiting = [index for index in waiting if not _complete_shard(paths[index])]

    def _build_shard(self, shard: str, digest: str, path: Path, batch_size: int, num_workers: int) -> None:
        """Writes the feature shard of `shard` to `path` unless it is complete. The lock keeps a second job that
        shares the cache folder from writing it at the same time; under it, the temporary files of a killed
        pre-pass are deleted. The lock file is deleted once the shard is complete: a job that still locks the
        deleted file, or a new one, then finds the shard complete and writes nothing."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_suffix(".lock")
        with FileLock(lock):
            if not _complete_shard(path):
                self._write_shard(shard, digest, path, batch_size, num_workers)
            lock.unlink(missing_ok=True)

    def _write_shard(self, shard: str, digest: str, path: Path, batch_size: int, num_workers: int) -> None:
        """Encodes `shard` into the feature shard `path` and its record (called under the shard's lock)."""
        for leftover in leftover_temporaries(path) + leftover_temporaries(path.with_suffix(".json")):
            leftover.unlink()
        samples = skipped = 0
        encoder = self.model.get_encoder()
        was_training = encoder.training
        encoder.eval()
        chunks = self._checked_chunks(stream_webdataset([shard]), batch_size, num_workers)
        try:
            with atomic_path(path) as temporary, tarfile.open(temporary, "w") as archive, closing(chunks), \
                    torch.inference_mode():
                for rows, reasons, pixel_values in chunks:
                    features = iter(_encoded(encoder, pixel_values) if pixel_values is not None else ())
                    for row, reason in zip(rows, reasons):
                        array = next(features) if reason is None else np.zeros((0, 0), STORAGE_DTYPE)
                        sample = {"caption": row["caption"].strip() if reason is None else "",
                                  "skipped": reason or ""}
                        _add_to_tar(archive, f"{row['image_name']}.npy", _npy_bytes(array))
                        _add_to_tar(archive, f"{row['image_name']}.json", json.dumps(sample).encode())
                    samples += len(rows)
                    skipped += sum(reason is not None for reason in reasons)
        finally:
            encoder.train(was_training)
        # Written last: a shard counts as complete only with this record and the size it names.
        write_json_atomic(path.with_suffix(".json"), {
            "input": str(Path(shard).resolve()), "input_sha256": digest, "samples": samples, "skipped": skipped,
            "bytes": path.stat().st_size, "identity": self.identity,
        })

    def _checked_chunks(
        self, rows: Iterable[dict], batch_size: int, num_workers: int
    ) -> Iterator[tuple[list[dict], list[str | None], torch.Tensor | None]]:
        """(rows, the reason each is skipped or None, pixel values of the kept ones) per `batch_size` rows; the next
        chunk is read and prepared in the background while the caller encodes this one."""
        rows = iter(rows)

        def checked(row: dict) -> Image.Image | str:
            try:
                if row["problem"]:
                    raise BadSample(row["problem"])
                return decode_sample(row["image"], row["caption"], row["image_name"])
            except BadSample as problem:  # recorded in the shard; training counts and logs it as the image stream does
                return str(problem)

        def transformed(chunk: list[dict], results: list[Image.Image | str]) -> tuple:
            images = [result for result in results if isinstance(result, Image.Image)]
            pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"] if images else None
            return chunk, [result if isinstance(result, str) else None for result in results], pixel_values

        return _prefetched(iter(lambda: list(islice(rows, batch_size)), []), checked, transformed, num_workers)

    def _open_writer(self, rows: int, tokens: int, width: int) -> np.memmap:
        """The data file sized for `rows` rows, opened for writing. Rows the committed index names are never written;
        a tail left by an interrupted build (named by no index) is overwritten."""
        if self._index["rows"] and (self._index["tokens"], self._index["width"]) != (tokens, width):
            raise ValueError(
                f"the encoder now makes ({tokens}, {width}) features where {self.data_path} holds "
                f"({self._index['tokens']}, {self._index['width']}); delete {self.folder} and build again."
            )
        size = rows * tokens * width * np.dtype(STORAGE_DTYPE).itemsize
        descriptor = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            written = os.fstat(descriptor).st_size
            # The rows are written through a memory map, where a page the full disk cannot back kills the process
            # with SIGBUS, no message: the room is reserved (and the file grown) now, so that a full disk is an error
            # naming it. macOS has no posix_fallocate; there the file only grows.
            if size > written and hasattr(os, "posix_fallocate"):
                with naming_a_full_disk(self.data_path, size - written):
                    os.posix_fallocate(descriptor, written, size - written)
            else:
                os.ftruncate(descriptor, size)
        finally:
            os.close(descriptor)
        return np.memmap(self.data_path, dtype=STORAGE_DTYPE, mode="r+", shape=(rows, tokens, width))

    def _commit(self, writer: np.memmap, images: dict[str, int], rows: int) -> None:
        """Makes the first `rows` rows durable, then points the index at them (in that order, so that an index
        never names a row that is not on disk)."""
        writer.flush()
        descriptor = os.open(self.data_path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        index = {
            "identity": self.identity,
            "rows": rows,
            "tokens": writer.shape[1],
            "width": writer.shape[2],
            "dtype": np.dtype(STORAGE_DTYPE).name,
            "data_file": DATA_FILE,
            "images": images,
        }
        write_json_atomic(self.index_path, index, indent=None)  # temporary file, fsync, os.replace
        self._index, self._features = index, None


def _prefetched(chunks: Iterable[list], decode: Callable[[Any], Any], transform: Callable[[list, list], Any],
                num_workers: int) -> Iterator[Any]:
    """`transform(chunk, [decode(item) for item in chunk])` for each chunk, in order. The next chunk is taken, decoded
    (on `num_workers` threads) and transformed on a background thread while the caller works on this one; `chunks`
    is only ever advanced on that thread."""
    chunks = iter(chunks)
    with ThreadPoolExecutor(num_workers) as decoders, ThreadPoolExecutor(1) as prefetcher:

        def prepare() -> tuple | None:
            chunk = next(chunks, None)
            return None if chunk is None else (transform(chunk, list(decoders.map(decode, chunk))),)

        upcoming = prefetcher.submit(prepare)
        while (prepared := upcoming.result()) is not None:
            upcoming = prefetcher.submit(prepare)
            yield prepared[0]


def _encoded(encoder: torch.nn.Module, pixel_values: torch.Tensor) -> np.ndarray:
    """The encoder's features of a batch as float16 on the CPU, refused when float16 cannot hold them."""
    features = encoder(pixel_values).last_hidden_state.to(torch.float16)
    if not torch.isfinite(features).all():
        raise ValueError(
            "the encoder produced features that are not finite in float16 (beyond +-65504, or NaN); "
            "check the encoder weights, or train without the cache."
        )
    return features.cpu().numpy()


def _add_to_tar(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _complete_shard(path: Path) -> bool:
    """Whether a feature shard was completely written: its record exists and names the shard's size."""
    try:
        return path.stat().st_size == read_json(path.with_suffix(".json"), "feature shard record")["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def stream_feature_shards(
    paths: Sequence[PathLike], counts: StreamCounts, sources: Sequence[str] | None = None,
    reorder: Callable[[datasets.IterableDataset], datasets.IterableDataset] | None = None,
) -> datasets.IterableDataset:
    """Rows `{encoder_features, caption, image_name}` streamed from feature shards (`EncoderFeatureCache.
    build_shards`) through `datasets`, as `streaming.decoded_rows` streams the image shards: the same rows in the
    same order, and each bad sample skipped and counted in `counts` with the reason the pre-pass recorded, under the
    name of its tar shard in `sources` (in the order of `paths`). `reorder` (a shuffle) sees every row, bad ones
    included, as the image stream's shuffle does, so that both streams give the same batches.

    Read by `feature_shard_rows`, not by `datasets`' webdataset loader: that one skips members whose names start
    with `__` (a sample keyed `__0001`, and the pre-pass's own `__shard__` row for a shard cut short), refuses a key
    that two consecutive samples share, and takes its file names as glob patterns (a cache folder under
    `runs/vit[lr=1e-4]` matched no file); each of these made the stream of cached features differ from the image
    stream without a word."""
    sources = list(sources) if sources is not None else [str(path) for path in paths]
    # One list argument: `datasets` splits it over processes and resumes at a shard, as for the image stream.
    stream = datasets.IterableDataset.from_generator(
        feature_shard_rows, gen_kwargs={"shards": [(str(path), source) for path, source in zip(paths, sources)]})

    def counted(row: dict) -> dict:
        if row["skipped"]:
            counts.skip(row["image_name"], row["skipped"], row["shard"])
        else:
            counts.used += 1
        return {}

    # One row at a time, as `streaming.decoded_rows` does, so that a resumed stream restarts at its position; counted
    # after `reorder`, where the image stream decodes.
    rows = (reorder(stream) if reorder else stream).map(counted, remove_columns=["skipped", "shard"], features=None)
    return rows.filter(lambda row: row[FEATURES_COLUMN] is not None)


def feature_shard_rows(shards: list[tuple[str, str]]) -> Iterator[dict]:
    """The rows of feature shards, given as (feature shard, name of the tar shard it was made from), one per sample
    in order: `{encoder_features, caption, image_name, skipped, shard}`, `encoder_features` None for a bad sample.

    A feature shard holds what `_write_shard` wrote, `KEY.npy` then `KEY.json` for each sample, so a sample is the
    next two members, whatever its key. A shard that is not in that form was damaged after it was recorded as
    complete: it raises, naming the file, since its rows cannot be told apart any more."""
    for path, source in shards:
        with tarfile.open(path, "r:") as archive:
            members = iter(archive)
            for features_member in members:
                metadata_member = next(members, None)
                key = features_member.name.removesuffix(".npy")
                if features_member.name == key or metadata_member is None or metadata_member.name != f"{key}.json":
                    raise ValueError(
                        f"the feature shard {path} is damaged: {features_member.name!r} is not followed by "
                        f"{key + '.json'!r}; delete it (and its .json record), and the next run's pre-pass writes it "
                        "again")
                sample = json.loads(archive.extractfile(metadata_member).read())
                features = np.load(io.BytesIO(archive.extractfile(features_member).read()), allow_pickle=False)
                yield {FEATURES_COLUMN: None if sample["skipped"] else features, "caption": sample["caption"],
                       "image_name": key, "skipped": sample["skipped"], "shard": source}


# ----------------------------------------------------------------------------------------------------------------
# The idle encoder


def page_out_encoder(model: torch.nn.Module, folder: PathLike) -> None:
    """Moves a frozen encoder's weights out of memory into a memory-mapped file in `folder`, on the CPU.

    Training from cached features never runs the encoder, yet its weights (1.2 GB for ViT-L/14 in float32) would sit
    in RAM, or on the GPU, for the whole run. Afterwards they are file-backed pages that the kernel reads back only
    when they are used (saving the full model, captioning pixels) and may drop again under memory pressure. The file
    is unlinked at once: the mapping keeps its data alive until the weights are freed, and nothing stays on disk, so
    `folder` must be on a disk (a RAM-backed tmpfs would save nothing); the feature cache's folder is one. Bring the
    encoder back with `model.get_encoder().to(device)` before running it on another device.

    The old weights' pages are handed back too (`reclaim_pages`): freeing the tensors alone would not release weights
    that `from_pretrained` mapped from a safetensors file, since that mapping stays alive for the decoder's weights.
    (The memory it saves is measured by benchmarks/bench_train.py; see the README.)
    """
    encoder = model.get_encoder()
    trainable = [name for name, parameter in encoder.named_parameters() if parameter.requires_grad]
    if trainable:
        raise ValueError(f"only a frozen encoder can be paged out; {trainable[0]} is trainable")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"paged-out-encoder-{os.getpid()}.pt"
    resident = encoder.state_dict()
    try:
        torch.save({name: tensor.cpu() for name, tensor in resident.items()}, path)  # state_dict is detached
        with open(path, "rb") as written:
            # Write it back now rather than in the background during the first epochs, where the writeback of a
            # large encoder slows the training steps down.
            os.fsync(written.fileno())
        mapped = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    finally:
        path.unlink(missing_ok=True)
    # assign=True makes the mapped tensors the weights (requires_grad is kept).
    encoder.load_state_dict(mapped, assign=True)
    reclaim_pages(resident.values())  # while `resident` still holds them, so no page is freed memory


def reclaim_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Asks Linux to reclaim the memory pages wholly inside these CPU tensors' storages (`madvise(MADV_PAGEOUT)`,
    Linux 5.4+); returns the bytes asked for, 0 elsewhere.

    The advice never changes what the memory holds: pages of a file mapping are dropped and read back from the file
    if touched again; anonymous pages go to swap, or stay where there is none. Only whole pages inside a storage are
    named, so a neighbouring tensor's pages are left alone. Python's `mmap` module offers this only for mappings it
    made itself, hence `ctypes`.
    """
    if sys.platform != "linux":
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    page = mmap.PAGESIZE
    advised = 0
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        start = -(-storage.data_ptr() // page) * page
        end = (storage.data_ptr() + storage.nbytes()) // page * page
        if end > start and madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
    return advised


# ----------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class CachedEncoderOutput(BaseModelOutput):
    """`BaseModelOutput` holding cached features, as a batch's `encoder_outputs`.

    A `ModelOutput` rather than the tuple `(features,)` that forward also accepts, because `generate` reads the
    batch size from `encoder_outputs.last_hidden_state` (with a tuple it assumes one image). Unlike a plain
    `ModelOutput`, it can be pinned by the DataLoader (torch's `pin_memory` would call `update`, which `ModelOutput`
    forbids) and moved with `.to(device)`.
    """

    def pin_memory(self, device: Any = None) -> CachedEncoderOutput:
        return CachedEncoderOutput(last_hidden_state=self.last_hidden_state.pin_memory())

    def to(self, *args: Any, **kwargs: Any) -> CachedEncoderOutput:
        return CachedEncoderOutput(last_hidden_state=self.last_hidden_state.to(*args, **kwargs))


class CachedFeatureCollator:
    """`CaptionCollator`'s batches with `encoder_outputs` read from the cache in place of `pixel_values`.

    The captions are tokenised exactly as the wrapped collator does; images are never decoded (a file's key costs a
    stat once its bytes were hashed in this process). Rows streamed from feature shards (`stream_feature_shards`)
    bring their features along and are not looked up. Rows without captions (`references_per_image`) give
    `encoder_outputs` alone, for `generate`.
    `dtype` is the features' dtype in the batch: float16 as stored by default (half the bytes to move to the GPU),
    which the model casts to the decoder's dtype in forward.
    With transformers.Trainer, set `remove_unused_columns=False` so that the image and caption columns arrive.
    """

    def __init__(self, collator: CaptionCollator, cache: EncoderFeatureCache, dtype: torch.dtype = torch.float16):
        self.collator = collator
        self.cache = cache
        self.dtype = dtype

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        if FEATURES_COLUMN in rows[0]:
            features = torch.from_numpy(np.stack([row[FEATURES_COLUMN] for row in rows]))
        else:
            features = self.cache.batch_features(rows)
        features = features.to(self.dtype)
        batch: dict[str, Any] = {"encoder_outputs": CachedEncoderOutput(last_hidden_state=features)}
        batch.update(self.collator.text_batch(rows))
        return batch
