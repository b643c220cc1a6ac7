"""`--dtype bfloat16` on the loader, `eval.py caption` and the demo: it runs in bfloat16 where the CPU has bfloat16
instructions, and is refused with one line saying why where it has not (the flags are patched both ways, so both
paths run on any machine)."""

import json

import pytest
import torch
from PIL import Image

from conftest import tiny_config_kwargs
from helpers import load_cli_module
from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration, ViTGPT2Processor
from modeling_vitgpt2.evaluation.jobs import load_captioner
from modeling_vitgpt2.inference import loading
from modeling_vitgpt2.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

REFUSAL = "--dtype bfloat16 needs a CPU with bfloat16 instructions (avx512_bf16 or AMX"


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer)))
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    ViTGPT2Processor.from_timm_model(model.encoder.model, tiny_tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 40), colour).save(folder / f"{index}.png")
    return folder


def without_bfloat16(monkeypatch):
    monkeypatch.setattr(loading, "has_fast_bfloat16", lambda: False)


def test_loads_in_bfloat16_where_the_cpu_has_it(model_dir, monkeypatch):
    monkeypatch.setattr(loading, "has_fast_bfloat16", lambda: True)
    model, processor = load_captioner(model_dir, device="cpu", dtype="bfloat16")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    output = model.generate(**processor(images=[Image.new("RGB", (40, 40), "red")]), num_beams=2, max_new_tokens=4)
    assert output.shape[0] == 1
    assert loading.load_for_inference(model_dir, dtype="bfloat16").dtype == torch.bfloat16


def test_the_loader_refuses_bfloat16_on_a_cpu_without_it(model_dir, monkeypatch):
    without_bfloat16(monkeypatch)
    for load in (lambda: load_captioner(model_dir, device="cpu", dtype="bfloat16"),
                 lambda: loading.load_for_inference(model_dir, dtype="bfloat16")):
        with pytest.raises(UserError, match=REFUSAL.replace("(", r"\(")):
            load()
    with pytest.raises(UserError, match="exclude each other"):
        load_captioner(model_dir, device="cpu", dtype="bfloat16", quantize="int8")
    assert load_captioner(model_dir, device="cpu")[0].dtype == torch.float32  # float32 is never refused


@pytest.mark.parametrize("saved_dtype", [torch.bfloat16, torch.float16])
def test_a_model_saved_in_half_precision_loads_in_float32_and_quantizes(model_dir, saved_dtype, tmp_path,
                                                                         monkeypatch):
    """transformers keeps a checkpoint's dtype: a model saved in bfloat16 ran in (maybe emulated) bfloat16 without
    --dtype, and --quantize int8 refused it, telling the user to load it 'without a dtype', as they had."""
    without_bfloat16(monkeypatch)
    ViTGPT2ForConditionalGeneration.from_pretrained(model_dir).to(saved_dtype).save_pretrained(tmp_path)
    assert {parameter.dtype for parameter in loading.load_for_inference(tmp_path).parameters()} == {torch.float32}
    quantized = loading.load_for_inference(tmp_path, quantize="int8")
    assert quantized.get_output_embeddings().weight().dtype == torch.qint8


def test_eval_caption_refuses_in_one_line_and_writes_nothing(model_dir, images, tmp_path, monkeypatch, capsys):
    without_bfloat16(monkeypatch)
    output = tmp_path / "preds.json"
    argv = ["caption", "--model", str(model_dir), "--images", str(images), "--output", str(output),
            "--dtype", "bfloat16"]
    assert load_cli_module().main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"eval.py caption: error: {REFUSAL}")
    assert not output.exists()

    monkeypatch.setattr(loading, "has_fast_bfloat16", lambda: True)
    assert load_cli_module().main(argv) == 0
    assert set(json.loads(output.read_text())) == {"0", "1"}


def test_the_demo_refuses_bfloat16_on_a_cpu_without_it(model_dir, monkeypatch):
    pytest.importorskip("gradio", reason="the demo needs the [demo] extra (gradio)")
    from modeling_vitgpt2.applications import demo

    without_bfloat16(monkeypatch)
    with pytest.raises(UserError, match=REFUSAL.replace("(", r"\(")):
        demo.load_demo(demo.parse_args(["--model", str(model_dir), "--dtype", "bfloat16"]))
