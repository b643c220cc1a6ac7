"""Evaluation jobs behind `eval.py`: captioning a folder, scoring predictions, zero-shot CLIP, attention maps.

Each job reads and checks all of its inputs (files, JSON fields, image decoding, prediction/annotation names) before
any model runs, computes everything, and writes its outputs last, atomically; so a bad input fails with a message
naming the file or field and leaves no output file behind.

File formats (the course's, see the README):
- predictions: `{"<image file name without extension>": "caption", ...}`, covering exactly the evaluated images;
- annotations: COCO style, `{"images": [{"file_name", "id"}], "annotations": [{"image_id", "caption"}]}`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.captions import image_file_in, read_coco_captions
from ..inference.generation import generation_kwargs
from ..inference.loading import check_inference_dtype, check_model_folder, load_for_inference, model_folder
from ..inference.prepacking import can_prepack, prepack_for_cpu
from ..inference.quantization import quantize_for_cpu
from ..model.processing_vitgpt2 import ViTGPT2Processor, load_image
from ..utils.io import (
    InvalidJSONError,
    PathLike,
    atomic_path,
    check_not_an_input,
    check_writable,
    preview_names,
    read_json,
    write_json_atomic,
)
from .attention_maps import CaptionAttention, caption_attention_maps_batch, draw_attention_maps
from .clip_score import DEFAULT_CLIP_MODEL, LoadedClip, clip_score, load_clip
from .zero_shot import (
    ENSEMBLE,
    ZeroShotResult,
    list_images,
    validate_templates,
    write_predictions_csv,
    zero_shot_folder,
)

__all__ = [
    "CocoReferences",
    "ScoreReport",
    "ScoredCaption",
    "caption_folder",
    "caption_images",
    "check_images_readable",
    "check_same_names",
    "clip_score_extremes",
    "compute_attention_maps",
    "default_loader_workers",
    "draw_extremes",
    "image_names",
    "load_captioner",
    "read_coco_references",
    "rank_extremes",
    "read_predictions",
    "run_zero_shot",
    "score_predictions",
    "write_attention_maps",
    "write_extremes",
]

LayerChoice = int | str | Sequence[int] | None  # None: see attention_maps.resolve_layers


# ---------------------------------------------------------------------------------------------------------------
# Images and the captioner


def image_names(paths: Sequence[Path]) -> list[str]:
    """The prediction keys of image files (file names without extension); two files with one name are an error."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise ValueError(f"{seen[path.stem]} and {path} would share the prediction key {path.stem!r}; "
                             "rename or move one of them")
        seen[path.stem] = path
    return list(seen)


def check_images_readable(paths: Sequence[Path], progress: bool = True) -> None:
    """Decodes every image once, so a missing or broken file fails (naming it) before any model runs."""
    for path in tqdm(paths, desc="checking images", unit="image", disable=not progress):
        load_image(path)


def load_captioner(model_or_path, processor: ViTGPT2Processor | None = None,
                   device: str | torch.device | None = None, quantize: str | None = None,
                   prepack: bool | None = None, dtype: str | None = None):
    """Returns `(model, processor)` in eval mode on `device` (default: CUDA when available, else the CPU).

    `model_or_path` is a loaded model (then pass its `processor`), a saved model folder or Hub id, or a peft adapter
    folder from train.py (loaded onto the base model recorded in it); the processor is read from the same folder.
    `quantize="int8"` runs the model in int8 on the CPU (see `modeling_vitgpt2.inference.quantization`).
    `prepack` prepacks the linear layers for oneDNN (`modeling_vitgpt2.inference.prepacking`: faster float32 CPU inference,
    the same function up to rounding). By default a model loaded here from a folder or Hub id is prepacked when it
    runs on the CPU in float32 and its adapter (if any) merges; a loaded model passed in is left as it is.
    `dtype="bfloat16"` runs it in bfloat16 (refused on a CPU without bfloat16 instructions; see
    `modeling_vitgpt2.inference.loading.check_inference_dtype`).
    """
    if quantize is not None:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"quantize={quantize!r} runs on the CPU only, got device={device!r}")
        device = "cpu"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = check_inference_dtype(dtype, device, quantize)  # before the slow load
    loaded_here = isinstance(model_or_path, (str, os.PathLike))
    if loaded_here:
        model_or_path = model_folder(model_or_path)
        check_model_folder(model_or_path)
        if processor is None:
            processor = ViTGPT2Processor.from_pretrained(model_or_path)
        try:
            model = load_for_inference(model_or_path, quantize=quantize, dtype=dtype, device=device)
        except pickle.UnpicklingError:
            pickled = sorted(model_or_path.glob("*.bin"))
            raise ValueError(f"{pickled[0] if pickled else model_or_path}: pickled weights that torch refuses to load "
                             "safely (weights_only); save the model again with save_pretrained, which writes "
                             "model.safetensors") from None
    else:
        model = model_or_path
        if processor is None:
            raise ValueError("a loaded model needs its processor: pass processor=ViTGPT2Processor.from_pretrained(...)")
        if quantize is not None:
            model = quantize_for_cpu(model.to("cpu"), quantize)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    model = model.to(device).eval()
    if prepack is None:
        prepack = (loaded_here and quantize is None and torch_dtype in (None, torch.float32)
                   and torch.device(device).type == "cpu" and can_prepack(model))
    if prepack:
        model = prepack_for_cpu(model)
    return model, processor


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def default_loader_workers() -> int:
    """Image-decoding processes beside the model: one per spare core, at most 4 (enough to keep a CPU model fed)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class _PixelBatch:
    """A DataLoader's collate function: image files -> the processor's `pixel_values` (runs in the workers)."""

    def __init__(self, processor: ViTGPT2Processor):
        self.processor = processor

    def __call__(self, paths: list[Path]) -> torch.Tensor:
        return self.processor(images=paths, return_tensors="pt")["pixel_values"]


@torch.inference_mode()
def caption_images(model, processor, paths: Sequence[Path], *, num_beams: int = 3, batch_size: int = 8,
                   max_length: int | None = None, max_new_tokens: int | None = None,
                   progress: bool = True, num_workers: int | None = None) -> dict[str, str]:
    """Captions image files in batches with beam search: `{file name without extension: caption}`, in input order.

    `num_workers` processes decode and preprocess the next batches while the model captions this one (default:
    `default_loader_workers()`; 0 does everything in this process).
    """
    _check_batch_size(batch_size)
    names = image_names(paths)
    settings = generation_kwargs(num_beams, max_length, max_new_tokens)
    workers = default_loader_workers() if num_workers is None else num_workers
    batches = torch.utils.data.DataLoader(list(paths), batch_size=batch_size, collate_fn=_PixelBatch(processor),
                                          num_workers=min(workers, -(-len(paths) // batch_size)))
    captions = {}
    with tqdm(total=len(paths), desc="captioning", unit="image", disable=not progress) as bar:
        for start, pixel_values in zip(range(0, len(paths), batch_size), batches):
            sequences = model.generate(pixel_values=pixel_values.to(model.device), **settings)
            captions.update(zip(names[start:start + batch_size], processor.batch_decode(sequences)))
            bar.update(len(pixel_values))
    return captions


def caption_folder(model_path_or_model, images_dir: PathLike, num_beams: int = 3, batch_size: int = 8,
                   max_length: int | None = None, *, processor: ViTGPT2Processor | None = None,
                   output: PathLike | None = None, device: str | torch.device | None = None,
                   max_new_tokens: int | None = None, progress: bool = True, quantize: str | None = None,
                   num_workers: int | None = None, dtype: str | None = None) -> dict[str, str]:
    """Captions every image file in `images_dir` (sorted) and returns `{file name without extension: caption}`.

    Args:
        model_path_or_model: a model folder, a Hub id, a peft adapter folder from train.py, or a loaded model (then
            pass `processor`).
        images_dir: the folder of images; a missing folder or an unreadable image fails before the model runs.
        num_beams, batch_size, max_length: beam width, images per `generate` call, caption length limit in tokens
            (default: the model's generation_config).
        max_new_tokens: limit on generated tokens; takes precedence over `max_length`, as in `generate`.
        output: if given, the predictions JSON is written there atomically once every image is captioned.
        quantize: "int8" runs the model in int8 on the CPU (`modeling_vitgpt2.inference.quantization`).
        num_workers: processes that decode images while the model runs (`caption_images`).
        dtype: "bfloat16" runs the model in bfloat16 (`load_captioner`).
    """
    if output is not None:
        check_writable(output)  # an unwritable output must fail now, not after captioning every image
    paths = list_images(images_dir)
    image_names(paths)  # fail on clashing names before the slow part
    if output is not None:
        model_files = _model_files(model_path_or_model)
        check_not_an_input([("--output", output)], [("--images", path) for path in paths] + model_files)
    check_images_readable(paths, progress)
    model, processor = load_captioner(model_path_or_model, processor, device, quantize=quantize, dtype=dtype)
    captions = caption_images(model, processor, paths, num_beams=num_beams, batch_size=batch_size,
                              max_length=max_length, max_new_tokens=max_new_tokens, progress=progress,
                              num_workers=num_workers)
    if output is not None:
        write_json_atomic(output, captions)
    return captions


def _model_files(model_or_path) -> list[tuple[str, Path]]:
    """The files of a local model folder, as inputs an output must not replace (its config.json, say)."""
    if not isinstance(model_or_path, (str, os.PathLike)) or not Path(model_or_path).is_dir():
        return []  # a loaded model or a Hub id
    return [("--model", path) for path in Path(model_or_path).iterdir()]


# ---------------------------------------------------------------------------------------------------------------
# Predictions and references


def _predictions_and_source(predictions: PathLike | Mapping[str, str]) -> tuple[Mapping[str, str], str]:
    """The predictions (read if given as a file) and how to name them in messages."""
    if isinstance(predictions, (str, os.PathLike)):
        return read_predictions(predictions), str(predictions)
    return predictions, "the given predictions"


def read_predictions(path: PathLike) -> dict[str, str]:
    """Reads a predictions file, `{"<image name>": "caption"}`, checking that every caption is a string."""
    predictions = read_json(path, "predictions file")
    if not isinstance(predictions, dict) or not predictions:
        raise InvalidJSONError(f"predictions file {path} must hold a non-empty JSON object "
                               f'{{"<image file name without extension>": "caption"}}, '
                               f"got {type(predictions).__name__}")
    for name, caption in predictions.items():
        if not isinstance(caption, str):
            raise InvalidJSONError(f"predictions file {path}: field {name!r} must be a caption string, "
                                   f"got {caption!r}")
    return predictions


@dataclass(frozen=True)
class CocoReferences:
    """Reference captions and image file names per image name (file name without extension)."""

    references: dict[str, list[str]]
    file_names: dict[str, str]


def read_coco_references(path: PathLike) -> CocoReferences:
    """The references of every image that has a caption in a COCO-style captions file, read by the package's one
    COCO parser (`data.read_coco_captions`); errors name the file and the entry."""
    coco = read_coco_captions(path)
    return CocoReferences(coco.references(), coco.file_names())


def check_same_names(predictions: Mapping[str, str], expected: Sequence[str], predictions_source: str,
                     expected_source: str) -> None:
    """Fails, listing both differences, unless the predictions cover exactly the expected image names."""
    missing = sorted(set(expected) - set(predictions))
    extra = sorted(set(predictions) - set(expected))
    if missing or extra:
        raise ValueError(
            f"the predictions in {predictions_source} must cover exactly the images of {expected_source}: "
            f"{len(missing)} missing ({preview_names(missing)}), {len(extra)} extra ({preview_names(extra)}). Keys are "
            "image file names without extension; caption the same split you score."
        )




def _clip_prefix(prefix: str) -> str:
    """'A photo depicts' and 'A photo depicts ' both put one space between the prefix and the caption."""
    return prefix.rstrip() + " " if prefix.strip() else ""


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class ScoreReport:
    """Corpus scores of one predictions file: every registered metric (`metrics.METRICS`) that could run, in
    `metrics`; those that could not, with the reason, in `skipped`; and per-image values. `cider`, `clip_score` and
    `ref_clip_score` repeat the headline values (None when CLIPScore was skipped)."""

    cider: float
    clip_score: float | None
    ref_clip_score: float | None
    clip_model: str | None
    clip_prefix: str
    metrics: dict[str, float]
    skipped: dict[str, str]
    per_image: dict[str, dict[str, float | None]]

    def to_json(self) -> dict:
        """The scores file: the corpus values and settings first, then `num_images` and `per_image`."""
        summary = asdict(self)
        per_image = summary.pop("per_image")
        return {**summary, "num_images": len(per_image), "per_image": per_image}


def score_predictions(predictions: PathLike | Mapping[str, str], annotations: PathLike,
                      images_dir: PathLike | None = None, *, clip_model: str | LoadedClip | None = None,
                      clip_prefix: str = "", train_annotations: PathLike | None = None,
                      metrics: Sequence[str] | None = None, batch_size: int = 32,
                      output: PathLike | None = None, progress: bool = True) -> ScoreReport:
    """Scores captions against COCO-style references with every registered metric (`metrics.METRICS`): CIDEr,
    BLEU-1..4, ROUGE-L, METEOR (with Java), caption diversity; CLIPScore and RefCLIPScore with `clip_model`; the share
    copied from the training set with `train_annotations`. A metric that cannot run is listed in `skipped`.

    Args:
        predictions: a predictions file or `{name: caption}`; its keys must equal the annotated image names.
        annotations: the COCO-style captions file (references and image file names).
        images_dir: the folder of the annotated images; needed for CLIPScore.
        clip_model: a CLIP Hub id or folder (OpenAI ViT-B/32 defines the metric), or a `LoadedClip`; None skips
            CLIPScore.
        clip_prefix: text before each caption for CLIP: "" (the course) or "A photo depicts" (Hessel et al.).
        train_annotations: the training split's COCO-style captions file, for the share of copied captions.
        metrics: registered metric names to run (default: all).
        output: if given, `ScoreReport.to_json()` is written there atomically.
    """
    from .metrics import compute_metrics

    if output is not None:
        check_writable(output)
        check_not_an_input([("--output", output)], [("--predictions", predictions), ("--annotations", annotations),
                                                    ("--train_annotations", train_annotations)])
    predictions, source = _predictions_and_source(predictions)
    prefix = _clip_prefix(clip_prefix)
    coco = read_coco_references(annotations)
    check_same_names(predictions, list(coco.references), source, str(annotations))
    training_captions = None
    if train_annotations is not None:
        training_captions = [ref for refs in read_coco_references(train_annotations).references.values() for ref in refs]
    names = sorted(coco.references)
    captions = {name: predictions[name] for name in names}
    references = {name: coco.references[name] for name in names}
    image_paths = clip = None
    if clip_model is not None:
        if images_dir is None:
            raise ValueError("CLIPScore needs the images: pass images_dir (eval.py score --images DIR)")
        image_paths = {name: image_file_in(images_dir, coco.file_names[name], annotations) for name in names}
        _check_files_exist(image_paths.values(), images_dir, annotations)
        clip = clip_model if isinstance(clip_model, LoadedClip) else load_clip(clip_model)

    result = compute_metrics(captions, references, training_captions=training_captions, images=image_paths,
                             clip=clip, clip_prefix=prefix, metrics=metrics, batch_size=batch_size, progress=progress)
    report = ScoreReport(
        cider=result.values.get("cider"), clip_score=result.values.get("clip_score"),
        ref_clip_score=result.values.get("ref_clip_score"),
        clip_model=None if clip_model is None else _clip_name(clip_model), clip_prefix=prefix,
        metrics=result.values, skipped=result.skipped, per_image=result.per_image,
    )
    if output is not None:
        write_json_atomic(output, report.to_json())
    return report


def _clip_name(clip_model: str | os.PathLike | LoadedClip) -> str:
    return clip_model.model.name_or_path if isinstance(clip_model, LoadedClip) else str(clip_model)


def _check_files_exist(paths, images_dir: PathLike, listed_in: PathLike) -> None:
    if not Path(images_dir).is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {listed_in} are not in {images_dir}: "
                                f"{preview_names(missing)}. Point --images at the folder of this split.")


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot classification


def run_zero_shot(images_dir: PathLike, id2label: PathLike, templates: Sequence[str], output: PathLike, *,
                  labels_file: PathLike | None = None, ensemble: bool = False,
                  clip_model: str | LoadedClip = DEFAULT_CLIP_MODEL, batch_size: int = 32,
                  progress: bool = True) -> tuple[ZeroShotResult, dict]:
    """Classifies a folder with each template and writes the course's `filename,label` CSV per template next to
    `output` (`<output stem>.<template index>.csv`, and `.ensemble.csv`), then the summary JSON at `output`:
    `{"accuracy": {template: accuracy}, "predictions_csv": {template: CSV file name}, ...}`.

    Returns the `ZeroShotResult` and the summary. Inputs are all checked by `zero_shot_folder` before CLIP runs.
    """
    output = check_writable(output)
    templates = validate_templates(templates)
    csv_paths = {template: output.with_name(f"{output.stem}.{index}.csv") for index, template in enumerate(templates)}
    if ensemble:
        csv_paths[ENSEMBLE] = output.with_name(f"{output.stem}.{ENSEMBLE}.csv")
    check_not_an_input([("--output", path) for path in [output, *csv_paths.values()]],
                       [("--labels", id2label), ("--labels_file", labels_file),
                        *(("--images", path) for path in list_images(images_dir))])
    result = zero_shot_folder(images_dir, id2label, templates, labels_file=labels_file, clip=clip_model,
                              ensemble=ensemble, batch_size=batch_size, progress=progress)
    csv_names = {}
    for template, csv_path in csv_paths.items():
        write_predictions_csv(csv_path, result.filenames, result.predictions[template])
        csv_names[template] = csv_path.name
    summary = {
        "accuracy": result.accuracy,
        "predictions_csv": csv_names,  # file names, in the folder of this JSON
        "num_images": len(result.filenames),
        "clip_model": _clip_name(clip_model),
    }
    write_json_atomic(output, summary)  # last, so its presence means the CSVs are complete
    return result, summary


# ---------------------------------------------------------------------------------------------------------------
# Attention maps and the best / worst captions


def compute_attention_maps(model, processor, images: Sequence[Path], *, layer: LayerChoice = None,
                           head: int | None = None, num_beams: int = 3, max_length: int | None = None,
                           max_new_tokens: int | None = None, batch_size: int = 8,
                           progress: bool = True) -> list[CaptionAttention]:
    """Captions `images` in batches and returns each one's per-word cross-attention maps (see `attention_maps`)."""
    _check_batch_size(batch_size)
    results = []
    with tqdm(total=len(images), desc="attention maps", unit="image", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = list(images[start:start + batch_size])
            results += caption_attention_maps_batch(model, processor, batch, layer=layer, head=head,
                                                    **generation_kwargs(num_beams, max_length, max_new_tokens))
            bar.update(len(batch))
    return results


def _save_attention(result: CaptionAttention, png_path: Path, save_arrays: bool) -> dict:
    """Writes the figure (and with `save_arrays` an .npz beside it) and returns the paths written."""
    written = {"png": str(draw_attention_maps(result, png_path))}
    if save_arrays:
        npz_path = png_path.with_suffix(".npz")
        _save_npz_atomic(
            npz_path,
            caption=np.array(result.caption),
            words=np.array(result.words, dtype=str),
            maps=result.maps,
            prefix_weights=result.prefix_weights,
            layers=np.array(result.layers),
            head=np.array(-1 if result.head is None else result.head),  # -1: the heads are averaged
        )
        written["npz"] = str(npz_path)
    return written


def _save_npz_atomic(path: Path, **arrays) -> None:
    with atomic_path(path) as temporary:  # the temporary name ends in .npz, so savez adds no second suffix
        np.savez(temporary, **arrays)


def write_attention_maps(model_or_path, images: Sequence[PathLike], output_dir: PathLike, *,
                         processor: ViTGPT2Processor | None = None, layer: LayerChoice = None,
                         head: int | None = None, num_beams: int = 3, max_length: int | None = None,
                         max_new_tokens: int | None = None, batch_size: int = 8, save_arrays: bool = False,
                         progress: bool = True) -> list[dict]:
    """Draws `<image stem>_attention.png` in `output_dir` for each image file (and `.npz` arrays with `save_arrays`:
    caption, words, maps (words, grid_h, grid_w), prefix_weights, layers, head with -1 for the mean of the heads).

    `layer`: 0-based decoder layer(s) with cross-attention or "all" (default (2, 3), the report's "3rd-4th layer").
    Returns, per image, `{"image", "caption", "png"[, "npz"]}`.
    """
    paths = [Path(image) for image in images]
    if not paths:
        raise ValueError("no images given: pass at least one image file")
    image_names(paths)  # the output names come from the stems, so they must not clash
    check_writable(Path(output_dir) / f"{paths[0].stem}_attention.png")
    pngs = [Path(output_dir) / f"{path.stem}_attention.png" for path in paths]
    outputs = pngs + [png.with_suffix(".npz") for png in pngs] if save_arrays else pngs
    check_not_an_input([("--output_dir", path) for path in outputs], [("--images", path) for path in paths])
    check_images_readable(paths, progress)
    model, processor = load_captioner(model_or_path, processor)
    results = compute_attention_maps(model, processor, paths, layer=layer, head=head, num_beams=num_beams,
                                     max_length=max_length, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     progress=progress)
    written = []
    for path, png, result in zip(paths, pngs, results):
        files = _save_attention(result, png, save_arrays)
        written.append({"image": str(path), "caption": result.caption, **files})
    return written


@dataclass(frozen=True)
class ScoredCaption:
    """One image-caption pair with its CLIPScore; `name` is the prediction key, `image` the file."""

    name: str
    image: str
    caption: str
    clip_score: float


def clip_score_extremes(predictions: PathLike | Mapping[str, str], images_dir: PathLike,
                        clip_model: str | LoadedClip = DEFAULT_CLIP_MODEL, top_k: int = 1, *,
                        clip_prefix: str = "", batch_size: int = 32,
                        progress: bool = True) -> tuple[list[ScoredCaption], list[ScoredCaption]]:
    """The `top_k` highest and lowest CLIPScore image-caption pairs, best first and worst first.

    Every prediction needs an image in `images_dir` named `<key>.<extension>`; other images there are ignored.
    Ties are broken by name, so the choice is reproducible.
    """
    predictions, source = _predictions_and_source(predictions)
    if not 1 <= top_k <= len(predictions):
        raise ValueError(f"top_k must be between 1 and the number of predictions ({len(predictions)}), got {top_k}")
    image_files = list_images(images_dir)
    available = dict(zip(image_names(image_files), image_files))
    without_image = sorted(set(predictions) - set(available))
    if without_image:
        raise FileNotFoundError(f"{len(without_image)} prediction(s) in {source} have no image in {images_dir}: "
                                f"{preview_names(without_image)}. Point --images at the folder that was captioned.")
    names = sorted(predictions)
    images = {name: available[name] for name in names}
    result = clip_score(images, {name: predictions[name] for name in names}, prefix=_clip_prefix(clip_prefix),
                        clip=clip_model if isinstance(clip_model, LoadedClip) else load_clip(clip_model),
                        batch_size=batch_size, progress=progress)
    pairs = {name: ScoredCaption(name, str(images[name]), predictions[name], result.per_image[name]) for name in names}
    best, worst = rank_extremes(result.per_image, top_k)
    return [pairs[name] for name in best], [pairs[name] for name in worst]


def rank_extremes(scores: Mapping[str, float], top_k: int) -> tuple[list[str], list[str]]:
    """The `top_k` highest- and lowest-scoring names, best first and worst first; ties are broken by name, so the
    choice is reproducible."""
    best = sorted(scores, key=lambda name: (-scores[name], name))[:top_k]
    worst = sorted(scores, key=lambda name: (scores[name], name))[:top_k]
    return best, worst


def draw_extremes(model, processor, best: Sequence[tuple[str, Path]], worst: Sequence[tuple[str, Path]],
                  output_dir: PathLike, *, layer: LayerChoice = None, head: int | None = None,
                  num_beams: int = 3, max_length: int | None = None, max_new_tokens: int | None = None,
                  batch_size: int = 8, progress: bool = True) -> dict[str, list[dict]]:
    """Captions the best and worst `(name, image file)` pairs again and draws each one's attention maps as
    `<best|worst>_<rank>_<name>_attention.png` in `output_dir`. Returns `{"best": [...], "worst": [...]}` with
    `{"rank", "name", "attention_caption", "png"}` per image, in the given order."""
    chosen = [(kind, rank, name, Path(image)) for kind, pairs in (("best", best), ("worst", worst))
              for rank, (name, image) in enumerate(pairs, 1)]
    maps = compute_attention_maps(model, processor, [image for *_, image in chosen], layer=layer, head=head,
                                  num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, progress=progress)
    drawn = {"best": [], "worst": []}
    for (kind, rank, name, _), result in zip(chosen, maps):
        png = draw_attention_maps(result, Path(output_dir) / f"{kind}_{rank}_{name}_attention.png")
        drawn[kind].append({"rank": rank, "name": name, "attention_caption": result.caption, "png": Path(png)})
    return drawn


def write_extremes(predictions: PathLike | Mapping[str, str], images_dir: PathLike, model_or_path,
                   output_dir: PathLike, *, clip_model: str | LoadedClip = DEFAULT_CLIP_MODEL, top_k: int = 1,
                   clip_prefix: str = "", processor: ViTGPT2Processor | None = None,
                   layer: LayerChoice = None, head: int | None = None, num_beams: int = 3,
                   max_length: int | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """Finds the best and worst captions by CLIPScore and draws their attention maps (course problem 3).

    Writes `best_<rank>_<name>_attention.png` / `worst_<rank>_<name>_attention.png` and `extremes.json` (last) in
    `output_dir`, and returns that summary. The maps come from captioning the image again with `model_or_path`, so
    they show the prediction only when it was made by the same model and settings; each entry records the caption
    drawn (`attention_caption`) next to the prediction (`caption`).
    """
    check_writable(Path(output_dir) / "extremes.json")
    check_not_an_input([("--output_dir", Path(output_dir) / "extremes.json")], [("--predictions", predictions)])
    best, worst = clip_score_extremes(predictions, images_dir, clip_model, top_k, clip_prefix=clip_prefix,
                                      batch_size=batch_size, progress=progress)
    model, processor = load_captioner(model_or_path, processor)
    drawn = draw_extremes(model, processor, [(pair.name, pair.image) for pair in best],
                          [(pair.name, pair.image) for pair in worst], output_dir, layer=layer, head=head,
                          num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, progress=progress)
    pairs = {pair.name: pair for pair in best + worst}
    summary = {"clip_model": _clip_name(clip_model), "clip_prefix": _clip_prefix(clip_prefix)}
    for kind, entries in drawn.items():
        summary[kind] = [{**asdict(pairs[entry["name"]]), "rank": entry["rank"],
                          "attention_caption": entry["attention_caption"], "png": str(entry["png"])}
                         for entry in entries]
    write_json_atomic(Path(output_dir) / "extremes.json", summary)
    return summary
