"""The opt-in int8 CPU path: `load_for_inference(..., quantize="int8")` and `eval.py caption --quantize int8`."""

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import fit_tiny_captions, random_image

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DynamicQuantizedLinear = torch.ao.nn.quantized.dynamic.Linear


@pytest.fixture(scope="module")
def saved_captioner(tmp_path_factory, tiny_tokenizer, tiny_processor):
    """A tiny captioner fitted to write real captions, saved as train.py saves one."""
    from conftest import tiny_config_kwargs
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration

    torch.manual_seed(0)
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer)))
    fit_tiny_captions(model, tiny_processor, steps=40)
    folder = tmp_path_factory.mktemp("captioner")
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


def test_int8_replaces_every_linear_layer_and_stays_close_to_float32(saved_captioner, tiny_processor):
    from modeling_vitgpt2.inference.loading import load_for_inference

    reference = load_for_inference(saved_captioner)
    quantized = load_for_inference(saved_captioner, quantize="int8")

    float_layers = [name for name, module in reference.named_modules() if isinstance(module, (Conv1D, nn.Linear))]
    int8_layers = {name for name, module in quantized.named_modules() if isinstance(module, DynamicQuantizedLinear)}
    # Every linear layer is int8: the ViT's, the decoder's and the vocabulary projection (an untied copy).
    assert set(float_layers) <= int8_layers
    assert any(name.startswith("encoder.") for name in int8_layers)
    assert any(".crossattention.c_attn" in name for name in int8_layers)
    assert not any(isinstance(module, Conv1D) for module in quantized.modules())
    assert quantized.decoder.wte.weight.dtype == torch.float32  # the input embedding stays float32

    side = max(reference.encoder.model.patch_embed.img_size)
    pixel_values = tiny_processor(images=[random_image(seed, (side, side)) for seed in range(4)],
                                  return_tensors="pt")["pixel_values"]
    start = torch.full((4, 1), reference.config.decoder_start_token_id)
    with torch.inference_mode():
        expected = reference(pixel_values=pixel_values, decoder_input_ids=start).logits
        logits = quantized(pixel_values=pixel_values, decoder_input_ids=start).logits
        captions = quantized.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=8)
    assert not torch.equal(logits, expected)  # the int8 layers really ran
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()
    assert captions.shape[0] == 4 and (captions[:, 1:] != reference.config.pad_token_id).any()


def test_int8_merges_a_lora_adapter_first(saved_captioner):
    from peft import LoraConfig, get_peft_model

    from modeling_vitgpt2.inference.loading import load_for_inference
    from modeling_vitgpt2.inference.quantization import quantize_for_cpu
    from modeling_vitgpt2.training.peft_methods import DEFAULT_LORA_TARGETS

    model = get_peft_model(load_for_inference(saved_captioner),
                           LoraConfig(r=2, target_modules=DEFAULT_LORA_TARGETS, fan_in_fan_out=True))
    quantized = quantize_for_cpu(model)
    assert type(quantized).__name__ == "ViTGPT2ForConditionalGeneration"
    assert isinstance(quantized.decoder.h[0].attn.c_attn, DynamicQuantizedLinear)


def test_int8_refuses_what_it_cannot_quantize(saved_captioner):
    from modeling_vitgpt2.inference.loading import load_for_inference

    with pytest.raises(ValueError, match="float32 model on the CPU"):
        load_for_inference(saved_captioner, quantize="int8", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="int4.*not supported"):
        load_for_inference(saved_captioner, quantize="int4")


def test_eval_caption_quantize_int8(saved_captioner, tmp_path):
    import eval as eval_cli

    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        random_image(seed, (40, 30)).save(images / f"img{seed}.png")
    output = tmp_path / "preds.json"
    assert eval_cli.main(["caption", "--model", str(saved_captioner), "--images", str(images), "--output",
                          str(output), "--quantize", "int8", "--max_new_tokens", "6", "--num_workers", "1"]) == 0
    assert sorted(json.loads(output.read_text())) == ["img0", "img1", "img2"]


def test_demo_quantize_int8_captions_with_attention_panels(saved_captioner):
    pytest.importorskip("gradio")
    from modeling_vitgpt2.applications.demo import load_demo, parse_args

    demo = load_demo(parse_args(["--model", str(saved_captioner), "--quantize", "int8"]))
    assert isinstance(demo.model.decoder.h[0].mlp.c_fc, DynamicQuantizedLinear)
    demo.warm_up()  # a caption with the attention panels of every layer, through the int8 model


def test_an_int8_model_refuses_to_save_before_writing_anything(saved_captioner, tmp_path):
    # It used to write config.json and the code, then die on the int8 weights ('torch.dtype' object has no
    # attribute 'data_ptr'), leaving a folder that looked like a model.
    from modeling_vitgpt2.inference.loading import load_for_inference

    quantized = load_for_inference(saved_captioner, quantize="int8")
    with pytest.raises(RuntimeError, match="quantized to int8 .* cannot be saved: load it again with quantize=None"):
        quantized.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
