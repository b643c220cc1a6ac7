"""CLIPScore and RefCLIPScore (Hessel et al., 2021) with a transformers `CLIPModel`.

Per image, CLIP-S = w * max(cos(image embedding, caption embedding), 0) with w = 2.5. The course this project comes
from scores the bare caption; Hessel et al. prefix it with "A photo depicts " (`prefix=HESSEL_PREFIX`). With
reference captions, RefCLIP-S is the harmonic mean of CLIP-S and max(max over references of cos(caption, reference),
0), the references getting the same prefix as the caption, as in the authors' code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

from ..model.processing_vitgpt2 import ImageLike, as_rgb_image
from ..utils.io import preview_names

__all__ = [
    "CLIP_SCORE_WEIGHT",
    "DEFAULT_CLIP_MODEL",
    "HESSEL_PREFIX",
    "ClipScoreResult",
    "LoadedClip",
    "clip_score",
    "embed_images",
    "embed_texts",
    "load_clip",
    "resolve_clip",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
HESSEL_PREFIX = "A photo depicts "
CLIP_SCORE_WEIGHT = 2.5


class LoadedClip(NamedTuple):
    """A CLIP model in eval mode, its processor and the device it sits on."""

    model: CLIPModel
    processor: CLIPProcessor
    device: torch.device


ClipLike = LoadedClip | str | os.PathLike


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_clip(name_or_path: str | os.PathLike = DEFAULT_CLIP_MODEL,
              device: str | torch.device | None = None) -> LoadedClip:
    """Loads a `CLIPModel` and its `CLIPProcessor` from a Hub id or a local folder, in eval mode.

    Args:
        name_or_path: a Hub id (the default, OpenAI's ViT-B/32, is the model CLIPScore is defined with) or a folder
            holding a saved `CLIPModel` and `CLIPProcessor`.
        device: where to run; defaults to CUDA when available, else the CPU.
    """
    device = torch.device(device) if device is not None else _default_device()
    try:
        model = CLIPModel.from_pretrained(name_or_path)
        processor = CLIPProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise OSError(
            f"cannot load the CLIP model {str(name_or_path)!r}: {error}\n"
            "Pass a local folder holding a saved CLIPModel and CLIPProcessor (config.json, the weights, the "
            "tokenizer and preprocessor files), or run where the Hugging Face Hub is reachable to download "
            f"{DEFAULT_CLIP_MODEL!r}."
        ) from error
    model.to(device).eval()
    return LoadedClip(model, processor, device)


def resolve_clip(clip: ClipLike, device: str | torch.device | None = None) -> LoadedClip:
    """Returns `clip` if it is already loaded, else loads it with `load_clip` (a Hub id or a local folder)."""
    if isinstance(clip, LoadedClip):
        return clip
    return load_clip(clip, device=device)


def _projected(output) -> torch.Tensor:
    """`get_*_features` return a tensor in older transformers and an output whose pooler_output is it in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit_rows(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def embed_images(clip: LoadedClip, images: Sequence[ImageLike], *, batch_size: int = 32,
                 progress: bool = True) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (float32, on the CPU), one row per image.

    Images may be file paths, PIL images or arrays; a file that cannot be read raises `ImageLoadError` naming it.
    Files are opened one batch at a time, so memory stays flat for large folders.
    """
    _check_batch_size(batch_size)
    rows = []
    with tqdm(total=len(images), desc="CLIP image embeddings", unit="image", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = [as_rgb_image(image, name=f"images[{start + offset}]")
                     for offset, image in enumerate(images[start:start + batch_size])]
            pixels = clip.processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(clip.device, dtype=clip.model.dtype)
            rows.append(_unit_rows(_projected(clip.model.get_image_features(pixel_values=pixels))).cpu())
            bar.update(len(batch))
    return torch.cat(rows) if rows else torch.empty(0, clip.model.config.projection_dim)


@torch.no_grad()
def embed_texts(clip: LoadedClip, texts: Sequence[str], *, batch_size: int = 256,
                progress: bool = True) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (float32, on the CPU), one row per text.

    Texts longer than CLIP's context (77 tokens for OpenAI's models) are truncated, as `clip.tokenize(...,
    truncate=True)` does in the reference implementation.
    """
    _check_batch_size(batch_size)
    max_length = clip.model.config.text_config.max_position_embeddings
    rows = []
    with tqdm(total=len(texts), desc="CLIP text embeddings", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start:start + batch_size])
            tokens = clip.processor.tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                                              return_tensors="pt").to(clip.device)
            features = clip.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"])
            rows.append(_unit_rows(_projected(features)).cpu())
            bar.update(len(batch))
    return torch.cat(rows) if rows else torch.empty(0, clip.model.config.projection_dim)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@dataclass(frozen=True)
class ClipScoreResult:
    """Mean and per-image CLIP-S; with references also RefCLIP-S. Per-image values are a dict for keyed inputs."""

    score: float
    per_image: list | dict
    ref_score: float | None = None
    ref_per_image: list | dict | None = None


def _align(images, captions, references):
    """Validates the inputs and returns (keys, images, captions, references) as aligned lists."""
    keyed = isinstance(captions, Mapping)
    if keyed:
        if not isinstance(images, Mapping):
            raise TypeError("captions is a dict, so images must be a dict with the same keys (image name -> path)")
        missing = [key for key in captions if key not in images]
        extra = [key for key in images if key not in captions]
        if missing or extra:
            raise ValueError(f"captions and images must have the same keys; no image for {preview_names(missing)}; "
                             f"no caption for {preview_names(extra)}")
        keys = list(captions)
        image_list = [images[key] for key in keys]
        caption_list = [captions[key] for key in keys]
        if references is not None:
            if not isinstance(references, Mapping):
                raise TypeError("captions is a dict, so references must be a dict too (image name -> [captions])")
            without = [key for key in keys if key not in references]
            if without:
                raise ValueError(f"no references for {preview_names(without)}; give references for every captioned image")
            references = [references[key] for key in keys]
    else:
        if isinstance(images, Mapping) or isinstance(references, Mapping):
            raise TypeError("images or references is a dict, so captions must be a dict with the same keys too")
        image_list, caption_list = list(images), list(captions)
        if len(image_list) != len(caption_list):
            raise ValueError(f"got {len(image_list)} images but {len(caption_list)} captions; "
                             "give one caption per image")
        keys = list(range(len(caption_list)))
        if references is not None:
            references = list(references)
            if len(references) != len(caption_list):
                raise ValueError(f"got {len(references)} reference lists for {len(caption_list)} captions; "
                                 "give one list of references per caption")
    if not caption_list:
        raise ValueError("no captions to score: the input is empty")
    for key, caption in zip(keys, caption_list):
        if not isinstance(caption, str):
            raise TypeError(f"caption for image {key!r} must be a string, got {type(caption).__name__}")
    if references is not None:
        for key, refs in zip(keys, references):
            if isinstance(refs, str) or not refs:
                raise ValueError(f"references for image {key!r} must be a non-empty list of strings, got {refs!r}")
    return keyed, keys, image_list, caption_list, references




def clip_score(
    images: Sequence[ImageLike] | Mapping[str, ImageLike],
    captions: Sequence[str] | Mapping[str, str],
    references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None = None,
    *,
    clip: ClipLike = DEFAULT_CLIP_MODEL,
    prefix: str = "",
    weight: float = CLIP_SCORE_WEIGHT,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ClipScoreResult:
    """CLIPScore of captions for their images, plus RefCLIPScore when reference captions are given.

    Args:
        images: file paths or PIL images, as a list aligned with `captions` or a dict keyed like `captions`.
        captions: one caption per image.
        references: optional reference captions per image (list of lists, or dict of lists).
        clip: a `LoadedClip` from `load_clip`, or a Hub id / local folder to load (default: OpenAI ViT-B/32).
        prefix: text put before every caption and reference: "" (the course's variant, the default) or
            `HESSEL_PREFIX` ("A photo depicts ", the paper's).
        weight: w in w * max(cos, 0); 2.5 in the paper.
        batch_size: images per forward pass (texts use 8x this).
        device: device for a model loaded here; ignored when `clip` is already loaded.
        progress: show tqdm progress bars.

    Returns:
        `ClipScoreResult` with the plain mean over images (`score`) and the per-image values, and `ref_score` /
        `ref_per_image` when references were given.
    """
    keyed, keys, image_list, caption_list, reference_lists = _align(images, captions, references)
    clip = resolve_clip(clip, device)
    image_embeddings = embed_images(clip, image_list, batch_size=batch_size, progress=progress)
    caption_embeddings = embed_texts(clip, [prefix + caption for caption in caption_list],
                                     batch_size=8 * batch_size, progress=progress)
    cosine = (image_embeddings * caption_embeddings).sum(dim=-1)
    per_image = (weight * cosine.clamp_min(0)).tolist()

    ref_per_image = None
    if reference_lists is not None:
        flat = [prefix + ref for refs in reference_lists for ref in refs]
        reference_embeddings = embed_texts(clip, flat, batch_size=8 * batch_size, progress=progress)
        ref_per_image, start = [], 0
        for index, refs in enumerate(reference_lists):
            block = reference_embeddings[start:start + len(refs)]
            start += len(refs)
            text_similarity = max(float((block @ caption_embeddings[index]).max()), 0.0)
            ref_per_image.append(_harmonic_mean(per_image[index], text_similarity))

    def shaped(values):
        return dict(zip(keys, values)) if keyed else values

    return ClipScoreResult(
        score=sum(per_image) / len(per_image),
        per_image=shaped(per_image),
        ref_score=None if ref_per_image is None else sum(ref_per_image) / len(ref_per_image),
        ref_per_image=None if ref_per_image is None else shaped(ref_per_image),
    )


def _harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
