"""The demo page: caption an image, see where each word looked, and (with --clip_model) CLIP zero-shot.

    pip install -e ".[demo]"
    python app.py                          # the default run's model; `python train.py` makes it
    python app.py --model outputs/lora-r4 --clip_model openai/clip-vit-base-patch32 --server_port 7860

`app.py` at the top of the checkout (the Hub Space convention) only calls `main` here. `--model` takes what
`eval.py` takes: a model folder, a peft adapter folder from train.py, or a Hub id. A Hub Space runs a two-line
app.py (`python -m modeling_vitgpt2.applications.hub space MODEL --repo_id you/name` pushes it) with no arguments: there the
model is the `model/` folder pushed with it, or else the repository its README names under `models:`.

The model is loaded, and run once on a blank image, before the page is served, so the first visitor does not wait
for it. There is one model in memory and one thread that runs it: caption requests that arrive while it is busy
wait, and up to `--max_batch_size` of them are then captioned together, in one `generate` call per group of equal
settings (a batch of 8 costs far less than 8 batches of 1 on a CPU; `--max_batch_size 1` runs them one at a time).
Closing the page (`page.close()`, `gradio.close_all()`) ends that thread and lets go of the model, so a notebook or
test that builds the page again does not keep one model per build.
Every setting that reaches the server is checked against the page's own bounds, so an API caller gets the page's
limits and a message, not a crash or a 1,024-beam search.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
import torch
from gradio.utils import get_upload_folder
from PIL import Image, ImageOps
from transformers.modeling_outputs import BaseModelOutput

from ..evaluation.attention_maps import (
    attention_overlay,
    caption_attention_maps_batch,
    cross_attention_layers,
    resolve_layers,
)
from ..evaluation.clip_score import load_clip
from ..evaluation.jobs import load_captioner
from ..evaluation.zero_shot import ENSEMBLE, class_probabilities
from ..inference.generation import generation_kwargs
from ..inference.loading import QUANTIZATION_CHOICES
from ..model.processing_vitgpt2 import IMAGE_EXTENSIONS, ImageLoadError, ImageTooLargeError, load_image
from ..utils.errors import UserError, run_command
from ..utils.io import atomic_path
from .hub.space import SPACE_MODEL_FOLDER

__all__ = [
    "ALL_LAYERS",
    "BatchedDemo",
    "BEAM_BOUNDS",
    "build_page",
    "CACHE_CLEANUP",
    "CaptionBatcher",
    "CaptionSettings",
    "DEFAULT_EXAMPLE_FOLDERS",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_MODEL",
    "DEFAULT_TEMPLATES",
    "Demo",
    "DemoPage",
    "find_examples",
    "held_by_gradio",
    "LENGTH_PENALTY_BOUNDS",
    "load_demo",
    "main",
    "MAX_EXAMPLES",
    "MEAN_OF_HEADS",
    "PANEL_LIFETIME_S",
    "parse_args",
    "private_copies",
    "space_model",
    "SPACE_README",
]


DEFAULT_MODEL = "outputs/synthetic-default"
SPACE_README = "README.md"  # in the working folder, where a Space runs app.py
# The default run's validation images (python train.py writes them), and a Space's own examples/ folder.
DEFAULT_EXAMPLE_FOLDERS = ("examples", "outputs/synthetic-shapes/val")
MAX_EXAMPLES = 8
ALL_LAYERS = "all"
MEAN_OF_HEADS = "mean"
DEFAULT_TEMPLATES = "This is a photo of {object}.\nThis is not a photo of {object}."
# The page's sliders and the server's checks both read these (the new-token bound is the model's own).
BEAM_BOUNDS = (1, 8)
LENGTH_PENALTY_BOUNDS = (-2.0, 2.0)
DEFAULT_MAX_BATCH_SIZE = 8
# Disk use of a page that runs for months: Gradio refuses uploads over DEFAULT_MAX_FILE_SIZE (--max_file_size), and
# deletes its copies of uploads and panels every CACHE_CLEANUP[0] seconds once older than CACHE_CLEANUP[1] (a
# visitor's image older than that must be uploaded again); the Demo deletes its own panel files PANEL_LIFETIME_S
# after their last use, by which time Gradio has long copied them into its cache.
DEFAULT_MAX_FILE_SIZE = "20MB"
CACHE_CLEANUP = (600, 3600)
PANEL_LIFETIME_S = 600.0


@dataclass(frozen=True)
class CaptionSettings:
    """One request's checked settings; requests with equal settings can share one `generate` call."""

    num_beams: int
    max_new_tokens: int
    length_penalty: float
    layers: tuple[int, ...] | str  # ALL_LAYERS, or 0-based decoder layers
    head: int | None  # None: the mean of the heads

    def generation(self) -> dict:
        return generation_kwargs(num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                                 length_penalty=self.length_penalty)


def _bounded_number(value, label: str, bounds: tuple, whole: bool):
    """`value` as the page's slider `label` would give it, or a `gradio.Error` naming the slider and its bounds."""
    low, high = bounds
    kind = "a whole number" if whole else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and low <= number <= high) or (whole and not number.is_integer()):
        raise gr.Error(f"{label} must be {kind} from {low} to {high}, as on the page; got {value!r}.")
    return int(number) if whole else number


def space_model(folder: Path = Path(".")) -> str | None:
    """The model of a Hub Space (None outside one): the `model/` folder pushed with it, else the model repository
    its README names under `models:`."""
    from huggingface_hub import metadata_load

    readme = folder / SPACE_README
    metadata = metadata_load(readme) if readme.is_file() else None
    if not metadata or metadata.get("sdk") != "gradio":
        return None
    bundled = folder / SPACE_MODEL_FOLDER
    if bundled.is_dir():
        return str(bundled)
    return metadata["models"][0] if metadata.get("models") else None


def parse_args(argv: list[str] | None = None, prog: str = "app.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"model folder, peft adapter folder from train.py, or Hub id (default: {DEFAULT_MODEL}, "
                             "or in a Hub Space the model its README names)")
    parser.add_argument("--quantize", choices=QUANTIZATION_CHOICES, default=None,
                        help="int8 inference on the CPU: shorter waits, captions may differ slightly from float32; "
                             "int8-compiled also compiles the vision encoder (shorter still; tens of seconds at "
                             "start, needs torchao and a C++ compiler)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="bfloat16: faster on CPUs with bfloat16 instructions (avx512_bf16 or AMX; refused "
                             "elsewhere); captions may differ slightly from float32 (default: float32)")
    parser.add_argument("--clip_model", default=None,
                        help="CLIP Hub id or folder; enables the zero-shot tab (e.g. openai/clip-vit-base-patch32)")
    parser.add_argument("--examples", nargs="+", default=None,
                        help=f"example image files or folders (default: the first {MAX_EXAMPLES} images of "
                             f"{' or '.join(DEFAULT_EXAMPLE_FOLDERS)})")
    parser.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="caption up to this many waiting requests together, in one generate call per group of "
                             f"equal settings (default: {DEFAULT_MAX_BATCH_SIZE}; 1: one at a time, which with "
                             "--quantize keeps each caption independent of other requests)")
    parser.add_argument("--max_file_size", type=_file_size, default=DEFAULT_MAX_FILE_SIZE,
                        help="largest upload accepted, a whole number and a unit (b, kb, mb or gb) "
                             f"(default: {DEFAULT_MAX_FILE_SIZE})")
    parser.add_argument("--server_name", default=None, help="address to listen on (Gradio's default: 127.0.0.1; "
                                                            "0.0.0.0 serves the local network)")
    parser.add_argument("--server_port", type=int, default=None, help="port (Gradio's default: 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max_batch_size must be at least 1 (1 captions one request at a time); got {args.max_batch_size}")
    if args.server_port is not None and not 1 <= args.server_port <= 65535:  # else an OverflowError at launch
        parser.error(f"--server_port must be from 1 to 65535 (leave it out for Gradio's default); got {args.server_port}")
    return args


def _file_size(text: str) -> str:
    """`--max_file_size` as Gradio's launch takes it (checked here, so that a typo is one line, not a traceback)."""
    if not re.fullmatch(r"\d+ *(b|kb|mb|gb)", text.strip(), flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"give a whole number and a unit (b, kb, mb or gb), e.g. 20MB; got {text!r}")
    return text.strip()


def find_examples(sources: list[str] | None) -> list[str]:
    """Example image paths: the given files and folders' images, else the first default folder that exists."""
    if sources is None:
        sources = [next((folder for folder in DEFAULT_EXAMPLE_FOLDERS if Path(folder).is_dir()), None)]
        sources = [source for source in sources if source]
    examples = []
    for source in map(Path, sources):
        if source.is_dir():
            examples += sorted(path for path in source.iterdir()
                               if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
        elif source.is_file():
            examples.append(source)
        else:
            raise FileNotFoundError(f"--examples {source}: no such file or folder")
    return [str(path) for path in examples[:MAX_EXAMPLES]]


class Demo:
    """What the page does, without the page: caption one uploaded image, its attention panels, zero-shot."""

    def __init__(self, model, processor, clip=None, panel_lifetime_s: float = PANEL_LIFETIME_S):
        self.model, self.processor, self.clip = model, processor, clip
        self.panel_lifetime_s = panel_lifetime_s
        self.layers = cross_attention_layers(model)
        self.heads = model.config.n_head
        patch = model.encoder.model.patch_embed.patch_size
        # An image smaller than one patch has nothing for the encoder to see: upscaling it would invent the caption.
        self.min_side = max(patch) if isinstance(patch, (tuple, list)) else int(patch)
        # Panels reach the page as files named by their content, each written whole before it is named (removed with
        # the Demo). Handed PIL images, Gradio saves each into its cache by rewriting the file of that content in
        # place, so two visitors captioning the same image at once could have one panel served cut short (h11:
        # "Too little data for declared Content-Length"); a file it copies into its cache atomically.
        self.panel_folder = tempfile.TemporaryDirectory(prefix="vitgpt2-panels-")

    @property
    def longest_caption(self) -> int:
        """New tokens the decoder has positions for (the start token takes one)."""
        return self.model.config.n_positions - 1

    @property
    def default_new_tokens(self) -> int:
        """The model's own caption length limit (generation_config.json), in new tokens; else transformers' 20."""
        generation = self.model.generation_config
        limit = generation.max_new_tokens or (generation.max_length - 1 if generation.max_length else 20)
        return min(limit, self.longest_caption)

    @property
    def default_layers(self) -> list[str]:
        return [str(layer) for layer in resolve_layers(self.model, None)]

    def load_upload(self, upload):
        """The uploaded image as RGB, or a `gradio.Error` the page shows (not an image, a bomb, too small)."""
        path = upload.get("path") if isinstance(upload, dict) else upload
        if not path:
            raise gr.Error("Upload an image first (drop it on the image box, paste it, or pick an example).")
        name = (upload.get("orig_name") if isinstance(upload, dict) else None) or Path(path).name
        try:
            image = load_image(path)
        except ImageTooLargeError as error:
            # The visitor cannot change the server's limit: say what to upload instead.
            raise gr.Error(f"{name} is too large to decode safely: it is {error.figure()}, more than this page's "
                           f"limit of {error.limit:,}. Upload a smaller image.") from None
        except ImageLoadError as error:
            # The reason without the server's temporary path, which means nothing to the visitor.
            reason = str(error.__cause__ or error).replace(str(path), name)
            raise gr.Error(f"{name} is not an image this page can read: {reason}") from None
        image = _upright(image)
        if min(image.size) < self.min_side:
            raise gr.Error(
                f"The image is {image.width}x{image.height} pixels; the model needs at least {self.min_side} pixels "
                f"on each side (one {self.min_side}-pixel patch). Upload a larger image."
            )
        return image

    @property
    def new_token_bounds(self) -> tuple[int, int]:
        return 1, self.longest_caption

    def check_settings(self, num_beams, max_new_tokens, length_penalty, layers, head) -> CaptionSettings:
        """The page's settings as they reach the server, checked against the page's own bounds: an API caller can
        send anything, and 0 beams, 1,024 beams or a layer the model lacks must get a message, not run or crash."""
        if layers is None or isinstance(layers, (str, int)):
            layers = [] if layers in (None, "") else [layers]
        choices = {str(layer): layer for layer in self.layers}
        unknown = [value for value in layers if str(value) != ALL_LAYERS and str(value) not in choices]
        if unknown:
            raise gr.Error(f"Decoder layers {unknown} have no cross-attention in this model: choose from "
                           f"{self.layers} or {ALL_LAYERS!r}.")
        chosen = ALL_LAYERS if not layers or ALL_LAYERS in map(str, layers) else tuple(
            dict.fromkeys(choices[str(value)] for value in layers))
        if head in (None, "", MEAN_OF_HEADS):
            head = None
        elif str(head) not in {str(index) for index in range(self.heads)}:
            raise gr.Error(f"Attention head {head!r} does not exist: choose {MEAN_OF_HEADS!r} or one of "
                           f"0..{self.heads - 1}.")
        else:
            head = int(head)
        return CaptionSettings(
            num_beams=_bounded_number(num_beams, "Beams", BEAM_BOUNDS, whole=True),
            max_new_tokens=_bounded_number(max_new_tokens, "Maximum new tokens", self.new_token_bounds, whole=True),
            length_penalty=_bounded_number(length_penalty, "Length penalty", LENGTH_PENALTY_BOUNDS, whole=False),
            layers=chosen, head=head,
        )

    def caption(self, upload, num_beams, max_new_tokens, length_penalty, layers, head):
        """(caption, every beam with its score, one attention panel per word, a note) for the page."""
        settings = self.check_settings(num_beams, max_new_tokens, length_penalty, layers, head)
        return self.caption_images([self.load_upload(upload)], settings)[0]

    def caption_images(self, images: list[Image.Image], settings: CaptionSettings) -> list[tuple]:
        """`caption`'s answers for several images with the same settings, from one `generate` call (and one more
        with eager attention for the maps). Every image the processor resizes to the same pixel tensor, so an
        image's caption does not depend on the images batched with it."""
        generation = settings.generation()
        beams_per_image = settings.num_beams
        self.prune_panels()
        pixel_values = self.processor(images=images)["pixel_values"].to(self.model.device)
        with torch.no_grad():
            # Encoded once for both `generate` calls (the maps' call would run the encoder again).
            image_tokens = self.model.get_encoder()(pixel_values).last_hidden_state
            output = self.model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=image_tokens),
                num_return_sequences=beams_per_image, output_scores=True, return_dict_in_generate=True, **generation,
            )
        texts = self.processor.batch_decode(output.sequences)
        if beams_per_image > 1:
            scores = output.sequences_scores.tolist()
        else:  # greedy search: the caption's log-probability, up to and including its end token
            steps = self.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
            written = output.sequences[:, -steps.shape[1]:]
            ended = written == self.processor.tokenizer.eos_token_id
            after_the_end = (ended.cumsum(dim=1) - ended.int()) > 0  # a finished caption's padding
            steps = steps.masked_fill(after_the_end | ~torch.isfinite(steps), 0.0)
            scores = steps.sum(dim=1).tolist()

        layer = ALL_LAYERS if settings.layers == ALL_LAYERS else list(settings.layers)
        maps = caption_attention_maps_batch(self.model, self.processor, images, layer=layer, head=settings.head,
                                            image_tokens=image_tokens, **generation)
        answers = []
        for index, result in enumerate(maps):
            rows = range(index * beams_per_image, (index + 1) * beams_per_image)
            beams = [[rank + 1, texts[row], round(scores[row], 4)] for rank, row in enumerate(rows)]
            panels = [(self.panel_file(attention_overlay(result, word)), text)
                      for word, text in enumerate(result.words)]
            note = ""
            if result.caption != beams[0][1]:
                # The maps need eager attention, whose rounding can, rarely, tip a beam the other way.
                note = f"The maps follow the caption the model wrote with eager attention: \"{result.caption}\"."
            answers.append((beams[0][1], beams, panels, note))
        return answers

    def panel_file(self, picture: Image.Image) -> str:
        """`picture` as a PNG file in the Demo's panel folder, named by its content."""
        encoded = io.BytesIO()
        picture.save(encoded, format="PNG")
        path = Path(self.panel_folder.name) / f"{hashlib.sha256(encoded.getvalue()).hexdigest()}.png"
        if path.exists():
            os.utime(path)  # used again: `prune_panels` counts its age from now
        else:
            with atomic_path(path) as temporary:
                temporary.write_bytes(encoded.getvalue())
        return str(path)

    def prune_panels(self) -> None:
        """Deletes the panel files unused for `panel_lifetime_s` seconds: Gradio copies each into its own cache as
        soon as the answer leaves `caption_images`, so only a file used in the last moments can still be needed.
        Called by `caption_images`, which runs in one thread at a time (the page's model thread), so no panel is
        deleted between being written or reused and being handed to Gradio."""
        oldest = time.time() - self.panel_lifetime_s
        for path in Path(self.panel_folder.name).iterdir():
            try:
                if path.stat().st_mtime <= oldest:
                    path.unlink()
            except FileNotFoundError:
                pass

    def caption_requests(self, requests: Sequence[tuple[Image.Image, CaptionSettings]]) -> list:
        """Each request's answer, or the exception that stopped it: one `caption_images` call per group of requests
        with equal settings, so a group that fails does not take the others with it."""
        groups: dict[CaptionSettings, list[int]] = {}
        for index, (_, settings) in enumerate(requests):
            groups.setdefault(settings, []).append(index)
        answers: list = [None] * len(requests)
        for settings, indices in groups.items():
            try:
                group_answers = self.caption_images([requests[index][0] for index in indices], settings)
            except Exception as error:  # handed to each caller of the group, as its own call would have raised it
                group_answers = [error] * len(indices)
            for index, answer in zip(indices, group_answers):
                answers[index] = answer
        return answers

    def refresh(self, upload, *settings):
        """`caption` for the page's own events: a removed image empties the outputs instead of being an error."""
        if not upload:
            return "", [], [], ""
        return self.caption(upload, *settings)

    def zero_shot(self, upload, class_names: str, templates: str):
        """CLIP's probability per class and template, as rows of a bar chart."""
        if self.clip is None:
            raise gr.Error("Zero-shot needs CLIP: start the page with --clip_model.")
        image = self.load_upload(upload)
        names = [name.strip() for name in class_names.replace("\n", ",").split(",") if name.strip()]
        prompts = [line.strip() for line in templates.splitlines() if line.strip()]
        if len(names) < 2:
            raise gr.Error("Give at least two class names, separated by commas.")
        try:
            probabilities = class_probabilities([image], names, prompts, clip=self.clip, ensemble=len(prompts) > 1,
                                                progress=False)
        except (TypeError, ValueError) as error:  # templates without {object}, repeated templates or class names
            raise gr.Error(str(error)) from None
        rows = [
            {"prompt": name if template == ENSEMBLE else template.replace("{object}", name),
             "template": "ensemble of the templates" if template == ENSEMBLE else template,
             "probability": float(value)}
            for template, values in probabilities.items()
            for name, value in zip(names, values[0].tolist())
        ]
        return pd.DataFrame(rows)

    def warm_up(self) -> None:
        """One caption of a blank image, so the first visitor's request does not pay for lazy initialisation."""
        side = max(self.model.encoder.model.patch_embed.img_size)
        with tempfile.TemporaryDirectory() as folder:
            blank = Path(folder) / "blank.png"
            Image.new("RGB", (side, side), "white").save(blank)
            self.caption({"path": str(blank)}, 1, 2, 1.0, [ALL_LAYERS], MEAN_OF_HEADS)


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says, as a viewer (and the page's image box) shows it: phones store
    portrait photos sideways with an orientation tag. Only here, not in the shared loader, so that training and
    evaluation read images as they always have. A broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # Pillow's EXIF parser raises many kinds of errors on corrupt tags
        return image


def _closed_page_error() -> gr.Error:
    return gr.Error("The captioner has stopped: this page was closed, and a closed page lets go of its model. "
                    "Build a new page (build_page) to caption again.")


class CaptionBatcher:
    """The one thread that runs the captioner. Callers (Gradio's workers, up to `max_batch_size` at once) check
    and decode their own request, then wait here; whatever is waiting when the thread is free, up to
    `max_batch_size` requests, becomes its next batch.

    This, rather than Gradio's batched events (`batch=True`), because Gradio fails every request of a batch when
    its function raises: one visitor's unreadable upload or out-of-range setting would fail the others' captions
    with that visitor's message. Here each request is checked alone, and each caller gets its own answer or error.

    `close()` ends the thread. Only the thread holds `run_batch` (and through it the model), so once it has ended
    the batcher holds no model: a closed page's batcher, which Gradio or FastAPI may keep referenced, keeps none.
    """

    def __init__(self, run_batch: Callable[[list], list], max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        # Held while checking `closed` and while queueing, so that no request is queued after the close sentinel:
        # one queued behind it would never be answered.
        self._closing = threading.Lock()
        self.thread = threading.Thread(target=self._serve, args=(run_batch,), name="caption-batches", daemon=True)
        self.thread.start()

    def __call__(self, request):
        answer: Future = Future()
        with self._closing:
            if self.closed:
                raise _closed_page_error()
            self.waiting.put((request, answer))
        return answer.result()

    def close(self) -> None:
        """Ends the thread without waiting for it (`self.thread.join()` waits): the batch it is running finishes
        and answers its callers; requests still waiting, and any that come later, get an error at once. Closing
        twice is harmless."""
        with self._closing:
            if self.closed:
                return
            self.closed = True
            # Taken before the sentinel is queued: taking the sentinel too would leave the thread waiting forever.
            waiting = self._take_waiting()
            self.waiting.put(_CLOSE)  # wakes the thread if it is waiting for requests
        _refuse(waiting)

    def _take_waiting(self) -> list:
        taken = []
        while True:
            try:
                taken.append(self.waiting.get_nowait())
            except queue.Empty:
                return taken

    def _serve(self, run_batch: Callable[[list], list]) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            # Requests taken after `close` began (`close` refuses the rest) get the error too: none runs.
            if self.closed:
                break
            self._answer(run_batch, batch)
        _refuse(batch + self._take_waiting())

    @staticmethod
    def _answer(run_batch: Callable[[list], list], batch: list) -> None:
        try:
            results = run_batch([request for request, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the captioner gave {len(results)} answers to {len(batch)} requests")
        # A bug in the batch's bookkeeping, or anything that would end this thread (then every later caller
        # would wait forever): every caller of the batch hears of it, and the thread serves on.
        except BaseException as error:
            if not isinstance(error, Exception):  # a SystemExit must not end the caller's thread either
                error = RuntimeError(f"the captioner stopped ({type(error).__name__}: {error})")
            results = [error] * len(batch)
        for (_, answer), result in zip(batch, results):
            if isinstance(result, Exception):
                answer.set_exception(result)
            else:
                answer.set_result(result)


_CLOSE = object()  # queued by `CaptionBatcher.close`: no request, only a wake-up for its thread


def _refuse(waiting: list) -> None:
    """Answers each of a closed `CaptionBatcher`'s waiting requests with the closed page's error."""
    for item in waiting:
        if item is not _CLOSE:
            item[1].set_exception(_closed_page_error())


NOT_UPLOADED = ("This page captions only images uploaded to it and its examples. Upload the image (drop it on the "
                "image box or paste it), or pick an example.")


def held_by_gradio(upload):
    """`upload`, if its file is one Gradio holds (the visitor's uploads and the examples, which Gradio copies into
    its upload folder when the page is built); else a `gradio.Error`, the same whether the file exists or not.

    The page's events take their inputs unprocessed (`preprocess=False`), and Gradio checks that a file was
    uploaded only for file dicts carrying its `meta` field: without this check, an API caller sending
    {"path": "/any/file.png"} would have any image on the server captioned and drawn back as attention panels."""
    path = upload.get("path") if isinstance(upload, dict) else upload
    if not path:
        return upload  # nothing to read: `Demo.load_upload` asks for an image
    try:
        # Links and `..` resolved first (without asking whether the file exists): what is read is what is checked.
        real = Path(os.path.realpath(path))
    except (TypeError, ValueError):  # not a path, or one with a NUL byte
        raise gr.Error(NOT_UPLOADED) from None
    if not real.is_relative_to(os.path.realpath(get_upload_folder())):
        raise gr.Error(NOT_UPLOADED)
    return upload


class BatchedDemo:
    """The page's events, answered by `demo` (captions through a `CaptionBatcher`). The page reaches `demo` only
    through this object, so that `close()` can let go of it: Gradio's Blocks outlives its close (FastAPI's
    callable caches keep the page's routes, and through them the Blocks, referenced), and a closed page must not
    keep a model in memory for the life of the process."""

    def __init__(self, demo: Demo, max_batch_size: int):
        self.demo: Demo | None = demo
        self.max_batch_size = max_batch_size
        self.batcher = CaptionBatcher(demo.caption_requests, max_batch_size)

    def close(self) -> None:
        """Stops the batcher (the batch it is running still answers its callers) and lets go of the demo; every
        later event gets an error."""
        self.batcher.close()
        self.demo = None

    def _open_demo(self) -> Demo:
        demo = self.demo
        if demo is None:
            raise _closed_page_error()
        return demo

    def caption(self, upload, num_beams, max_new_tokens, length_penalty, layers, head):
        demo = self._open_demo()
        settings = demo.check_settings(num_beams, max_new_tokens, length_penalty, layers, head)
        return self.batcher((demo.load_upload(held_by_gradio(upload)), settings))

    def refresh(self, upload, *settings):
        if not upload:
            return "", [], [], ""
        return self.caption(upload, *settings)

    def zero_shot(self, upload, class_names: str, templates: str):
        return self._open_demo().zero_shot(held_by_gradio(upload), class_names, templates)


class DemoPage(gr.Blocks):
    """The page `build_page` returns: a `gradio.Blocks` whose `close()` (what users, notebooks, tests and
    `gradio.close_all()` call) also stops its captioner thread and lets go of its model. Gradio has no hook for its
    close; without this the thread, and the model it holds, outlive the page: one model per page built in the
    process. A closed page is not launched again (Gradio would allow it): it has no model left to serve."""

    def __init__(self, captioner: BatchedDemo, **blocks_kwargs):
        super().__init__(**blocks_kwargs)
        self.captioner = captioner

    def launch(self, *args, **kwargs):
        if self.captioner.demo is None:
            raise UserError("this demo page was closed, which let go of its model: build a new page with "
                            "build_page(demo, examples, title) to serve it again")
        return super().launch(*args, **kwargs)

    def close(self, verbose: bool = True) -> None:
        # Gradio's own close returns at once for a page that is not running: the captioner is closed regardless.
        try:
            super().close(verbose)
        finally:
            self.captioner.close()


def build_page(demo: Demo, examples: list[str], title: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
    """The Gradio page. Inputs reach `Demo` unprocessed (`preprocess=False`), so a bad upload becomes this
    project's message on the page instead of a decoding failure inside Gradio; Gradio's check that a file was
    uploaded is then partly skipped, so every image path is checked here (`held_by_gradio`). Caption requests are
    batched (`BatchedDemo`): up to `max_batch_size` of them wait in the captioner's queue at once. Close the returned
    `DemoPage` (`close()`) when done with it: that ends the captioner's thread and lets go of `demo`."""
    captioner = BatchedDemo(demo, max_batch_size)
    layer_choices = [ALL_LAYERS] + [str(layer) for layer in demo.layers]
    head_choices = [MEAN_OF_HEADS] + [str(head) for head in range(demo.heads)]
    with DemoPage(captioner, title=title, delete_cache=CACHE_CLEANUP) as page:
        gr.Markdown(f"# {title}\nUpload an image: the model captions it, and every word of the caption shows where "
                    "in the image its cross-attention looked while writing it. Click a panel to see it large.")
        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Image", sources=["upload", "clipboard"], elem_id="caption-image")
                    if examples:
                        gr.Examples(examples=examples, inputs=image, label="Examples")
                    with gr.Accordion("Generation", open=False):
                        num_beams = gr.Slider(*BEAM_BOUNDS, value=3, step=1, label="Beams")
                        max_new_tokens = gr.Slider(*demo.new_token_bounds, value=demo.default_new_tokens, step=1,
                                                   label="Maximum new tokens")
                        length_penalty = gr.Slider(*LENGTH_PENALTY_BOUNDS, value=1.0, step=0.1, label="Length penalty",
                                                   info="above 0 favours longer captions, below 0 shorter ones")
                    run = gr.Button("Caption", variant="primary")
                with gr.Column(scale=2):
                    caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption-text")
                    beams = gr.Dataframe(headers=["beam", "caption", "score"], label="Beams (score: length-"
                                         "penalised log-probability, as beam search ranks them)", interactive=False,
                                         wrap=True, column_widths=["10%", "75%", "15%"])
                    with gr.Row():
                        layers = gr.Dropdown(layer_choices, value=demo.default_layers, multiselect=True,
                                             label="Decoder layers (0-based, averaged)")
                        head = gr.Dropdown(head_choices, value=MEAN_OF_HEADS, label="Attention head")
                    panels = gr.Gallery(label="Where each word looked", columns=6, object_fit="contain",
                                        height="auto", format="png", elem_id="attention-panels")
                    note = gr.Markdown()
            inputs = [image, num_beams, max_new_tokens, length_penalty, layers, head]
            outputs = [caption, beams, panels, note]
            # The page's and the API's caption events share one limit: as many waiting requests as one batch holds.
            run.click(captioner.caption, inputs, outputs, preprocess=False, api_name="caption",
                      concurrency_limit=max_batch_size, concurrency_id="caption")
            for trigger in (image.change, layers.input, head.input):
                trigger(captioner.refresh, inputs, outputs, preprocess=False, api_visibility="private",
                        trigger_mode="always_last", concurrency_limit=max_batch_size, concurrency_id="caption")
        if demo.clip is not None:
            with gr.Tab("Zero-shot (CLIP)"):
                with gr.Row():
                    with gr.Column():
                        zs_image = gr.Image(label="Image", sources=["upload", "clipboard"])
                        if examples:
                            gr.Examples(examples=examples, inputs=zs_image, label="Examples")
                        class_names = gr.Textbox(label="Class names (comma-separated)", value="dog, cat, diagram")
                        templates = gr.Textbox(label="Prompt templates (one per line, each with {object})",
                                               value=DEFAULT_TEMPLATES, lines=3)
                        classify = gr.Button("Classify", variant="primary")
                    plot = gr.BarPlot(x="prompt", y="probability", color="template", y_lim=[0, 1],
                                      label="CLIP's probabilities (each template's bars sum to 1)",
                                      x_label_angle=-30, sort=None)
                classify.click(captioner.zero_shot, [zs_image, class_names, templates], plot, preprocess=False,
                               api_name="zero_shot")
    return page


def load_demo(args) -> Demo:
    """Loads the captioner (and CLIP); a missing or unloadable model raises a user error saying what to do."""
    model_name = args.model or space_model() or DEFAULT_MODEL
    if model_name == DEFAULT_MODEL and not Path(model_name).is_dir():
        raise FileNotFoundError(f"no model at {DEFAULT_MODEL}: make it with `python train.py` (a few minutes on 2 CPU "
                                "cores), or pass --model a model folder, adapter folder or Hub id")
    try:
        model, processor = load_captioner(model_name, quantize=args.quantize, dtype=args.dtype)
        clip = None
        if args.clip_model:
            clip = load_clip(args.clip_model, device=model.device)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load {model_name}: {error}") from error
    print(f"[app] loaded {model_name}" + (f" and CLIP {args.clip_model}" if clip else ""), flush=True)
    return Demo(model, processor, clip)


def main(argv: list[str] | None = None, prog: str = "app.py") -> int:
    args = parse_args(argv, prog)
    return run_command(prog, lambda: serve(args))


def private_copies(examples: list[str], folder: Path) -> list[str]:
    """Copies of the example images in `folder`, each in a subfolder of its own (two examples may share a name).

    The page serves `folder` and nothing else: allowing the examples' own folders would serve every file beside
    them (a home folder's keys, `.env` files) to anyone who asks for it by path."""
    copies = []
    for index, example in enumerate(examples):
        copy = folder / str(index) / Path(example).name
        copy.parent.mkdir()
        shutil.copyfile(example, copy)
        copies.append(str(copy))
    return copies


def batching_notice(args: argparse.Namespace) -> str | None:
    """What a server operator should know before batching int8 requests, or None."""
    if args.quantize is None or args.max_batch_size == 1:
        return None
    return (f"[app] note: with --quantize {args.quantize}, int8 activations are quantized with one scale per batch, "
            "so a request captioned together with others can get a different caption than alone; --max_batch_size 1 "
            "makes every caption independent of other visitors' requests")


def serve(args: argparse.Namespace) -> None:
    examples = find_examples(args.examples)
    demo = load_demo(args)
    notice = batching_notice(args)
    if notice:
        print(notice, flush=True)
    demo.warm_up()
    with tempfile.TemporaryDirectory(prefix="vitgpt2-examples-") as served:
        page = build_page(demo, private_copies(examples, Path(served)),
                          title="ViT-GPT2 captioner: where each word looked", max_batch_size=args.max_batch_size)
        page.queue(default_concurrency_limit=1)  # zero-shot: one CLIP in memory, requests wait their turn
        page.launch(server_name=args.server_name, server_port=args.server_port, share=args.share,
                    allowed_paths=[served] if examples else [], max_file_size=args.max_file_size)
