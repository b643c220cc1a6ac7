"""Shared test set-up: everything runs offline on tiny models built from configs."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def compiled_encoder_cache(tmp_path_factory) -> Iterator[Path]:
    """One cache of compiled int8 encoders for the session (`--quantize int8-compiled`), instead of the user's
    `$HF_HOME`: later loads of the same tiny encoder skip compiling, as a user's second start does."""
    from modeling_vitgpt2.inference.compiled_encoder import CACHE_ENVIRONMENT_VARIABLE

    folder = tmp_path_factory.mktemp("compiled_encoders")
    previous = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    os.environ[CACHE_ENVIRONMENT_VARIABLE] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(CACHE_ENVIRONMENT_VARIABLE, None)
    else:
        os.environ[CACHE_ENVIRONMENT_VARIABLE] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real reference data beside the checkout (`../shared/data`); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not found at {SHARED_DATA}")
    return SHARED_DATA


import torch  # noqa: E402

from vendored_suites import VENDORED, version_mismatches  # noqa: E402

VENDORED_SUITE_MODULES = {test_module for _, test_module in VENDORED.values()}


def pytest_ignore_collect(collection_path, config):
    """Leave out a vendored suite whose library release differs from the files' (their import would fail with a
    traceback); tests/test_vendored_suites.py fails instead, naming both versions."""
    if collection_path.name in VENDORED_SUITE_MODULES and collection_path.name in version_mismatches():
        return True
    return None


def vendored_onnx_tests_match_release() -> bool:
    """The vendored export suite reads `ExportedModel.model_proto`, which transformers' installed exporter may not
    have: those tests then fail inside transformers, whatever our model does. They only run at all where onnxruntime
    and onnxscript happen to be installed (neither is a dependency of ours)."""
    try:
        from transformers.exporters.base import ExportedModel
    except ImportError:
        return False
    return hasattr(ExportedModel, "model_proto")


def pytest_collection_modifyitems(config, items):
    if vendored_onnx_tests_match_release():
        return
    import transformers

    skip = pytest.mark.skip(
        reason=f"vendored ONNX export tests need ExportedModel.model_proto, which transformers "
        f"{transformers.__version__} lacks; refresh ../shared/vendor to a matching release to run them"
    )
    for item in items:
        if item.get_closest_marker("onnx_export_test"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def train_script():
    """`train.py` / `vitgpt2 train`: its argument parsing, `train` (the wiring that pushes after training) and `main`."""
    from modeling_vitgpt2.cli import train

    return train

TINY_CAPTIONS = [
    "a red circle on the left",
    "a small blue square at the top",
    "two green triangles next to a yellow star",
    "a dog running on the grass",
    "a couple of boats in a large body of water",
    "a view of a mountain with a tree",
]


def build_tiny_tokenizer(save_dir: Path):
    """A byte-level BPE tokenizer shaped like GPT-2's (`<|endoftext|>` is start, end and pad), trained offline."""
    from modeling_vitgpt2.training.tokenizer import train_caption_tokenizer

    return train_caption_tokenizer(TINY_CAPTIONS * 4, vocab_size=300, save_dir=save_dir)


def tiny_config_kwargs(tokenizer, **overrides):
    """A ViT (28 px, 2x2 patches of 14 px, 48-d tokens) feeding a 2-layer, 32-wide GPT-2: encoder and decoder
    widths differ on purpose, so the cross-attention key/value projection really maps one to the other."""
    end = tokenizer.eos_token_id
    kwargs = dict(
        encoder_name="vit_base_patch16_224",
        encoder_kwargs=dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2),
        encoder_hidden_size=48,
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        decoder_start_token_id=end,
    )
    kwargs.update(overrides)
    return kwargs


def random_image(seed: int, size, mode: str = "RGB"):
    """A PIL image of uniform noise, `size = (width, height)`."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def fit_tiny_captions(model, processor, steps: int = 60):
    """Fits a tiny model briefly to TINY_CAPTIONS on noise images, so that it writes real multi-token words and stops
    with the end token (a random model babbles bytes until max_length). Returns the model in eval mode."""
    side = max(model.encoder.model.patch_embed.img_size)
    batch = processor.tokenize_captions(TINY_CAPTIONS)
    pixel_values = processor(images=[random_image(seed, (side, side)) for seed in range(len(TINY_CAPTIONS))])[
        "pixel_values"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(pixel_values=pixel_values, decoder_input_ids=batch["decoder_input_ids"],
                     labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    import timm

    from modeling_vitgpt2 import ViTGPT2Processor

    encoder = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=28, patch_size=14,
                                embed_dim=48, depth=1, num_heads=2)
    return ViTGPT2Processor.from_timm_model(encoder, tiny_tokenizer)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration

    torch.manual_seed(0)
    return ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer))).eval()


@pytest.fixture(scope="module")
def saved_captioner(tmp_path_factory, tiny_tokenizer, tiny_processor):
    """A tiny captioner fitted to write real captions, saved as train.py saves one (the int8 tests load it)."""
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration

    torch.manual_seed(0)
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer)))
    fit_tiny_captions(model, tiny_processor, steps=40)
    folder = tmp_path_factory.mktemp("captioner")
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def real_photos(shared_data) -> list[Path]:
    folder = shared_data / "real_images"
    return [folder / "git_examples" / "1.jpg", folder / "git_examples" / "2.jpg", folder / "skimage" / "astronaut.png"]


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine thread hand-offs make them many times
    slower; modules of tiny-model tests opt in with `pytestmark = pytest.mark.usefixtures("single_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_clip(folder: Path, seed: int = 1) -> Path:
    """A randomly initialised CLIP small enough for CPU tests, with a byte-level BPE tokenizer built offline.

    The vocabulary is every byte symbol with and without CLIP's end-of-word marker and no merges, so any text
    tokenizes (one token per character); the image side takes 32x32 inputs. With seed 1 the untrained model gives
    the real test images cosines of both signs (so both sides of max(cos, 0) are exercised) and zero-shot
    predictions that vary between images; the tests check these premises rather than trust them.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [symbol + "</w>" for symbol in symbols]:
        vocab.setdefault(symbol, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@contextlib.contextmanager
def serving_app(app: Path, arguments: list[str], cwd: Path, start_seconds: float = 180):
    """Runs `python app.py ARGUMENTS` in `cwd` as a user starts the demo page, on a free localhost port, and yields
    its URL once it answers; stops it afterwards. A start that fails shows the server's log."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = cwd / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, str(app), *arguments, "--server_port", str(port)], cwd=cwd,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + start_seconds
        try:
            while True:
                if process.poll() is not None:
                    pytest.fail(f"{app} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{app} did not serve {url} within {start_seconds} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


# ---------------------------------------------------------------------------------------------------------------
# Training runs on tiny local "pretrained" parts (the tests of training, train.py, the Hub and PEFT methods share them)

ENCODER_KWARGS = {"img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    from modeling_vitgpt2.data.synthetic import write_synthetic_coco

    return write_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=4, seed=1, image_size=32)


@pytest.fixture(scope="session")
def pretrained_parts(tmp_path_factory, shapes):
    """A timm weights file and a GPT-2 folder (with its tokenizer), as users get them from the Hub."""
    import json

    import timm
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling_vitgpt2.training.tokenizer import train_caption_tokenizer

    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    vit = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=0, **ENCODER_KWARGS)
    save_file(vit.state_dict(), folder / "vit.safetensors")
    captions = [a["caption"] for a in json.loads(shapes.train_json.read_text())["annotations"]]
    tokenizer = train_caption_tokenizer(captions * 5, vocab_size=400, save_dir=folder / "gpt2")
    end = tokenizer.eos_token_id
    gpt2 = GPT2LMHeadModel(
        # A wider initialisation than GPT-2's 0.02 gives this untrained decoder logits far from uniform, like a
        # pretrained one, so that a few steps of LoRA visibly move the loss.
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                   bos_token_id=end, eos_token_id=end, initializer_range=0.3)
    )
    gpt2.save_pretrained(folder / "gpt2")
    return folder / "vit.safetensors", folder / "gpt2"


def training_arguments(shapes, pretrained_parts, output_dir, peft="lora", **training):
    """The four argument groups of `run_training` for a few fast steps on the tiny parts; `training` overrides."""
    import json

    from modeling_vitgpt2.training.arguments import CaptionTrainingArguments, DataArguments, ModelArguments
    from modeling_vitgpt2.training.peft_methods import PeftArguments

    encoder, decoder = pretrained_parts
    model_args = ModelArguments(
        encoder=str(encoder),
        decoder=str(decoder),
        model_config=json.dumps({"encoder_name": "vit_large_patch14_clip_224.openai", "encoder_kwargs": ENCODER_KWARGS}),
    )
    data_args = DataArguments(
        train_json=str(shapes.train_json), train_images=str(shapes.train_images),
        val_json=str(shapes.val_json), val_images=str(shapes.val_images), max_caption_length=24,
    )
    peft_args = PeftArguments(peft=peft, adapter_bottleneck=8, num_virtual_tokens=4)
    settings = dict(
        output_dir=str(output_dir), learning_rate=1e-2, weight_decay=0.0, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, max_steps=8, logging_steps=1, eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, generation_num_beams=2, generation_max_length=12, lr_scheduler_type="constant",
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    settings.update(training)
    return model_args, data_args, peft_args, CaptionTrainingArguments(**settings)


@torch.no_grad()
def direct_embeddings(folder: Path, image_paths, texts):
    """Unit image and text embeddings computed by hand with the plain transformers API."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    pixels = processor(images=[Image.open(path).convert("RGB") for path in image_paths], return_tensors="pt")
    images = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    # CLIP's context is 77 tokens; longer texts are truncated (the tiny tokenizer spends one token per character)
    tokens = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=77)
    text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    text = text.pooler_output
    return images / images.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# The evaluation jobs' inputs (eval.py's tests and the bad-input tests share them)

CLASSES = {0: "red square", 1: "green field", 2: "blue sky"}

# Image name -> (size, PIL mode, file extension): several sizes and modes, one JPEG; five images so that
# --batch_size 2 leaves a partial last batch.
PHOTOS = {"beach": ((64, 48), "RGB", ".png"), "forest": ((50, 70), "RGB", ".jpg"), "logo": ((40, 40), "RGBA", ".png"),
          "night": ((56, 56), "L", ".png"), "street": ((90, 30), "RGB", ".png")}

PREDICTIONS = {"beach": "a couple of boats in a large body of water", "forest": "a view of a mountain with a tree",
               "logo": "a red circle on the left", "night": "a dog running on the grass",
               "street": "two green triangles next to a yellow star"}


@pytest.fixture(scope="module")
def captioner_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny captioner fitted briefly to the tiny captions (so it writes words, not random bytes), saved with its
    processor the way train.py saves a full model."""
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration, ViTGPT2Processor

    torch.manual_seed(0)
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer)))
    processor = ViTGPT2Processor.from_timm_model(model.encoder.model, tiny_tokenizer)
    fit_tiny_captions(model, processor)
    folder = tmp_path_factory.mktemp("captioner")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Generated images, their COCO-style references, a predictions file and a zero-shot folder in the course
    layout ({class_id}_{n}.png + id2label.json)."""
    root = tmp_path_factory.mktemp("eval_data")
    photos = root / "photos"
    photos.mkdir()
    for seed, (name, (size, mode, extension)) in enumerate(PHOTOS.items()):
        random_image(seed, size, mode).save(photos / f"{name}{extension}")
    annotations = {"images": [], "annotations": []}
    for index, (name, (_, _, extension)) in enumerate(PHOTOS.items()):
        image_id = 100 + index  # ids differ from positions, so a mix-up of the two would show
        annotations["images"].append({"file_name": f"{name}{extension}", "id": image_id})
        for offset in range(2):
            annotations["annotations"].append({"image_id": image_id, "id": 10 * index + offset,
                                               "caption": TINY_CAPTIONS[(index + offset) % len(TINY_CAPTIONS)]})
    (root / "val.json").write_text(json.dumps(annotations))
    (root / "preds.json").write_text(json.dumps(PREDICTIONS))

    course = root / "p1_val"
    course.mkdir()
    for class_id in CLASSES:
        for n in range(2):
            random_image(10 * class_id + n, (32, 32)).save(course / f"{class_id}_{n}.png")
    (root / "id2label.json").write_text(json.dumps({str(class_id): name for class_id, name in CLASSES.items()}))
    return root
