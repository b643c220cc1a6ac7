"""Prepacked float32 CPU inference (`modeling_vitgpt2.inference.prepacking`), the default of `eval.py caption` and the demo on
a CPU: the same captions as the model it was made from, and no way to save or move it by mistake."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import fit_tiny_captions, random_image

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def saved_captioner(tmp_path_factory, tiny_tokenizer, tiny_processor):
    """A tiny captioner fitted to write real captions, saved as train.py saves one."""
    from conftest import tiny_config_kwargs
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration

    torch.manual_seed(0)
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer, adapter_bottleneck=4)))
    fit_tiny_captions(model, tiny_processor, steps=40)
    folder = tmp_path_factory.mktemp("captioner")
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


def pixels(model, processor, count=4):
    side = max(model.encoder.model.patch_embed.img_size)
    return processor(images=[random_image(seed, (side, side)) for seed in range(count)],
                     return_tensors="pt")["pixel_values"]


def test_every_linear_layer_is_prepacked_and_captions_stay_the_same(saved_captioner, tiny_processor):
    from modeling_vitgpt2.evaluation.jobs import load_captioner
    from modeling_vitgpt2.inference.loading import load_for_inference
    from modeling_vitgpt2.inference.prepacking import PrepackedLinear

    reference = load_for_inference(saved_captioner)
    linear_layers = {name for name, module in reference.named_modules()
                     if type(module) in (nn.Linear, Conv1D) or name == "lm_head"}
    model, _ = load_captioner(saved_captioner, tiny_processor, device="cpu")  # prepacks by default on a CPU

    prepacked = {name for name, module in model.named_modules() if isinstance(module, PrepackedLinear)}
    assert prepacked == linear_layers  # the ViT's, the decoder's (adapters included) and the vocabulary projection
    assert any(name.startswith("encoder.") for name in prepacked) and "decoder.h.0.attn_adapter.up" in prepacked
    assert model.lm_head.weight is model.decoder.wte.weight  # still tied: the embedding reads it

    images = pixels(reference, tiny_processor)
    start = torch.full((4, 1), reference.config.decoder_start_token_id)
    with torch.inference_mode():
        expected = reference(pixel_values=images, decoder_input_ids=start).logits
        logits = model(pixel_values=images, decoder_input_ids=start).logits
        for num_beams in (1, 3):
            assert torch.equal(model.generate(pixel_values=images, num_beams=num_beams, max_new_tokens=10),
                               reference.generate(pixel_values=images, num_beams=num_beams, max_new_tokens=10))
    assert (logits - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max())


def test_a_model_passed_in_or_going_elsewhere_is_left_alone(saved_captioner, tiny_processor):
    from modeling_vitgpt2.evaluation.jobs import load_captioner
    from modeling_vitgpt2.inference.loading import load_for_inference
    from modeling_vitgpt2.inference.prepacking import PrepackedLinear

    def prepacked(model):
        return {name for name, module in model.named_modules() if isinstance(module, PrepackedLinear)}

    training_model = load_for_inference(saved_captioner)
    assert not prepacked(load_captioner(training_model, tiny_processor, device="cpu")[0])
    assert not prepacked(load_captioner(saved_captioner, device="cpu", prepack=False)[0])
    assert not prepacked(load_captioner(saved_captioner, device="cpu", quantize="int8")[0])


def test_a_lora_adapter_is_merged_before_prepacking(saved_captioner, tiny_processor):
    from peft import LoraConfig, get_peft_model

    from modeling_vitgpt2.inference.loading import load_for_inference
    from modeling_vitgpt2.inference.prepacking import PrepackedLinear, prepack_for_cpu
    from modeling_vitgpt2.training.peft_methods import DEFAULT_LORA_TARGETS

    torch.manual_seed(0)
    adapted = get_peft_model(load_for_inference(saved_captioner),
                             LoraConfig(r=2, target_modules=DEFAULT_LORA_TARGETS, fan_in_fan_out=True,
                                        init_lora_weights=False)).eval()
    images = pixels(adapted.base_model.model, tiny_processor, count=2)
    with torch.inference_mode():
        expected = adapted.generate(pixel_values=images, num_beams=2, max_new_tokens=8)
        model = prepack_for_cpu(adapted)
        assert type(model).__name__ == "ViTGPT2ForConditionalGeneration"
        assert isinstance(model.decoder.h[0].attn.c_attn, PrepackedLinear)
        assert torch.equal(model.generate(pixel_values=images, num_beams=2, max_new_tokens=8), expected)


def test_a_prepacked_model_cannot_be_saved_moved_or_cast(saved_captioner, tiny_processor, tmp_path):
    from modeling_vitgpt2.evaluation.jobs import load_captioner

    model, _ = load_captioner(saved_captioner, device="cpu")
    with pytest.raises(RuntimeError, match="prepacked for CPU inference and cannot be saved"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()  # nothing half-written
    with pytest.raises(RuntimeError, match="prepacked for CPU inference and cannot be saved"):
        model.state_dict()
    images = pixels(model, tiny_processor, count=1)
    with pytest.raises(RuntimeError, match="prepacked for float32 CPU inference.*prepack=False"), torch.inference_mode():
        model.to(torch.bfloat16)(pixel_values=images.to(torch.bfloat16),
                                 decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
