"""Saving and loading through the paths users take with Hub ids: `from_pretrained`, Auto classes, remote code,
and the `image-text-to-text` pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2Processor


@pytest.fixture()
def saved_folder(tiny_model, tiny_processor, tmp_path):
    folder = tmp_path / "captioner"
    # Generation settings travel in generation_config.json (the model's __init__ sets none).
    tiny_model.generation_config.num_beams = 3
    tiny_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        path = tmp_path / f"image_{index}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 10 * index, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def captions(model, processor, images, **settings):
    pixel_values = processor(images=images)["pixel_values"]
    return processor.batch_decode(model.generate(pixel_values=pixel_values, max_length=12, **settings))


def test_saved_folder_holds_safetensors_config_code_and_processor(saved_folder):
    names = {path.name for path in saved_folder.iterdir()}
    assert "model.safetensors" in names
    assert not any(name.endswith(".bin") for name in names)
    assert {"config.json", "generation_config.json", "configuration_vitgpt2.py", "modeling_vitgpt2.py",
            "processing_vitgpt2.py", "processor_config.json", "tokenizer.json"} <= names
    # The remote code is the model, not the tools: the checkpoint conversion stays in the package.
    assert "convert_vision_encoder_decoder.py" not in names
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_vitgpt2.ViTGPT2ForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_vitgpt2.ViTGPT2Config"
    assert json.loads((saved_folder / "generation_config.json").read_text())["num_beams"] == 3
    assert ViTGPT2ForConditionalGeneration.from_pretrained(saved_folder).generation_config.num_beams == 3


def test_round_trip_gives_identical_generations(tiny_model, tiny_processor, saved_folder, images):
    expected = captions(tiny_model, tiny_processor, images)
    model = ViTGPT2ForConditionalGeneration.from_pretrained(saved_folder).eval()
    processor = ViTGPT2Processor.from_pretrained(saved_folder)
    assert captions(model, processor, images) == expected
    for name, weight in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name


def test_auto_classes_load_the_saved_folder(tiny_model, tiny_processor, saved_folder, images):
    model = AutoModelForImageTextToText.from_pretrained(saved_folder).eval()
    processor = AutoProcessor.from_pretrained(saved_folder)
    assert isinstance(model, ViTGPT2ForConditionalGeneration) and isinstance(processor, ViTGPT2Processor)
    assert captions(model, processor, images) == captions(tiny_model, tiny_processor, images)


def test_remote_code_loads_in_a_fresh_process_from_the_copied_files(tiny_model, tiny_processor, saved_folder, images):
    expected = captions(tiny_model, tiny_processor, images)
    script = textwrap.dedent(
        f"""
        import json, sys
        # Hide this package: the classes must come from the files saved beside the weights.
        sys.modules["modeling_vitgpt2"] = None
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(saved_folder)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        pixel_values = processor(images={[str(p) for p in images]!r})["pixel_values"]
        texts = processor.batch_decode(model.generate(pixel_values=pixel_values, max_length=12))
        print(json.dumps({{"module": type(model).__module__, "processor": type(processor).__module__, "captions": texts}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(saved_folder.parent / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=saved_folder.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["processor"].startswith("transformers_modules.")
    assert loaded["captions"] == expected


def test_pipeline_captions_an_image(tiny_model, tiny_processor, saved_folder, images):
    captioner = pipeline("image-text-to-text", model=str(saved_folder), trust_remote_code=True)
    result = captioner(images=str(images[0]), text="", generate_kwargs={"max_length": 12})
    assert result[0]["generated_text"].strip() == captions(tiny_model, tiny_processor, images[:1])[0]
