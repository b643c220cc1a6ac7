"""Processor for ViTGPT2: the encoder's image transform plus the GPT-2 tokenizer.

This file is copied next to the weights for `trust_remote_code=True`, so it imports only torch, numpy, PIL and
transformers.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

__all__ = ["IMAGE_EXTENSIONS", "ViTGPT2Processor", "ImageLoadError", "ImageTooLargeError", "load_image", "as_rgb_image",
           "to_rgb", "max_image_pixels", "DEFAULT_MAX_IMAGE_PIXELS", "MAX_IMAGE_PIXELS_VARIABLE"]


# The file extensions read as images (lower case) wherever files are picked by name: image folders, the demo's
# examples and the samples of webdataset shards.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# A file path, a PIL image, an HxW / HxWxC uint8 array, or an undecoded `datasets` image ({"bytes": ..., "path": ...}).
ImageLike = str | os.PathLike | Image.Image | np.ndarray | Mapping


class ImageLoadError(ValueError):
    """An image that cannot be read or decoded; the message names the file."""


class ImageTooLargeError(ImageLoadError):
    """An image that declares more pixels than the limit (`max_image_pixels`), refused before it is decoded."""

    def __init__(self, name: str, size: tuple[int, int] | None, pixels: int | None, limit: int):
        self.name, self.size, self.pixels, self.limit = name, size, pixels, limit
        super().__init__(
            f"refusing to decode image {name}: it is {self.figure()}, more than the limit of {limit:,} (a guard "
            f"against decompression bombs). Shrink it, or raise the limit with the environment variable "
            f"{MAX_IMAGE_PIXELS_VARIABLE}={pixels or 'PIXELS'} (0: no limit)."
        )

    def __reduce__(self):  # rebuilt from its fields when it crosses to another process
        return type(self), (self.name, self.size, self.pixels, self.limit)

    def figure(self) -> str:
        """How many pixels the image has, as exactly as its header said."""
        if self.size is not None:
            return f"{self.size[0]:,} x {self.size[1]:,} = {self.pixels:,} pixels"
        return f"{self.pixels:,} pixels" if self.pixels is not None else "too many pixels to open"


MAX_IMAGE_PIXELS_VARIABLE = "VITGPT2_MAX_IMAGE_PIXELS"
# Pillow's own warning figure (about 9,459 x 9,459), which Pillow only enforces at twice the size. An image is
# resized to the encoder's few hundred pixels anyway; what this bounds is the memory and time of decoding it.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def _composite_on_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode the encoder may meet (grayscale, palette, alpha, 16-bit, float, CMYK) to 8-bit RGB.

    Transparent pixels are composited on white rather than dropped to black, which is what a viewer shows.
    High-bit-depth grayscale is rescaled by its type's range, not clipped, so a 16-bit scan keeps its contrast.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scale = 65535.0
        elif image.mode == "I":
            scale = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        else:
            low, high = pixels.min(initial=0.0), pixels.max(initial=1.0)
            pixels, scale = pixels - low, max(high - low, 1e-12)
        eight_bit = np.clip(np.round(pixels / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    return image.convert("RGB")


def max_image_pixels() -> int | None:
    """The most pixels an image may declare and still be decoded, the one limit of every entry point (captioning,
    evaluation, training data, streams, the demo): `VITGPT2_MAX_IMAGE_PIXELS` when set (0: no limit), else
    `DEFAULT_MAX_IMAGE_PIXELS`."""
    value = os.environ.get(MAX_IMAGE_PIXELS_VARIABLE, "").strip()
    if not value:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value.replace(",", "").replace("_", ""))
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"{MAX_IMAGE_PIXELS_VARIABLE}={value!r} is not a number of pixels: set it to a whole number "
                         "(0 for no limit) or unset it")
    return limit or None


def _pixel_limit(max_pixels: int | None) -> int | None:
    return max_image_pixels() if max_pixels is None else (max_pixels or None)


def _decoded(source, name: str, limit: int | None) -> Image.Image:
    """Opens `source` (a path or a file object), refuses it from its header when it declares more than `limit`
    pixels, and only then decodes it fully (so truncated files fail here, not mid-batch), as RGB."""
    if Image.MAX_IMAGE_PIXELS is not None and (limit is None or limit > 2 * Image.MAX_IMAGE_PIXELS):
        # Pillow refuses above twice its own figure while opening, before this limit could let the image through:
        # a limit raised past Pillow's is the user's explicit choice, so Pillow's guard follows it.
        Image.MAX_IMAGE_PIXELS = None if limit is None else limit
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own figure; the limit below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image_file = Image.open(source)
    except Image.DecompressionBombError as error:
        # Only past twice the limit (see above), whose exact figure Pillow names; it stopped before reading the size.
        counted = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageTooLargeError(name, None, int(counted[1]) if counted else None, limit) from error
    with image_file as image:
        width, height = image.size
        if limit is not None and width * height > limit:
            raise ImageTooLargeError(name, (width, height), width * height, limit)
        image.load()
        return to_rgb(image)


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Opens an image file fully (so truncated files fail here, not mid-batch) and returns it as RGB.

    An image whose header declares more than `max_pixels` pixels (default: `max_image_pixels()`; 0: no limit) is
    refused with `ImageTooLargeError` before it is decoded."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    limit = _pixel_limit(max_pixels)
    try:
        return _decoded(path, str(path), limit)
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(
            f"cannot read image {path}: {error}. Check that the file is a complete image "
            "(re-download or re-export it), or skip it (train.py --skip_bad_images)."
        ) from error


def _decode_bytes(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    limit = _pixel_limit(max_pixels)
    try:
        return _decoded(io.BytesIO(data), name, limit)
    except ImageLoadError:
        raise
    except Exception as error:  # a decoder may raise anything on garbage bytes
        raise ImageLoadError(
            f"cannot read {name}: {error}. Replace it with a complete image, or drop its rows."
        ) from error


def as_rgb_image(image: ImageLike, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """The one image loader: a path, a PIL image, an HxW / HxWxC uint8 array or an undecoded `datasets` image
    (`{"bytes": ..., "path": ...}`) -> an RGB PIL image. Unreadable input raises `ImageLoadError` naming it; a file
    or bytes declaring more than `max_pixels` pixels (see `load_image`) raises `ImageTooLargeError` undecoded."""
    if isinstance(image, Mapping):
        if image.get("bytes") is None:
            return load_image(image["path"], max_pixels)
        return _decode_bytes(image["bytes"], str(image.get("path") or name), max_pixels)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ImageLoadError(f"{name}: expected an HxW or HxWx3/4 array, got shape {tuple(image.shape)}")
        if image.dtype != np.uint8:  # Pillow takes few others, and would say "Cannot handle this data type" unnamed
            raise ImageLoadError(f"{name}: expected a uint8 array (0-255), got {image.dtype}; convert it first, e.g. "
                                 "(array * 255).round().astype('uint8') for floats in 0-1")
        return to_rgb(Image.fromarray(image))
    raise ImageLoadError(f"{name}: expected a file path, a PIL image or a numpy array, got {type(image).__name__}")


class ViTGPT2Processor(ProcessorMixin):
    """Prepares images (with the encoder's own pretrained transform) and captions for ViTGPT2.

    `processor(images=..., text=...)` returns `pixel_values` and, for text, a generation prompt
    (`decoder_input_ids` = start token + the text, left-padded, with `decoder_attention_mask`);
    `processor.tokenize_captions(captions)` returns teacher-forcing inputs and labels for training;
    `processor.batch_decode(ids)` turns generated ids back into captions.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_timm_model(cls, timm_model, tokenizer) -> ViTGPT2Processor:
        """Builds the image transform timm uses for `timm_model`'s pretrained weights as a `CLIPImageProcessor`
        (resize the short side to size / crop_pct, centre crop, normalise), so it is saved with the model and
        loads without timm or the Hub. One difference remains: where the resized side exceeds the crop by 4k + 3
        pixels, transformers' centre crop starts one pixel earlier than torchvision's (it floors the offset where
        torchvision rounds half to even), so those images' pixels are shifted by one row or column."""
        import math

        from timm.data import resolve_model_data_config
        from transformers import CLIPImageProcessor
        from transformers.image_utils import PILImageResampling

        data_config = resolve_model_data_config(timm_model)
        _, height, width = data_config["input_size"]
        patch_embed = getattr(timm_model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None):
            # `img_size=` given at creation is not reflected in the pretrained config's input size.
            height, width = patch_embed.img_size
        resample = {
            "bicubic": PILImageResampling.BICUBIC,
            "bilinear": PILImageResampling.BILINEAR,
            "nearest": PILImageResampling.NEAREST,
        }[data_config.get("interpolation", "bicubic")]
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": math.floor(min(height, width) / data_config.get("crop_pct", 1.0))},
            crop_size={"height": height, "width": width},
            resample=resample,
            image_mean=list(data_config["mean"]),
            image_std=list(data_config["std"]),
            do_convert_rgb=True,
        )
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    @classmethod
    def from_vision_encoder_decoder(cls, path) -> ViTGPT2Processor:
        """The processor of a transformers `VisionEncoderDecoderModel` folder or id, for a converted model."""
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path))

    @property
    def start_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        **kwargs,
    ) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("pass `images` (paths, PIL images or arrays) and/or `text` (caption prompts)")
        data = {}
        if images is not None:
            batch = list(images) if isinstance(images, (list, tuple)) else [images]
            if not batch:
                raise ValueError("images is empty: pass at least one image (a path, a PIL image or an array)")
            rgb = [as_rgb_image(image, name=f"images[{index}]") for index, image in enumerate(batch)]
            data.update(self.image_processor(rgb, return_tensors=return_tensors))
        if text is not None:
            data.update(self._prompts(text))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _prompts(self, text: str | Sequence[str]) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        ids = [[self.start_token_id] + self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(row) for row in ids)
        # Left padding: generation continues from the last position of every row.
        return {
            "decoder_input_ids": [[self.tokenizer.pad_token_id] * (width - len(row)) + row for row in ids],
            "decoder_attention_mask": [[0] * (width - len(row)) + [1] * len(row) for row in ids],
        }

    def tokenize_captions(self, captions: Sequence[str], max_length: int | None = None, return_tensors="pt"):
        """Teacher-forcing batch: inputs `[start] + tokens`, labels `tokens + [end]` (-100 on padding).

        The end token stays in the labels so the model learns to stop; `max_length` caps the token count
        (start/end included) by cutting the caption, keeping the end label.
        """
        rows_in, rows_out = [], []
        for index, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"captions[{index}] is empty: every training caption needs text")
            tokens = self.tokenizer(caption.strip(), add_special_tokens=False)["input_ids"]
            if max_length is not None:
                tokens = tokens[: max_length - 1]
            rows_in.append([self.start_token_id] + tokens)
            rows_out.append(tokens + [self.tokenizer.eos_token_id])
        width = max(len(row) for row in rows_in)
        pad = self.tokenizer.pad_token_id
        batch = {
            "decoder_input_ids": [row + [pad] * (width - len(row)) for row in rows_in],
            "decoder_attention_mask": [[1] * len(row) + [0] * (width - len(row)) for row in rows_in],
            "labels": [row + [-100] * (width - len(row)) for row in rows_out],
        }
        return BatchFeature(data=batch, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)]

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs).strip()

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "decoder_input_ids", "decoder_attention_mask"]
