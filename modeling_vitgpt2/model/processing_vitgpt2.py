"""Processor for ViTGPT2: the encoder's image transform plus the GPT-2 tokenizer.

This file is copied next to the weights for `trust_remote_code=True`, so it imports only torch, numpy, PIL and
transformers.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

__all__ = ["IMAGE_EXTENSIONS", "ViTGPT2Processor", "ImageLoadError", "load_image", "as_rgb_image", "to_rgb"]


# The file extensions read as images (lower case) wherever files are picked by name: image folders, the demo's
# examples and the samples of webdataset shards.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# A file path, a PIL image, an HxW / HxWxC uint8 array, or an undecoded `datasets` image ({"bytes": ..., "path": ...}).
ImageLike = str | os.PathLike | Image.Image | np.ndarray | Mapping


class ImageLoadError(ValueError):
    """An image that cannot be read or decoded; the message names the file."""


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image file fully (so truncated files fail here, not mid-batch) and returns it as RGB."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"refusing to decode image {path}: {str(error).rstrip('.')}. Shrink it to at most "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(
            f"cannot read image {path}: {error}. Check that the file is a complete image "
            "(re-download or re-export it), or skip it (train.py --skip_bad_images)."
        ) from error


def _decode_bytes(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except Exception as error:  # a decoder may raise anything on garbage bytes
        raise ImageLoadError(
            f"cannot read {name}: {error}. Replace it with a complete image, or drop its rows."
        ) from error


def as_rgb_image(image: ImageLike, name: str = "image") -> Image.Image:
    """The one image loader: a path, a PIL image, an HxW / HxWxC uint8 array or an undecoded `datasets` image
    (`{"bytes": ..., "path": ...}`) -> an RGB PIL image. Unreadable input raises `ImageLoadError` naming it."""
    if isinstance(image, Mapping):
        if image.get("bytes") is None:
            return load_image(image["path"])
        return _decode_bytes(image["bytes"], str(image.get("path") or name))
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ImageLoadError(f"{name}: expected an HxW or HxWx3/4 array, got shape {tuple(image.shape)}")
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
        loads without timm or the Hub."""
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
