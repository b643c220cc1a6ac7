"""Where the captioner looks: per-word cross-attention maps over the image patches (course problem 3).

`caption_attention_maps(model, processor, image)` captions an image with beam search and returns, for every generated
word, the decoder's cross-attention over the encoder's patch grid; `draw_attention_maps(result, "out.png")` writes one
PNG: the image with its caption, then one panel per word with its map overlaid.

Conventions (read these before interpreting a figure):
- Layers are numbered from 0, like `config.cross_attention_layers` and `model.decoder.h[i]`. The report's
  "3rd-4th decoder layer" are layers 2 and 3, the default here. Only layers that have cross-attention are selectable.
- Heads are averaged unless `head=` (0-based) picks one; several layers are averaged with equal weight.
- A map is the attention of the query that PREDICTS the token (the position before it), i.e. where the model looked
  while choosing that token.
- The weight on the CLS token (and any other prefix token such as registers) is left out of the map and reported
  separately in `prefix_weights`, so `maps[i].sum() + prefix_weights[i] == 1`.
- A word is a run of sub-word tokens starting at one that begins with a space (GPT-2's byte-level "Ġ"); its map is the
  mean of its tokens' maps. The end token gets no word (it stays in `tokens`/`token_maps`).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

from ..inference.generation import generation_kwargs
from ..model.processing_vitgpt2 import ImageLike, as_rgb_image
from ..utils.io import atomic_path

__all__ = [
    "CaptionAttention",
    "REPORT_LAYERS",
    "attention_overlay",
    "build_attention_figure",
    "caption_attention_maps",
    "caption_attention_maps_batch",
    "cross_attention_layers",
    "draw_attention_maps",
    "group_tokens_into_words",
    "resolve_layers",
    "upsample_map",
]


REPORT_LAYERS = (2, 3)
# Token-string prefixes that mark the start of a word: GPT-2 byte-level BPE, SentencePiece, plain text.
WORD_START_MARKERS = ("Ġ", "▁", " ")

PANEL_INCHES = 2.4
MAX_PANEL_ASPECT = 1.5  # height / width of a panel's image area
CAPTION_LINE_INCHES = 0.17
CAPTION_WRAP_CHARS = 30
# The image is shrunk to this many pixels on its long side before drawing: a 4000 px photo in a 240 px panel only
# makes the PNG slow to write.
DISPLAY_MAX_SIDE = 480


@dataclass
class CaptionAttention:
    """The caption of one image and its cross-attention maps over the patch grid.

    image: the part of the input image the encoder saw (the processor's centre crop, at the original resolution), so
        the maps line up with it.
    caption: the generated caption, special tokens removed.
    words: the caption's words; `maps[i]` belongs to `words[i]`.
    maps: `(words, grid_h, grid_w)` attention on the patches, each word's tokens averaged.
    prefix_weights: `(words,)` attention on CLS (and other prefix tokens), left out of `maps`.
    word_spans: `(start, end)` of each word in `tokens`.
    tokens, token_ids: every generated token (the end token included, when it was generated) as text and id.
    token_maps, token_prefix_weights: the same as `maps` / `prefix_weights`, per token.
    layers: the 0-based decoder layers averaged; head: the head shown, None when heads are averaged.
    """

    image: Image.Image
    caption: str
    words: list[str]
    maps: np.ndarray
    prefix_weights: np.ndarray
    word_spans: list[tuple[int, int]]
    tokens: list[str]
    token_ids: list[int]
    token_maps: np.ndarray
    token_prefix_weights: np.ndarray
    layers: list[int]
    head: int | None


def cross_attention_layers(model) -> list[int]:
    """The 0-based decoder layers that have cross-attention (the only ones with maps)."""
    config = model.config
    return [index for index in range(config.n_layer) if config.has_cross_attention(index)]


def resolve_layers(model, layer: int | str | Sequence[int] | None) -> list[int]:
    """Checks a `layer=` argument (an index, a list of them, or "all") and returns the 0-based layers it names. None,
    the default everywhere, is `REPORT_LAYERS` where the model has them, else every layer: a model with fewer
    decoder layers (the default `train.py` job's has 3) still gets its maps."""
    available = cross_attention_layers(model)
    if layer is None:
        return list(REPORT_LAYERS) if set(REPORT_LAYERS) <= set(available) else available
    hint = (
        f"choose from the decoder layers with cross-attention {available} (0-based; the report's '3rd-4th layer' are "
        "2 and 3), a list of them, or 'all'"
    )
    if isinstance(layer, str):
        if layer != "all":
            raise ValueError(f"layer={layer!r} is not understood: {hint}")
        return available
    requested = [layer] if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) else list(layer)
    if not requested or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in requested):
        raise ValueError(f"layer={layer!r} is not a layer index or a non-empty list of them: {hint}")
    missing = [int(i) for i in requested if i not in available]
    if missing:
        raise ValueError(f"layer(s) {missing} have no cross-attention in this model: {hint}")
    return list(dict.fromkeys(int(i) for i in requested))


def _check_head(model, head: int | None) -> None:
    heads = model.config.n_head
    is_index = isinstance(head, (int, np.integer)) and not isinstance(head, bool)
    if head is not None and not (is_index and 0 <= head < heads):
        raise ValueError(f"head={head!r} does not exist: pass None to average the heads, or one of 0..{heads - 1}")


def group_tokens_into_words(tokenizer, token_ids: Sequence[int]) -> list[tuple[str, int, int]]:
    """Groups sub-word tokens into words: `(word, start, end)` with `token_ids[start:end]` spelling the word.

    A new word starts at the first token and at every token whose string begins with a space marker (GPT-2's "Ġ");
    punctuation without a leading space stays with the word before it. Words that are only whitespace are dropped.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(token_ids))
    starts = [index for index, token in enumerate(tokens) if index == 0 or token.startswith(WORD_START_MARKERS)]
    words = []
    for start, end in zip(starts, starts[1:] + [len(tokens)]):
        text = tokenizer.convert_tokens_to_string(tokens[start:end]).strip()
        if text:
            words.append((text, start, end))
    return words


def _view_of_the_encoder(image: Image.Image, image_processor) -> Image.Image:
    """The region of `image` that the processor's resize + centre crop hands to the encoder, at full resolution.

    Overlaying a map on the uncropped photo would shift it; processors that only resize (no crop) see everything.
    """
    width, height = image.size
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}

    def get(mapping, key):  # plain dicts in older processors, `SizeDict` objects in transformers 5
        return mapping.get(key) if isinstance(mapping, dict) else getattr(mapping, key, None)

    if not getattr(image_processor, "do_resize", True) or not size:
        resized_w, resized_h = width, height
    elif get(size, "shortest_edge"):
        scale = get(size, "shortest_edge") / min(width, height)
        resized_w, resized_h = width * scale, height * scale
    elif get(size, "height") and get(size, "width"):
        resized_w, resized_h = get(size, "width"), get(size, "height")
    else:
        resized_w, resized_h = width, height
    if not getattr(image_processor, "do_center_crop", False) or not (get(crop, "height") and get(crop, "width")):
        return image
    crop_w, crop_h = min(get(crop, "width"), resized_w), min(get(crop, "height"), resized_h)
    scale_x, scale_y = width / resized_w, height / resized_h
    left, top = (resized_w - crop_w) / 2 * scale_x, (resized_h - crop_h) / 2 * scale_y
    box = (round(left), round(top), round(left + crop_w * scale_x), round(top + crop_h * scale_y))
    return image.crop(box)


def _final_beam_rows(beam_indices: torch.Tensor | None, image_index: int, steps: int, num_beams: int) -> list[int]:
    """The row of `cross_attentions[step]` that produced each token of the image's returned caption.

    Beam search does not reorder the stored attentions: at step t the chosen caption came from row
    `beam_indices[image, t]` (-1 once it had finished). Greedy search keeps one row per image.
    """
    if beam_indices is None:
        return [image_index * num_beams] * steps
    rows = beam_indices[image_index].tolist()
    return [int(row) for row in rows[:steps]]


def _mean_over_spans(per_token: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Per-word values: the mean of `per_token[start:end]` for each word's span."""
    if not spans:  # an empty caption: keep the trailing shape so callers can still index and stack
        return np.zeros((0, *per_token.shape[1:]), dtype=per_token.dtype)
    return np.stack([per_token[start:end].mean(axis=0) for start, end in spans])


@torch.no_grad()
def caption_attention_maps_batch(
    model,
    processor,
    images: Sequence[ImageLike],
    layer: int | str | Sequence[int] | None = None,
    head: int | None = None,
    num_beams: int = 3,
    max_length: int | None = None,
    image_tokens: torch.Tensor | None = None,
    **generate_kwargs,
) -> list[CaptionAttention]:
    """Captions `images` together with beam search and returns each one's per-word cross-attention maps.

    layer: 0-based decoder layer(s) with cross-attention, a list of them (averaged), or "all"; default (2, 3), the
        report's "3rd-4th layer". head: a 0-based head, or None to average the heads.
    max_length: caption length limit in tokens, start token included (default: the model's generation_config).
    image_tokens: the encoder's output for these images, when the caller has it already (the demo captions the
        images first), so that the encoder does not run again.
    generate_kwargs: passed to `model.generate` (length_penalty, ...).

    The model runs with eager attention (the only implementation that returns weights) and in eval mode (attention
    dropout would blur the maps) for this call; both are restored afterwards. See the module docstring for the
    conventions (layer numbering, CLS weight, words).
    """
    layers = resolve_layers(model, layer)
    _check_head(model, head)
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("maps follow the one best caption per image: leave num_return_sequences at 1")
    rgb_images = [as_rgb_image(image, name=f"images[{index}]") for index, image in enumerate(images)]
    if not rgb_images:
        return []
    timm_model = model.encoder.model
    grid_h, grid_w = timm_model.patch_embed.grid_size
    num_prefix = timm_model.num_prefix_tokens
    positions = [cross_attention_layers(model).index(index) for index in layers]  # outputs hold only cross layers
    end_token = processor.tokenizer.eos_token_id

    settings = generation_kwargs(num_beams, max_length, **generate_kwargs)
    previous_implementation, was_training = model.config._attn_implementation, model.training
    model.set_attn_implementation("eager")
    model.eval()
    try:
        if image_tokens is None:
            pixel_values = processor(images=rgb_images, return_tensors="pt")["pixel_values"].to(model.device)
            with torch.no_grad():
                # Encoded apart from `generate`, which would ask the encoder for its attentions too (a slower path
                # whose weights the maps do not use).
                image_tokens = model.get_encoder()(pixel_values).last_hidden_state
        output = model.generate(  # a new BaseModelOutput: `generate` expands it per beam in place
            encoder_outputs=BaseModelOutput(last_hidden_state=image_tokens), output_attentions=True,
            return_dict_in_generate=True, **settings,
        )
    finally:
        model.set_attn_implementation(previous_implementation)
        model.train(was_training)

    beam_indices = getattr(output, "beam_indices", None)  # absent with greedy search
    steps = len(output.cross_attentions) if beam_indices is None else beam_indices.shape[1]
    prompt_length = output.sequences.shape[1] - steps
    results = []
    for image_index, image in enumerate(rgb_images):
        token_ids = output.sequences[image_index, prompt_length:].tolist()
        rows = _final_beam_rows(beam_indices, image_index, len(token_ids), num_beams)
        # A caption that ended early is padded (with -1 rows, and with pad tokens after its end token): cut both.
        length = next((i for i, row in enumerate(rows) if row < 0), len(rows))
        if end_token in token_ids[:length]:
            length = token_ids.index(end_token) + 1
        token_ids = token_ids[:length]

        token_weights = []
        for step, row in enumerate(rows[:length]):
            per_layer = [output.cross_attentions[step][position][row, :, -1, :] for position in positions]
            weights = torch.stack(per_layer).float()  # (layers, heads, image tokens); the last query predicts
            weights = weights.mean(dim=1) if head is None else weights[:, head]
            token_weights.append(weights.mean(dim=0))
        token_weights = torch.stack(token_weights) if token_weights else torch.zeros(0, num_prefix + grid_h * grid_w)
        token_maps = token_weights[:, num_prefix:].reshape(-1, grid_h, grid_w).cpu().numpy()
        token_prefix_weights = token_weights[:, :num_prefix].sum(dim=-1).cpu().numpy()

        captioned_ids = token_ids[:-1] if token_ids and token_ids[-1] == end_token else token_ids
        grouped = group_tokens_into_words(processor.tokenizer, captioned_ids)
        spans = [(start, end) for _, start, end in grouped]
        token_texts = processor.tokenizer.convert_ids_to_tokens(token_ids)
        results.append(
            CaptionAttention(
                image=_view_of_the_encoder(image, processor.image_processor),
                caption=processor.decode(token_ids),
                words=[word for word, _, _ in grouped],
                maps=_mean_over_spans(token_maps, spans),
                prefix_weights=_mean_over_spans(token_prefix_weights, spans),
                word_spans=spans,
                tokens=[processor.tokenizer.convert_tokens_to_string([text]) for text in token_texts],
                token_ids=token_ids,
                token_maps=token_maps,
                token_prefix_weights=token_prefix_weights,
                layers=layers,
                head=head,
            )
        )
    return results


def caption_attention_maps(
    model,
    processor,
    image: ImageLike,
    layer: int | str | Sequence[int] | None = None,
    head: int | None = None,
    num_beams: int = 3,
    max_length: int | None = None,
    **generate_kwargs,
) -> CaptionAttention:
    """Captions one image (a path, PIL image or array) and returns its per-word cross-attention maps.

    Same arguments as `caption_attention_maps_batch`, which captions several images in one `generate` call.
    """
    return caption_attention_maps_batch(
        model, processor, [image], layer=layer, head=head, num_beams=num_beams, max_length=max_length,
        **generate_kwargs,
    )[0]


def upsample_map(attention_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resizes a `(grid_h, grid_w)` map to `size = (width, height)` pixels (bilinear never overshoots
    below zero, unlike bicubic, so the colour scale keeps its meaning)."""
    width, height = size
    grid = torch.as_tensor(np.asarray(attention_map, dtype=np.float32))[None, None]
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def _display_image(result: CaptionAttention) -> Image.Image:
    display = result.image.copy()
    display.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
    return display


def attention_overlay(
    result: CaptionAttention, word: int, alpha: float = 0.5, cmap: str = "jet", display: Image.Image | None = None
) -> Image.Image:
    """One word's panel as an RGB picture: `result.maps[word]` upsampled over the image the encoder saw, coloured
    with `cmap` on its own scale (0 to the map's maximum) and blended with weight `alpha`.

    The image is shrunk to at most DISPLAY_MAX_SIDE pixels (or `display` is used as it is). This is what each
    word's panel of `build_attention_figure` shows, and what the demo page shows per word.
    """
    from matplotlib import colormaps

    if display is None:
        display = _display_image(result)
    attention = upsample_map(result.maps[word], display.size)
    colours = colormaps[cmap](attention / max(float(attention.max()), 1e-12))[..., :3]
    pixels = np.asarray(display.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1.0 - alpha) * pixels + alpha * colours
    return Image.fromarray(np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8))


def build_attention_figure(result: CaptionAttention, columns: int = 5, alpha: float = 0.5, cmap: str = "jet"):
    """A matplotlib `Figure` (Agg canvas, no pyplot state): the image titled with the caption, then one panel per word.

    Each word's map is scaled to its own maximum: weights spread over hundreds of patches are tiny, and a shared
    scale would leave most panels blank. Panels fill rows of `columns`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    display = _display_image(result)
    pixels = np.asarray(display)
    caption_lines = textwrap.wrap(result.caption, CAPTION_WRAP_CHARS) or ["(empty caption)"]
    title_inches = len(caption_lines) * CAPTION_LINE_INCHES + 0.1

    panels = 1 + len(result.words)
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    # Panels are PANEL_INCHES wide and as tall as the image's shape needs (capped, so tall images letterbox).
    image_inches = PANEL_INCHES * min(display.height / display.width, MAX_PANEL_ASPECT)
    row_inches = title_inches + image_inches
    figure = Figure(figsize=(columns * PANEL_INCHES, rows * row_inches))
    FigureCanvasAgg(figure)
    gap = 0.04 * PANEL_INCHES  # around each image, so neighbouring panels do not touch
    for panel in range(panels):
        row, column = divmod(panel, columns)
        left = (column * PANEL_INCHES + gap) / (columns * PANEL_INCHES)
        bottom = 1 - ((row + 1) * row_inches - gap) / (rows * row_inches)
        width = (PANEL_INCHES - 2 * gap) / (columns * PANEL_INCHES)
        height = (image_inches - 2 * gap) / (rows * row_inches)
        axes = figure.add_axes((left, bottom, width, height))
        axes.set_axis_off()
        if panel == 0:
            axes.imshow(pixels)
            axes.set_title("\n".join(caption_lines), fontsize=9)
            continue
        axes.imshow(attention_overlay(result, panel - 1, alpha=alpha, cmap=cmap, display=display))
        axes.set_title(result.words[panel - 1], fontsize=10)
    return figure


def draw_attention_maps(
    result: CaptionAttention,
    path: str | os.PathLike,
    columns: int = 5,
    alpha: float = 0.5,
    cmap: str = "jet",
    dpi: int = 100,
) -> Path:
    """Writes the figure of `build_attention_figure` to the PNG `path` (parent folders created) and returns the path.

    The PNG is written to a temporary file in the same folder and renamed into place, so an interrupted run never
    leaves a half-written image under the final name.
    """
    path = Path(path)
    figure = build_attention_figure(result, columns=columns, alpha=alpha, cmap=cmap)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    return path
