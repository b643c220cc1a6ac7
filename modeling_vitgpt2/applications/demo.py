"""The demo page: caption an image, see where each word looked, and (with --clip_model) CLIP zero-shot.

    pip install -e ".[demo]"
    python app.py                          # the default run's model; `python train.py` makes it
    python app.py --model outputs/lora-r4 --clip_model openai/clip-vit-base-patch32 --server_port 7860

`app.py` at the top of the checkout (the Hub Space convention) only calls `main` here. `--model` takes what
`eval.py` takes: a model folder, a peft adapter folder from train.py, or a Hub id. A Hub Space runs a two-line
app.py (`python -m modeling_vitgpt2.applications.hub space MODEL --repo_id you/name` pushes it) with no arguments: there the
model is the `model/` folder pushed with it, or else the repository its README names under `models:`.

The model is loaded, and run once on a blank image, before the page is served, so the first visitor does not wait
for it; requests queue and run one at a time, on the one model in memory.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd
import torch
from PIL import Image

from ..evaluation.attention_maps import REPORT_LAYERS, attention_overlay, caption_attention_maps, cross_attention_layers
from ..evaluation.clip_score import load_clip
from ..evaluation.jobs import load_captioner
from ..evaluation.zero_shot import ENSEMBLE, IMAGE_EXTENSIONS, class_probabilities
from ..inference.generation import generation_kwargs
from ..model.processing_vitgpt2 import ImageLoadError, ImageTooLargeError, load_image
from ..utils.errors import run_command
from .hub.space import SPACE_MODEL_FOLDER

__all__ = [
    "ALL_LAYERS",
    "build_page",
    "DEFAULT_EXAMPLE_FOLDERS",
    "DEFAULT_MODEL",
    "DEFAULT_TEMPLATES",
    "Demo",
    "find_examples",
    "load_demo",
    "main",
    "MAX_EXAMPLES",
    "MEAN_OF_HEADS",
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
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 inference on the CPU: shorter waits, captions may differ slightly from float32")
    parser.add_argument("--clip_model", default=None,
                        help="CLIP Hub id or folder; enables the zero-shot tab (e.g. openai/clip-vit-base-patch32)")
    parser.add_argument("--examples", nargs="+", default=None,
                        help=f"example image files or folders (default: the first {MAX_EXAMPLES} images of "
                             f"{' or '.join(DEFAULT_EXAMPLE_FOLDERS)})")
    parser.add_argument("--server_name", default=None, help="address to listen on (Gradio's default: 127.0.0.1; "
                                                            "0.0.0.0 serves the local network)")
    parser.add_argument("--server_port", type=int, default=None, help="port (Gradio's default: 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    return parser.parse_args(argv)


def find_examples(sources: list[str] | None) -> list[str]:
    """Example image paths: the given files and folders' images, else the first default folder that exists."""
    if sources is None:
        sources = [next((folder for folder in DEFAULT_EXAMPLE_FOLDERS if Path(folder).is_dir()), None)]
        sources = [source for source in sources if source]
    examples = []
    for source in map(Path, sources):
        if source.is_dir():
            examples += sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
        elif source.is_file():
            examples.append(source)
        else:
            raise FileNotFoundError(f"--examples {source}: no such file or folder")
    return [str(path) for path in examples[:MAX_EXAMPLES]]


class Demo:
    """What the page does, without the page: caption one uploaded image, its attention panels, zero-shot."""

    def __init__(self, model, processor, clip=None):
        self.model, self.processor, self.clip = model, processor, clip
        self.layers = cross_attention_layers(model)
        self.heads = model.config.n_head
        patch = model.encoder.model.patch_embed.patch_size
        # An image smaller than one patch has nothing for the encoder to see: upscaling it would invent the caption.
        self.min_side = max(patch) if isinstance(patch, (tuple, list)) else int(patch)

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
        chosen = REPORT_LAYERS if set(REPORT_LAYERS) <= set(self.layers) else self.layers
        return [str(layer) for layer in chosen]

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
        if min(image.size) < self.min_side:
            raise gr.Error(
                f"The image is {image.width}x{image.height} pixels; the model needs at least {self.min_side} pixels "
                f"on each side (one {self.min_side}-pixel patch). Upload a larger image."
            )
        return image

    def caption(self, upload, num_beams, max_new_tokens, length_penalty, layers, head):
        """(caption, every beam with its score, one attention panel per word, a note) for the page."""
        image = self.load_upload(upload)
        settings = generation_kwargs(num_beams=int(num_beams), max_new_tokens=int(max_new_tokens),
                                     length_penalty=float(length_penalty))
        with torch.no_grad():
            output = self.model.generate(
                **self.processor(images=[image]).to(self.model.device), num_return_sequences=settings["num_beams"],
                output_scores=True, return_dict_in_generate=True, **settings,
            )
        captions = self.processor.batch_decode(output.sequences)
        if settings["num_beams"] > 1:
            scores = output.sequences_scores.tolist()
        else:  # greedy search: the caption's log-probability
            steps = self.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
            scores = [float(steps[0][torch.isfinite(steps[0])].sum())]
        beams = [[rank + 1, text, round(score, 4)] for rank, (text, score) in enumerate(zip(captions, scores))]

        layer = ALL_LAYERS if not layers or ALL_LAYERS in layers else [int(value) for value in layers]
        head = None if head in (None, "", MEAN_OF_HEADS) else int(head)
        result = caption_attention_maps(self.model, self.processor, image, layer=layer, head=head, **settings)
        panels = [(attention_overlay(result, index), word) for index, word in enumerate(result.words)]
        note = ""
        if result.caption != captions[0]:
            # The maps need eager attention, whose rounding can, rarely, tip a beam the other way.
            note = f"The maps follow the caption the model wrote with eager attention: \"{result.caption}\"."
        return captions[0], beams, panels, note

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
        except (TypeError, ValueError) as error:  # templates without {object}, repeated templates
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


def build_page(demo: Demo, examples: list[str], title: str):
    """The Gradio page. Inputs reach `Demo` unprocessed (`preprocess=False`), so a bad upload becomes this
    project's message on the page instead of a decoding failure inside Gradio."""
    layer_choices = [ALL_LAYERS] + [str(layer) for layer in demo.layers]
    head_choices = [MEAN_OF_HEADS] + [str(head) for head in range(demo.heads)]
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\nUpload an image: the model captions it, and every word of the caption shows where "
                    "in the image its cross-attention looked while writing it. Click a panel to see it large.")
        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Image", sources=["upload", "clipboard"], elem_id="caption-image")
                    if examples:
                        gr.Examples(examples=examples, inputs=image, label="Examples")
                    with gr.Accordion("Generation", open=False):
                        num_beams = gr.Slider(1, 8, value=3, step=1, label="Beams")
                        max_new_tokens = gr.Slider(1, demo.longest_caption, value=demo.default_new_tokens, step=1,
                                                   label="Maximum new tokens")
                        length_penalty = gr.Slider(-2.0, 2.0, value=1.0, step=0.1, label="Length penalty",
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
            run.click(demo.caption, inputs, outputs, preprocess=False, api_name="caption")
            for trigger in (image.change, layers.input, head.input):
                trigger(demo.refresh, inputs, outputs, preprocess=False, api_visibility="private",
                        trigger_mode="always_last")
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
                classify.click(demo.zero_shot, [zs_image, class_names, templates], plot, preprocess=False,
                               api_name="zero_shot")
    return page


def load_demo(args) -> Demo:
    """Loads the captioner (and CLIP); a missing or unloadable model raises a user error saying what to do."""
    model_name = args.model or space_model() or DEFAULT_MODEL
    if model_name == DEFAULT_MODEL and not Path(model_name).is_dir():
        raise FileNotFoundError(f"no model at {DEFAULT_MODEL}: make it with `python train.py` (a few minutes on 2 CPU "
                                "cores), or pass --model a model folder, adapter folder or Hub id")
    try:
        model, processor = load_captioner(model_name, quantize=args.quantize)
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


def serve(args: argparse.Namespace) -> None:
    examples = find_examples(args.examples)
    demo = load_demo(args)
    demo.warm_up()
    with tempfile.TemporaryDirectory(prefix="vitgpt2-examples-") as served:
        page = build_page(demo, private_copies(examples, Path(served)),
                          title="ViT-GPT2 captioner: where each word looked")
        page.queue(default_concurrency_limit=1)  # one model in memory: requests wait their turn
        page.launch(server_name=args.server_name, server_port=args.server_port, share=args.share,
                    allowed_paths=[served] if examples else [])
