"""Caption data for training and evaluation: the course's COCO layout, any `datasets` dataset, and a batch collator.

Both loaders return a `datasets.Dataset` with one row per caption and the same columns:

- `image_path` (COCO layout) or `image` (`datasets` images, decoded to PIL on access),
- `image_name`: the file name without extension (the key of the predictions file), or the row number when the
  dataset's images have no file name,
- `image_id`, `caption`, `annotation_id`.

`references_per_image` turns such a dataset into the evaluation set: one row per image with all its captions as
`references`. Everything is validated before training starts, and each error says where the problem is.

When training with `transformers.Trainer`, set `remove_unused_columns=False`: the collator needs the image and caption
columns, which the model's forward does not name.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..model.processing_vitgpt2 import ImageLoadError, as_rgb_image
from ..utils.io import InvalidJSONError, PathLike, read_json

__all__ = [
    "CaptionCollator",
    "CaptionDataError",
    "CocoCaption",
    "CocoCaptions",
    "image_file_in",
    "image_source",
    "load_coco_captions",
    "load_hf_captions",
    "read_coco_captions",
    "references_per_image",
]


logger = logging.getLogger(__name__)

_COCO_IMAGE_FIELDS = ("file_name", "id")
_COCO_ANNOTATION_FIELDS = ("image_id", "caption", "id")
_TEXT_FIELDS = ("decoder_input_ids", "decoder_attention_mask", "labels")


class CaptionDataError(InvalidJSONError):
    """A problem in a captions file, a dataset or its images; the message says where it is and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Image checks shared by both loaders


def _decode_error(source: PathLike | dict) -> str | None:
    """Fully decodes one image (a path, or a `datasets` image dict) and returns why it failed, or None."""
    try:
        as_rgb_image(source)
    except ImageLoadError as error:
        return str(error)
    except Exception as error:  # a decoder may raise anything on garbage bytes; report it rather than crash
        return f"{type(error).__name__}: {error}"
    return None


def _find_unreadable_images(
    images: Iterable[tuple[Any, PathLike | dict]], total: int, num_workers: int
) -> dict[Any, str]:
    """Decodes `(key, source)` images on a thread pool (PIL decodes without the GIL) and returns {key: error}.

    Works through the images in chunks so that a large dataset's image bytes are never all in memory at once.
    """
    errors = {}
    images = iter(images)
    with ThreadPoolExecutor(max_workers=num_workers) as pool, tqdm(
        total=total, desc="Checking images", unit="image"
    ) as progress:
        while chunk := list(itertools.islice(images, 256)):
            keys, sources = zip(*chunk)
            for key, error in zip(keys, pool.map(_decode_error, sources)):
                if error is not None:
                    errors[key] = error
            progress.update(len(chunk))
    return errors


def _report_unreadable(errors: dict[Any, str], where: str, skip_bad_images: bool) -> None:
    """Raises one error listing every unreadable image, or with `skip_bad_images` warns once per image."""
    if not errors:
        return
    if skip_bad_images:
        for error in errors.values():
            logger.warning("Skipping an unreadable image: %s", error)
        return
    listing = "\n  ".join(errors.values())
    raise CaptionDataError(
        f"{len(errors)} unreadable image(s) in {where}:\n  {listing}\n"
        "Replace them with complete images, or pass skip_bad_images=True (train.py --skip_bad_images) to drop them."
    )


# ----------------------------------------------------------------------------------------------------------------
# COCO layout


@dataclass(frozen=True)
class CocoCaption:
    """One annotation of a COCO-style captions file, with its image's file name."""

    image_id: Any
    file_name: str
    caption: str  # surrounding white space removed
    annotation_id: Any

    @property
    def image_name(self) -> str:
        """The prediction key: the file name without folder and extension."""
        return Path(self.file_name).stem


@dataclass(frozen=True)
class CocoCaptions:
    """A checked COCO-style captions file: its annotations in file order, each with its image's file name."""

    path: Path
    captions: list[CocoCaption]

    def references(self) -> dict[str, list[str]]:
        """`{image name: [captions]}`, in order of first appearance."""
        references: dict[str, list[str]] = {}
        for entry in self.captions:
            references.setdefault(entry.image_name, []).append(entry.caption)
        return references

    def file_names(self) -> dict[str, str]:
        """`{image name: file name}` of the images that have captions."""
        return {entry.image_name: entry.file_name for entry in self.captions}


def read_coco_captions(annotations_json: PathLike) -> CocoCaptions:
    """Reads and checks a COCO-style captions file: `{"images": [{"file_name", "id"}], "annotations": [{"image_id",
    "caption", "id"}]}` (UTF-8, a byte-order mark allowed). The package's one COCO parser: training and `eval.py`
    read captions through it.

    Every problem raises `CaptionDataError` naming the file and the entry: malformed JSON (line and column), a missing
    field, a duplicate image id, an annotation of an unknown image, an empty caption, a file name that leaves the
    image folder (absolute or with `..`), and two captioned images whose names differ only in their extension or
    folder (`v0.jpg` and `v0.png`): predictions are keyed by the name without extension, so they would be merged.
    """
    path = Path(annotations_json)
    try:
        content = read_json(path, "captions file")
    except (FileNotFoundError, InvalidJSONError) as error:
        raise CaptionDataError(str(error)) from None
    images = _require_list(content, path, "images")
    annotations = _require_list(content, path, "annotations")

    file_names = {}
    for index, entry in enumerate(images):
        _require_fields(entry, _COCO_IMAGE_FIELDS, path, "images", index)
        file_name = entry["file_name"]
        if not isinstance(file_name, str) or not file_name.strip():
            raise CaptionDataError(f"{path}: images[{index}].file_name must be a non-empty file name, got {file_name!r}")
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            raise CaptionDataError(
                f"{path}: images[{index}].file_name {file_name!r} leaves the image folder; file names must be "
                "relative to it, without '..'"
            )
        if entry["id"] in file_names:
            raise CaptionDataError(f"{path}: image id {entry['id']} appears twice in 'images'; ids must be unique.")
        file_names[entry["id"]] = file_name

    captions, named = [], {}
    for index, entry in enumerate(annotations):
        _require_fields(entry, _COCO_ANNOTATION_FIELDS, path, "annotations", index)
        if entry["image_id"] not in file_names:
            raise CaptionDataError(
                f"{path}: annotation id {entry['id']} refers to image_id {entry['image_id']!r}, which is not in "
                "'images'. Add the image or remove the annotation."
            )
        if not isinstance(entry["caption"], str) or not entry["caption"].strip():
            raise CaptionDataError(
                f"{path}: annotation id {entry['id']} has an empty caption. Write the caption or remove the annotation."
            )
        caption = CocoCaption(entry["image_id"], file_names[entry["image_id"]], entry["caption"].strip(), entry["id"])
        first = named.setdefault(caption.image_name, caption.file_name)
        if first != caption.file_name:
            raise CaptionDataError(
                f"{path}: images {first!r} and {caption.file_name!r} share the name {caption.image_name!r} (the "
                "prediction key is the file name without extension), so their captions would be merged; rename one"
            )
        captions.append(caption)
    if not captions:
        raise CaptionDataError(f"{path} has no annotations; there is nothing to train or evaluate on.")
    return CocoCaptions(path, captions)


def image_file_in(image_dir: PathLike, file_name: str, listed_in: PathLike) -> Path:
    """`image_dir / file_name`, refused (naming the annotations file) when it resolves outside `image_dir`: through
    `..`, an absolute name, or a symbolic link that points out of the folder."""
    folder = Path(image_dir)
    path = folder / file_name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CaptionDataError(
            f"{listed_in}: image {file_name!r} resolves to {path.resolve()}, outside the image folder {folder}; "
            "captions may only name images inside it (copy the file there instead of linking to it)"
        )
    return path


def _require_list(content: Any, path: Path, key: str) -> list:
    if not isinstance(content, dict) or key not in content:
        raise CaptionDataError(
            f"{path} has no top-level field '{key}'; the COCO layout is "
            '{"images": [{"file_name", "id"}], "annotations": [{"image_id", "caption", "id"}]}.'
        )
    if not isinstance(content[key], list):
        raise CaptionDataError(f"{path}: '{key}' must be a list, got {type(content[key]).__name__}.")
    return content[key]


def _require_fields(entry: Any, fields: tuple[str, ...], path: Path, key: str, index: int) -> None:
    if not isinstance(entry, dict):
        raise CaptionDataError(f"{path}: {key}[{index}] must be an object with fields {list(fields)}.")
    for field in fields:
        if field not in entry:
            raise CaptionDataError(
                f"{path}: {key}[{index}] has no field '{field}'; every entry of '{key}' needs {list(fields)}."
            )
    for field in ("id", "image_id"):
        # Ids are matched through dicts: a list or object there would fail as "unhashable", naming nothing.
        if field in fields and (isinstance(entry[field], bool) or not isinstance(entry[field], (int, float, str))):
            raise CaptionDataError(
                f"{path}: {key}[{index}].{field} must be a number or a string, got {entry[field]!r}."
            )


def load_coco_captions(
    annotations_json: PathLike,
    image_dir: PathLike,
    skip_bad_images: bool = False,
    num_workers: int = 8,
) -> datasets.Dataset:
    """Loads a COCO-style captions file (`{"images": [...], "annotations": [...]}`) with one row per caption.

    Columns: `image_path`, `image_name` (file name without extension), `image_id`, `caption` (surrounding white space
    removed), `annotation_id`, in the order of the annotations. Images without any caption are left out.

    Everything is checked before returning: the file as `read_coco_captions` checks it, that each image lies inside
    `image_dir` and is present (all missing ones are reported together) and that each one decodes completely (on
    `num_workers` threads). With `skip_bad_images=True`, missing or unreadable images are logged and their captions
    dropped instead.
    """
    coco = read_coco_captions(annotations_json)
    path, image_dir = coco.path, Path(image_dir)
    image_paths = {}
    for entry in coco.captions:  # in the order the annotations first name the images
        if entry.image_id not in image_paths:
            image_paths[entry.image_id] = image_file_in(image_dir, entry.file_name, path)
    used_image_ids = list(image_paths)  # only images that have captions matter

    missing = [image_paths[image_id] for image_id in used_image_ids if not image_paths[image_id].is_file()]
    if len(missing) == len(used_image_ids):
        examples = ", ".join(str(p) for p in missing[:3])
        raise CaptionDataError(
            f"none of the {len(missing)} images named in {path} is in {image_dir} (e.g. {examples}). "
            "Is image_dir the folder that holds this split's images?"
        )
    if missing and not skip_bad_images:
        listing = "\n  ".join(str(p) for p in missing)
        raise CaptionDataError(
            f"{len(missing)} image file(s) named in {path} are missing from {image_dir}:\n  {listing}\n"
            "Copy them there, or pass skip_bad_images=True (train.py --skip_bad_images) to drop their captions."
        )
    for missing_path in missing:
        logger.warning("Skipping a missing image: %s", missing_path)
    present = [image_id for image_id in used_image_ids if image_paths[image_id].is_file()]

    unreadable = _find_unreadable_images(
        ((image_id, image_paths[image_id]) for image_id in present), total=len(present), num_workers=num_workers
    )
    _report_unreadable(unreadable, str(path), skip_bad_images)
    usable = set(present) - set(unreadable)
    if not usable:
        raise CaptionDataError(f"no readable image is left in {image_dir} for {path}.")

    rows = [entry for entry in coco.captions if entry.image_id in usable]
    return datasets.Dataset.from_dict(
        {
            "image_path": [str(image_paths[entry.image_id]) for entry in rows],
            "image_name": [entry.image_name for entry in rows],
            "image_id": [entry.image_id for entry in rows],
            "caption": [entry.caption for entry in rows],
            "annotation_id": [entry.annotation_id for entry in rows],
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# Any `datasets` dataset


def _captions_of_row(value: Any, name: str, caption_column: str, row: int) -> list[str]:
    """A caption cell holds one string or a list of strings; each must have text."""
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, (list, tuple)) or not captions:
        raise CaptionDataError(
            f"{name}: row {row} of column '{caption_column}' holds {value!r}; expected a caption or a list of captions."
        )
    for position, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            where = f"row {row}" if isinstance(value, str) else f"row {row}, caption {position}"
            raise CaptionDataError(
                f"{name}: {where} of column '{caption_column}' is empty. Write the caption or remove the row."
            )
    return [caption.strip() for caption in captions]


def load_hf_captions(
    dataset_name_or_path: str,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    data_dir: str | None = None,
    skip_bad_images: bool = False,
    num_workers: int = 8,
    **load_dataset_kwargs: Any,
) -> datasets.Dataset:
    """Loads captions from any `datasets` dataset: a Hub id, or a local folder (e.g. an `imagefolder` whose
    `metadata.jsonl`/`metadata.csv` has a caption column), with one row per caption.

    The caption column may hold a string or a list of strings per image; a list gives one training row per caption,
    and all of them are that image's references. Columns: `image` (decoded to PIL on access), `image_name` (the
    image's file name without extension, or the source row number when it has none), `image_id` (the source row
    number), `caption`, `annotation_id`. Images are checked as in `load_coco_captions`. Extra keyword arguments go to
    `datasets.load_dataset` (e.g. `revision`, `cache_dir`).
    """
    source = datasets.load_dataset(dataset_name_or_path, data_dir=data_dir, split=split, **load_dataset_kwargs)
    name = f"{dataset_name_or_path} (split {split!r})"
    absent = [column for column in (image_column, caption_column) if column not in source.column_names]
    if absent:
        raise CaptionDataError(
            f"{name} has no column {', '.join(repr(c) for c in absent)}; its columns are {source.column_names}. "
            "Pass the right names as image_column/caption_column (train.py --image_column/--caption_column)."
        )
    # Undecoded images are {"path", "bytes"} dicts: cheap to copy and to read names from.
    source = source.select_columns([image_column, caption_column]).cast_column(
        image_column, datasets.Image(decode=False)
    )

    captions_per_row = [
        _captions_of_row(value, name, caption_column, row) for row, value in enumerate(source[caption_column])
    ]
    image_names = []

    def images_to_check():
        # One pass reads each image once, for its name and for the check; a dataset's bytes never all sit in memory.
        for row, example in enumerate(source.select_columns([image_column])):
            image_names.append(_image_name(example[image_column], row))
            yield row, example[image_column]

    unreadable = _find_unreadable_images(images_to_check(), total=len(source), num_workers=num_workers)
    _report_unreadable(unreadable, name, skip_bad_images)
    usable_rows = [row for row in range(len(source)) if row not in unreadable]
    if not usable_rows:
        raise CaptionDataError(f"no readable image is left in {name}.")

    row_of_caption = [row for row in usable_rows for _ in captions_per_row[row]]
    # Repeating each image once per caption copies its undecoded cell: just the path for local folders, the bytes for
    # Hub datasets that embed their images (a one-off cost when the dataset is loaded).
    per_caption = source.select(row_of_caption).select_columns([image_column])
    if image_column != "image":
        per_caption = per_caption.rename_column(image_column, "image")
    extra = datasets.Dataset.from_dict(
        {
            "image_name": [image_names[row] for row in row_of_caption],
            "image_id": row_of_caption,
            "caption": [caption for row in usable_rows for caption in captions_per_row[row]],
            "annotation_id": list(range(len(row_of_caption))),
        }
    )
    joined = datasets.concatenate_datasets([per_caption.flatten_indices(), extra], axis=1)
    return joined.cast_column("image", datasets.Image())


def _image_name(image: dict, row: int) -> str:
    path = image.get("path") if isinstance(image, dict) else None
    return Path(path).stem if path else str(row)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation set and batches


def references_per_image(captions: datasets.Dataset) -> datasets.Dataset:
    """One row per image (in order of first appearance) with all its captions as `references: list[str]`.

    Keeps the image columns (`image_path` or `image`, `image_name`, `image_id`) of a dataset from `load_coco_captions`
    or `load_hf_captions`; this is the set CIDEr and CLIPScore are computed on.
    """
    first_row, references = {}, {}
    for row, (image_id, caption) in enumerate(zip(captions["image_id"], captions["caption"])):
        if image_id not in first_row:
            first_row[image_id], references[image_id] = row, []
        references[image_id].append(caption)
    per_image = captions.select(list(first_row.values()))
    per_image = per_image.remove_columns([c for c in ("caption", "annotation_id") if c in per_image.column_names])
    return per_image.add_column("references", list(references.values()))


def image_source(item: Any) -> Any:
    """The image a caption row stands for: its `image` (decoded or not), else its `image_path`. Anything else (a
    path, a PIL image, an array, an undecoded `datasets` image dict) is an image already and is returned as is."""
    if not isinstance(item, Mapping) or "bytes" in item:
        return item
    if item.get("image") is not None:
        return item["image"]
    if item.get("image_path") is not None:
        return item["image_path"]
    raise KeyError(
        f"a row has neither 'image' nor 'image_path' (its keys: {sorted(item)}). With transformers.Trainer, set "
        "remove_unused_columns=False so that these columns reach the collator."
    )


class CaptionCollator:
    """Turns caption rows into a model batch: `pixel_values`, `decoder_input_ids`, `decoder_attention_mask`, `labels`.

    Each row needs an image, as `image` (PIL image or array) or `image_path` (read with `as_rgb_image`), and a
    `caption`. Rows without captions (e.g. from `references_per_image`) give `pixel_values` only, for generation.
    `processor` is a `ViTGPT2Processor`: it makes `pixel_values` from the images and the teacher-forcing inputs and
    labels from the captions, truncated to `max_length` tokens (None: the processor's default).
    """

    def __init__(self, processor: Any, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def text_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The teacher-forcing inputs and labels of `rows`; empty when a row has no caption (generation)."""
        if not all("caption" in row for row in rows):
            return {}
        text = self.processor.tokenize_captions([row["caption"] for row in rows], max_length=self.max_length)
        return {key: torch.as_tensor(text[key]) for key in _TEXT_FIELDS}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [as_rgb_image(image_source(row), name=f"image {row.get('image_name', '')}".strip()) for row in rows]
        batch = {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        batch.update(self.text_batch(rows))
        return batch
