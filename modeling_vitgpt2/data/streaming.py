"""Caption data too large to read first: webdataset tar shards (the layout img2dataset writes: `KEY.jpg` with
`KEY.txt` and/or `KEY.json` per sample) and any `datasets` dataset opened with `streaming=True`.

Both go through `datasets`' own streaming engine (`IterableDataset`), nothing is read before training starts, and
both give rows with the columns `CaptionCollator` reads: `image` (a decoded RGB PIL image), `caption`, `image_name`.
A sample whose image does not decode or whose caption is missing or empty is skipped and counted in a `StreamCounts`
(one per process) instead of stopping a run hours in.

Splitting across processes and nodes is `accelerate`'s job, which `Trainer` calls: with `dispatch_batches=False`
(set by `run_training` for streams) it gives each process `IterableDataset.shard(num_processes, process_index)`, whole
tar files per process, so each sample is read once per epoch by one process. (`datasets.distributed.
split_dataset_by_node` does the same when the shard count divides the world size, but `Trainer`'s accelerate would
then shard the result a second time and lose data; with an indivisible count it makes every process read every
shard.) Give at least as many shards as processes, ideally a multiple: with fewer, every process reads the whole
stream and keeps its share of the batches.
"""

from __future__ import annotations

import glob
import logging
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import datasets
from braceexpand import braceexpand
from PIL import Image

from ..model.processing_vitgpt2 import as_rgb_image
from .captions import CaptionDataError

__all__ = [
    "BadSample",
    "decode_sample",
    "decoded_rows",
    "expand_shards",
    "first_captions",
    "materialise",
    "SHARD_CAPTION_FIELD",
    "SHARD_IMAGE_FIELDS",
    "SHARD_METADATA_FIELD",
    "stream_hf_dataset",
    "stream_webdataset",
    "StreamCounts",
]


logger = logging.getLogger(__name__)

# The extensions img2dataset writes, in the order they are looked for.
SHARD_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
SHARD_CAPTION_FIELD = "txt"
SHARD_METADATA_FIELD = "json"


@dataclass
class StreamCounts:
    """What one process's stream yielded and skipped (with `dataloader_num_workers=0` every row passes through the
    training process; with workers each worker keeps its own copy, so `run_training` reports no count then)."""

    used: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)

    def skip(self, name: str, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason.split(":")[0]] += 1
        logger.warning("Skipping sample %s: %s", name, reason)


def expand_shards(pattern: str) -> list[str]:
    """The tar files a pattern names: braces as in webdataset (`data/{00000..00099}.tar`), globs, or a comma list."""
    files = []
    for part in pattern.split(","):
        for name in braceexpand(part.strip()):
            if "://" in name:  # remote files are opened by `datasets` (fsspec); nothing to check here
                files.append(name)
            elif glob.has_magic(name):
                files.extend(sorted(glob.glob(name)))
            else:
                files.append(name)
    if not files:
        raise CaptionDataError(f"--train_shards {pattern!r} names no file")
    missing = [name for name in files if "://" not in name and not Path(name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CaptionDataError(f"{len(missing)} of the {len(files)} shards of {pattern!r} are missing: {shown}")
    return files


def stream_webdataset(shards: str | list[str]) -> datasets.IterableDataset:
    """Caption rows streamed from webdataset tar shards, one per sample, in shard order (see `decoded_rows`)."""
    files = expand_shards(shards) if isinstance(shards, str) else list(shards)
    stream = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    columns = set(stream.column_names or ())
    image_field = next((name for name in SHARD_IMAGE_FIELDS if name in columns), None)
    if image_field is None:
        raise CaptionDataError(
            f"the samples of {files[0]} have no image ({', '.join(SHARD_IMAGE_FIELDS)}); they hold {sorted(columns)}"
        )
    if SHARD_CAPTION_FIELD not in columns and SHARD_METADATA_FIELD not in columns:
        raise CaptionDataError(
            f"the samples of {files[0]} have neither a .txt caption nor a .json with a 'caption' field; they hold "
            f"{sorted(columns)}"
        )
    stream = stream.cast_column(image_field, datasets.Image(decode=False))

    def caption_row(sample: dict) -> dict:
        caption = sample.get(SHARD_CAPTION_FIELD)
        return {
            "image": sample[image_field],
            "caption": caption if caption is not None else (sample.get(SHARD_METADATA_FIELD) or {}).get("caption"),
            "image_name": sample["__key__"],
        }

    # One sample in, one row out, not batched: a resumed stream (`IterableDataset.load_state_dict`) then restarts
    # at the next sample; a batched map restarts at the start of its batch and reads that batch again.
    return stream.map(caption_row, remove_columns=stream.column_names)


def stream_hf_dataset(
    name: str, split: str, image_column: str = "image", caption_column: str = "caption",
    config_name: str | None = None,
) -> datasets.IterableDataset:
    """Caption rows streamed from any `datasets` dataset (`load_dataset(..., streaming=True)`); a caption cell may
    hold one caption or a list, which gives one row per caption (see `decoded_rows`)."""
    stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
    columns = stream.column_names
    if columns is not None:
        absent = [column for column in (image_column, caption_column) if column not in columns]
        if absent:
            raise CaptionDataError(
                f"{name} (split {split!r}) has no column {', '.join(map(repr, absent))}; its columns are {columns}. "
                "Pass the right names as --image_column/--caption_column."
            )
    if stream.features is not None and isinstance(stream.features.get(image_column), datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))

    def caption_rows(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = {"image": [], "caption": [], "image_name": []}
        for image, captions, index in zip(batch[image_column], batch[caption_column], indices):
            path = image.get("path") if isinstance(image, dict) else None
            for caption in captions if isinstance(captions, (list, tuple)) and captions else [captions]:
                rows["image"].append(image)
                rows["caption"].append(caption)
                rows["image_name"].append(Path(path).stem if path else str(index))  # the row number, in this process
        return rows

    # Batched, to give a row per caption, but one source row per batch: a resumed stream reads again only the row
    # whose captions it was part-way through (a batch of 1000 would read up to 999 rows again).
    return stream.map(caption_rows, batched=True, batch_size=1, with_indices=True, remove_columns=columns)


class BadSample(ValueError):
    """A streamed sample to skip; the message is the reason counted (`StreamCounts.skip`)."""


def decode_sample(image, caption, name) -> Image.Image:
    """The RGB image of one streamed sample, or `BadSample` when its caption is missing or its image does not decode
    (the one check of a sample, shared by the image stream and the feature cache's pre-pass)."""
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample(f"no caption: {caption!r}")
    try:
        return as_rgb_image(image, name=str(name))
    except Exception as error:  # a decoder may raise anything on garbage bytes; count it rather than crash
        raise BadSample(f"unreadable image: {type(error).__name__}: {error}") from None


def decoded_rows(stream: datasets.IterableDataset, counts: StreamCounts) -> datasets.IterableDataset:
    """`stream` with each image decoded to RGB and each caption stripped; samples that fail are skipped and counted."""

    def decode(row: dict) -> dict:
        try:
            image = decode_sample(row["image"], row["caption"], row["image_name"])
        except BadSample as problem:
            counts.skip(row["image_name"], str(problem))
            return {"image": None}
        counts.used += 1
        return {"image": image, "caption": row["caption"].strip()}

    # A map and a filter, one row at a time rather than a batched map that drops rows: a resumed stream then decodes
    # no image before its position (a batched map decodes its whole batch again and discards what it had yielded).
    return stream.map(decode, features=None).filter(lambda row: row["image"] is not None)


def first_captions(stream: datasets.IterableDataset, limit: int) -> list[str]:
    """Captions of the first `limit` rows (to train a tokenizer for a model built from scratch), images untouched."""
    return [row["caption"] for row in islice(stream, limit) if isinstance(row["caption"], str) and row["caption"].strip()]


def materialise(stream: datasets.IterableDataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` rows of a decoded stream as an in-memory `Dataset` (for a validation set)."""
    rows = list(islice(stream, limit))
    if not rows:
        raise CaptionDataError("the validation stream yielded no usable sample")
    return datasets.Dataset.from_list(
        [{**row, "image_id": row["image_name"]} for row in rows],
        features=datasets.Features({
            "image": datasets.Image(), "caption": datasets.Value("string"), "image_name": datasets.Value("string"),
            "image_id": datasets.Value("string"),
        }),
    )
