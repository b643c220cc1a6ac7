"""CLIP zero-shot image classification with prompt templates (the course's problem 1).

Each class name is put into a template such as "This is a photo of {object}"; an image gets the class whose prompt
embedding is closest to the image embedding. `ensemble=True` adds the CLIP paper's prompt ensembling: per class,
the normalised embeddings of all templates are averaged and renormalised.

Ground truth comes from file names in the course layout (`{class_id}_{n}.png`) or from an explicit labels file
(CSV `filename,label` or JSON `{"filename": class_id}`); `id2label.json` maps class ids to class names.
Everything is read and checked before any prediction is made, and nothing here writes a file except
`write_predictions_csv`, so a bad input never leaves a partial output behind.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.processing_vitgpt2 import IMAGE_EXTENSIONS
from ..utils.io import InvalidJSONError, PathLike, read_json, write_text_atomic
from .clip_score import DEFAULT_CLIP_MODEL, ClipLike, LoadedClip, embed_images, embed_texts, resolve_clip

__all__ = [
    "ENSEMBLE",
    "ZeroShotResult",
    "class_id_from_filename",
    "class_probabilities",
    "classify_images",
    "format_predictions_csv",
    "list_images",
    "load_id2label",
    "read_labels_file",
    "validate_templates",
    "write_predictions_csv",
    "zero_shot_folder",
]

ENSEMBLE = "ensemble"  # key of the prompt-ensemble predictions next to the per-template ones
PLACEHOLDER = "{object}"
_COURSE_NAME = re.compile(r"^(-?\d+)_[^/\\]+$")


def validate_templates(templates: Sequence[str]) -> list[str]:
    """Checks the prompt templates: at least one, each a string containing `{object}`, no duplicates."""
    if isinstance(templates, str):
        raise TypeError(f"templates must be a list of strings, got the single string {templates!r}; "
                        "wrap it in a list")
    templates = list(templates)
    if not templates:
        raise ValueError('no prompt templates given; pass at least one, e.g. ["This is a photo of {object}"]')
    for template in templates:
        if not isinstance(template, str):
            raise TypeError(f"prompt templates must be strings, got {type(template).__name__}: {template!r}")
        if PLACEHOLDER not in template:
            raise ValueError(f"prompt template {template!r} has no {PLACEHOLDER} placeholder for the class name; "
                             'write it like "This is a photo of {object}"')
    duplicates = sorted({template for template in templates if templates.count(template) > 1})
    if duplicates:
        raise ValueError(f"prompt templates must be unique; repeated: {duplicates}")
    return templates


def load_id2label(path: PathLike) -> dict[int, str]:
    """Reads `id2label.json` (`{"0": "apple", ...}`) into `{0: "apple", ...}`, naming the file and field on errors."""
    raw = read_json(path, "id2label file")
    if not isinstance(raw, dict) or not raw:
        raise InvalidJSONError(f"id2label file {path} must hold a non-empty JSON object mapping class ids to class "
                               f'names, like {{"0": "apple"}}; got {type(raw).__name__}')
    id2label = {}
    for key, name in raw.items():
        try:
            class_id = int(key)
        except ValueError:
            raise InvalidJSONError(f"id2label file {path}: key {key!r} is not an integer class id") from None
        if not isinstance(name, str) or not name.strip():
            raise InvalidJSONError(f"id2label file {path}: field {key!r} must be a non-empty class name string, "
                                   f"got {name!r}")
        if class_id in id2label:
            raise InvalidJSONError(f"id2label file {path}: class id {class_id} appears twice (as {key!r})")
        # CLIP's tokenizer lower-cases: two names alike but for case or spaces give one prompt, and the second
        # class could never be predicted (ImageNet has "crane" twice).
        twin = next((other for other, known in id2label.items()
                     if known.strip().lower() == name.strip().lower()), None)
        if twin is not None:
            raise InvalidJSONError(f"id2label file {path}: classes {twin} and {class_id} are both named {name!r}, so "
                                   "CLIP cannot tell them apart; give them distinct names (e.g. 'crane (bird)')")
        id2label[class_id] = name
    return dict(sorted(id2label.items()))


def list_images(image_dir: PathLike) -> list[Path]:
    """The image files directly inside `image_dir`, sorted by name."""
    image_dir = Path(image_dir)
    if not image_dir.exists():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    if not image_dir.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got the file {image_dir}")
    images = sorted(path for path in image_dir.iterdir()
                    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    return images


def class_id_from_filename(filename: str, id2label: Mapping[int, str]) -> int:
    """The class id in a course-layout file name, `{class_id}_{n}.png`; errors name the file."""
    match = _COURSE_NAME.match(filename)
    if match is None:
        raise ValueError(f"cannot read a class id from the image name {filename!r}: expected "
                         "'{class_id}_{n}.png'. Rename the files or pass a labels file (filename,label).")
    class_id = int(match.group(1))
    if class_id not in id2label:
        raise ValueError(f"image {filename!r} names class id {class_id}, which id2label does not have "
                         f"(known ids: {_id_range(id2label)})")
    return class_id


def _id_range(id2label: Mapping[int, str]) -> str:
    ids = sorted(id2label)
    return f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids))


def read_labels_file(path: PathLike, id2label: Mapping[int, str]) -> dict[str, int]:
    """Reads ground truth as `{filename: class_id}` from a CSV (`filename,label` header) or a JSON object.

    Errors name the file and the offending row or field, including class ids that id2label does not have.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        raw = read_json(path, "labels file")
        if not isinstance(raw, dict):
            raise InvalidJSONError(f"labels file {path} must hold a JSON object mapping file names to class ids, "
                                   f"got {type(raw).__name__}")
        rows = [(str(name), value, f"field {name!r}") for name, value in raw.items()]
    else:
        if not path.is_file():
            raise FileNotFoundError(f"labels file not found: {path}")
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
                raise ValueError(f"labels file {path} must be a CSV with a 'filename,label' header, "
                                 f"got columns {reader.fieldnames}")
            rows = [(row["filename"], row["label"], f"line {reader.line_num}") for row in reader]
    labels = {}
    for filename, value, where in rows:
        try:
            # JSON's numbers arrive as such: int() would truncate 0.9 to 0 and read true as 1.
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            class_id = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"labels file {path}, {where}: label {value!r} is not an integer class id") from None
        if class_id not in id2label:
            raise ValueError(f"labels file {path}, {where}: class id {class_id} for {filename!r} is not in id2label "
                             f"(known ids: {_id_range(id2label)})")
        if filename in labels:
            raise ValueError(f"labels file {path}, {where}: {filename!r} is labelled twice")
        labels[filename] = class_id
    if not labels:
        raise ValueError(f"labels file {path} has no labels")
    return labels


def _class_embeddings(clip: LoadedClip, class_names: Sequence[str], templates: Sequence[str], batch_size: int,
                      progress: bool) -> dict[str, torch.Tensor]:
    """Unit text embeddings per template, each (num_classes, dim)."""
    prompts = [template.replace(PLACEHOLDER, name) for template in templates for name in class_names]
    embeddings = embed_texts(clip, prompts, batch_size=batch_size, progress=progress)
    return dict(zip(templates, embeddings.split(len(class_names))))


def _similarities(images, class_names, templates, clip, ensemble, batch_size, device, progress):
    """Cosine similarities per template, each (num_images, num_classes), and the loaded CLIP."""
    templates = validate_templates(templates)
    if not class_names:
        raise ValueError("no class names to choose from")
    repeated = sorted({name for name in class_names if [other.lower() for other in class_names].count(name.lower()) > 1})
    if repeated:  # CLIP lower-cases: one prompt for both, so the second could never win
        raise ValueError(f"{', '.join(repeated)}: each class name once (CLIP does not tell case apart).")
    if len(images) == 0:
        raise ValueError("no images to classify")
    clip = resolve_clip(clip, device)
    image_embeddings = embed_images(clip, list(images), batch_size=batch_size, progress=progress)
    per_template = _class_embeddings(clip, class_names, templates, 8 * batch_size, progress)
    if ensemble:
        mean = torch.stack(list(per_template.values())).mean(dim=0)
        per_template[ENSEMBLE] = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return {name: image_embeddings @ text.T for name, text in per_template.items()}, clip


def classify_images(
    images: Sequence,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    clip: ClipLike = DEFAULT_CLIP_MODEL,
    ensemble: bool = False,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, list[int]]:
    """Zero-shot predictions per template: `{template: [class index per image]}` (+ `ENSEMBLE` if requested).

    Indices point into `class_names`. With `ensemble=True` the per-class text embedding is the renormalised mean of
    the normalised embeddings of all templates (Radford et al., 2021).
    """
    similarities, _ = _similarities(images, class_names, templates, clip, ensemble, batch_size, device, progress)
    return {name: values.argmax(dim=-1).tolist() for name, values in similarities.items()}


def class_probabilities(
    images: Sequence,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    clip: ClipLike = DEFAULT_CLIP_MODEL,
    ensemble: bool = False,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """CLIP's probabilities over `class_names` per template: `{template: (num_images, num_classes)}` (+ `ENSEMBLE`).

    The softmax of the cosine similarities times CLIP's learned `logit_scale`, as `CLIPModel`'s `logits_per_image`;
    the most probable class is `classify_images`'s prediction.
    """
    similarities, clip = _similarities(images, class_names, templates, clip, ensemble, batch_size, device, progress)
    scale = clip.model.logit_scale.detach().float().exp().cpu()
    return {name: (scale * values).softmax(dim=-1) for name, values in similarities.items()}


@dataclass(frozen=True)
class ZeroShotResult:
    """Predictions per template (class ids, aligned with `filenames`) and accuracy when ground truth is known."""

    filenames: list[str]
    predictions: dict[str, list[int]]
    labels: list[int] | None
    accuracy: dict[str, float | None] = field(default_factory=dict)
    id2label: dict[int, str] = field(default_factory=dict)


def zero_shot_folder(
    image_dir: PathLike,
    id2label: PathLike | Mapping[int, str],
    templates: Sequence[str],
    *,
    labels_file: PathLike | None = None,
    labels_from_filenames: bool = True,
    clip: ClipLike = DEFAULT_CLIP_MODEL,
    ensemble: bool = False,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ZeroShotResult:
    """Classifies every image in a folder with each template and scores the accuracy.

    Args:
        image_dir: folder of images (course layout: `{class_id}_{n}.png`).
        id2label: path of `id2label.json` or an already loaded `{class_id: name}`.
        templates: prompt templates, each with an `{object}` placeholder.
        labels_file: optional ground truth (CSV `filename,label` or JSON); takes precedence over file names.
        labels_from_filenames: without a labels file, read the class id from `{class_id}_{n}.png` names; set
            False for unlabelled images (accuracy is then None).
        clip, ensemble, batch_size, device, progress: see `classify_images`.

    All inputs are validated before the model is run; no file is written.
    """
    templates = validate_templates(templates)
    if not isinstance(id2label, Mapping):
        id2label = load_id2label(id2label)
    paths = list_images(image_dir)
    filenames = [path.name for path in paths]
    if labels_file is not None:
        known = read_labels_file(labels_file, id2label)
        present = set(filenames)
        unlabelled = [name for name in filenames if name not in known]
        absent = [name for name in known if name not in present]
        if unlabelled or absent:
            raise ValueError(f"labels file {labels_file} does not match the images in {image_dir}: "
                             f"{len(unlabelled)} image(s) without a label {unlabelled[:5]}, "
                             f"{len(absent)} label(s) for missing images {absent[:5]}. "
                             "Point both at the same split.")
        labels = [known[name] for name in filenames]
    elif labels_from_filenames:
        labels = [class_id_from_filename(name, id2label) for name in filenames]
    else:
        labels = None

    class_ids = list(id2label)
    indices = classify_images(paths, [id2label[class_id] for class_id in class_ids], templates, clip=clip,
                              ensemble=ensemble, batch_size=batch_size, device=device, progress=progress)
    predictions = {name: [class_ids[index] for index in chosen] for name, chosen in indices.items()}
    accuracy = {name: None if labels is None else sum(p == t for p, t in zip(chosen, labels)) / len(labels)
                for name, chosen in predictions.items()}
    return ZeroShotResult(filenames, predictions, labels, accuracy, dict(id2label))


def format_predictions_csv(filenames: Sequence[str], class_ids: Sequence[int]) -> str:
    """The course's output format: a `filename,label` header, then one row per image."""
    if len(filenames) != len(class_ids):
        raise ValueError(f"{len(filenames)} file names but {len(class_ids)} predictions")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "label"])
    writer.writerows(zip(filenames, class_ids))
    return buffer.getvalue()


def write_predictions_csv(path: PathLike, filenames: Sequence[str], class_ids: Sequence[int]) -> Path:
    """Writes `format_predictions_csv(...)` to `path` atomically (a crash never leaves half a CSV)."""
    return write_text_atomic(path, format_predictions_csv(filenames, class_ids))
