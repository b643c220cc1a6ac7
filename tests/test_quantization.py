"""The opt-in int8 CPU path: `load_for_inference(..., quantize="int8")` and `eval.py caption --quantize int8`."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import random_image

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DynamicQuantizedLinear = torch.ao.nn.quantized.dynamic.Linear


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


def _quantize_whole_model_at_once(model):
    """The int8 model as `quantize_for_cpu` made it before it worked layer by layer: the float32 model converted whole
    and handed to `quantize_dynamic` once, with a cloned, untied vocabulary projection."""
    from modeling_vitgpt2.inference.quantization import conv1d_to_linear

    def replace_conv1d(module):
        for name, child in module.named_children():
            setattr(module, name, conv1d_to_linear(child)) if isinstance(child, Conv1D) else replace_conv1d(child)

    replace_conv1d(model.eval())
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.set_output_embeddings(head)
    targets = {name: torch.ao.quantization.per_channel_dynamic_qconfig if name == "lm_head"
               else torch.ao.quantization.default_dynamic_qconfig
               for name, module in model.named_modules() if type(module) is nn.Linear}
    return torch.ao.quantization.quantize_dynamic(model, targets, dtype=torch.qint8, inplace=True)


@pytest.mark.parametrize(("tie_word_embeddings", "max_shard_size"), [(True, None), (False, "100KB")])
def test_int8_load_gives_the_outputs_of_quantizing_the_whole_float32_model(tmp_path, tiny_tokenizer, tiny_processor,
                                                                          tie_word_embeddings, max_shard_size):
    """Reading the weights file straight into int8 (and quantizing an in-memory model layer by layer) changes no
    logit and no caption against quantizing the loaded float32 model at once."""
    from conftest import tiny_config_kwargs
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration
    from modeling_vitgpt2.inference.loading import load_for_inference
    from modeling_vitgpt2.inference.quantization import quantize_for_cpu

    torch.manual_seed(0)
    config = ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer), tie_word_embeddings=tie_word_embeddings)
    ViTGPT2ForConditionalGeneration(config).save_pretrained(tmp_path, **(
        {"max_shard_size": max_shard_size} if max_shard_size else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(max_shard_size)
    expected = _quantize_whole_model_at_once(load_for_inference(tmp_path))
    candidates = {"read into int8": load_for_inference(tmp_path, quantize="int8"),
                  "quantized in memory": quantize_for_cpu(load_for_inference(tmp_path))}

    side = max(expected.encoder.model.patch_embed.img_size)
    pixel_values = tiny_processor(images=[random_image(seed, (side, side)) for seed in range(3)],
                                  return_tensors="pt")["pixel_values"]
    start = torch.full((3, 1), config.decoder_start_token_id)
    settings = dict(num_beams=3, min_new_tokens=8, max_new_tokens=8)
    with torch.inference_mode():
        expected_logits = expected(pixel_values=pixel_values, decoder_input_ids=start).logits
        expected_tokens = expected.generate(pixel_values=pixel_values, **settings)
        for name, model in candidates.items():
            assert str(model) == str(expected), name  # the same layers, int8 where they were
            assert model.config.to_dict() == expected.config.to_dict(), name
            assert model.generation_config.to_dict() == expected.generation_config.to_dict(), name
            assert not model.training, name
            assert torch.equal(model(pixel_values=pixel_values, decoder_input_ids=start).logits, expected_logits), name
            assert torch.equal(model.generate(pixel_values=pixel_values, **settings), expected_tokens), name


@pytest.mark.parametrize("saved_whole", [["crossattention", "ln_cross_attn"], ["wte"]],
                         ids=["cross-attention", "input-embedding"])
def test_int8_load_of_a_lora_adapter_gives_the_outputs_of_quantizing_the_merged_model(tmp_path, saved_captioner,
                                                                                       tiny_processor, saved_whole):
    """An adapter's layers (LoRA targets and the modules it saves whole) are read in float32, merged, then
    quantized; everything else straight into int8: the same logits and captions as merging into the float32 model
    and quantizing that at once. An adapter that saves the input embedding, which the vocabulary projection is tied
    to, keeps projecting with the base's (the int8 projection was built from the adapter's copy: garbage captions)."""
    from peft import LoraConfig, get_peft_model

    from modeling_vitgpt2.inference.loading import BASE_MODEL_FOLDER, load_for_inference
    from modeling_vitgpt2.training.peft_methods import DEFAULT_LORA_TARGETS

    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(load_for_inference(saved_captioner), LoraConfig(
        r=2, target_modules=DEFAULT_LORA_TARGETS, fan_in_fan_out=True, init_lora_weights=False,
        modules_to_save=saved_whole))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:  # as training leaves them: unlike the base model's
                parameter.add_(0.05 * torch.randn_like(parameter))
    peft_model.save_pretrained(adapter)
    (adapter / BASE_MODEL_FOLDER).symlink_to(saved_captioner, target_is_directory=True)

    expected = _quantize_whole_model_at_once(load_for_inference(adapter).merge_and_unload())
    quantized = load_for_inference(adapter, quantize="int8")
    assert str(quantized) == str(expected)
    side = max(expected.encoder.model.patch_embed.img_size)
    pixel_values = tiny_processor(images=[random_image(seed, (side, side)) for seed in range(3)],
                                  return_tensors="pt")["pixel_values"]
    start = torch.full((3, 1), expected.config.decoder_start_token_id)
    settings = dict(num_beams=3, min_new_tokens=8, max_new_tokens=8)
    with torch.inference_mode():
        assert torch.equal(quantized(pixel_values=pixel_values, decoder_input_ids=start).logits,
                           expected(pixel_values=pixel_values, decoder_input_ids=start).logits)
        assert torch.equal(quantized.generate(pixel_values=pixel_values, **settings),
                           expected.generate(pixel_values=pixel_values, **settings))
        base = _quantize_whole_model_at_once(load_for_inference(saved_captioner))
        assert not torch.equal(base(pixel_values=pixel_values, decoder_input_ids=start).logits,
                               expected(pixel_values=pixel_values, decoder_input_ids=start).logits)


MEASURE_INT8_LOAD = """
import sys
import threading

from modeling_vitgpt2.inference.loading import load_for_inference

folder, warm_up = sys.argv[1:]
load_for_inference(warm_up, quantize="int8")  # lazy imports and first-call allocations, outside the measurement


def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


before = peak = resident()
done = threading.Event()


def sample() -> None:
    global peak
    while not done.wait(0.0005):
        peak = max(peak, resident())


sampler = threading.Thread(target=sample)
sampler.start()
model = load_for_inference(folder, quantize="int8")
done.set()
sampler.join()
print(max(peak, resident()) - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_int8_load_never_holds_the_float32_weights(tmp_path, tiny_tokenizer, saved_captioner):
    """Loading in int8 grows the process by far less than the float32 weights: they are never all resident (the
    whole-model route held them all, and the file's pages it had read, while quantizing)."""
    from conftest import tiny_config_kwargs
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration

    torch.manual_seed(0)
    encoder = dict(img_size=28, patch_size=14, embed_dim=512, depth=6, num_heads=8)  # 75 MB of float32 weights
    ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(
        tiny_tokenizer, encoder_kwargs=encoder, encoder_hidden_size=512))).save_pretrained(tmp_path)
    float32_bytes = (tmp_path / "model.safetensors").stat().st_size
    finished = subprocess.run([sys.executable, "-c", MEASURE_INT8_LOAD, str(tmp_path), str(saved_captioner)],
                              capture_output=True, text=True, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr
    growth = int(finished.stdout.split()[-1])
    # int8 weights are a quarter of the float32 ones; one float32 layer at a time comes on top.
    assert growth < 0.6 * float32_bytes, (growth, float32_bytes)


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


@pytest.mark.parametrize("target", ["wte", "lm_head"])
def test_merging_a_lora_adapter_on_a_tied_weight_computes_what_the_adapter_computes(tmp_path, saved_captioner,
                                                                                     tiny_processor, target):
    """An adapter on the token embedding or the LM head, which GPT-2 ties to it (made before training refused them,
    or by another tool), changes that module alone while unmerged. Every route that merges it (prepacking, int8)
    gives the same logits and captions as the unmerged adapter, not those of a merge into the one shared weight."""
    from peft import LoraConfig, get_peft_model

    from modeling_vitgpt2.inference.loading import BASE_MODEL_FOLDER, load_for_inference
    from modeling_vitgpt2.inference.prepacking import prepack_for_cpu

    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    # peft directly: training's `_refuse_adapted_tied_weights` would refuse this adapter.
    peft_model = get_peft_model(load_for_inference(saved_captioner), LoraConfig(r=2, target_modules=[target]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:  # as training leaves them: B (or A for an embedding) starts at zero
                parameter.copy_(0.3 * torch.randn_like(parameter))
    peft_model.save_pretrained(adapter)
    (adapter / BASE_MODEL_FOLDER).symlink_to(saved_captioner, target_is_directory=True)

    unmerged = load_for_inference(adapter)
    side = max(unmerged.base_model.model.encoder.model.patch_embed.img_size)
    pixel_values = tiny_processor(images=[random_image(seed, (side, side)) for seed in range(3)],
                                  return_tensors="pt")["pixel_values"]
    start = torch.full((3, 1), unmerged.config.decoder_start_token_id)
    settings = dict(num_beams=2, max_new_tokens=8)

    def logits(model):
        return model(pixel_values=pixel_values, decoder_input_ids=torch.cat([start, start], dim=1)).logits

    with torch.inference_mode():
        expected, captions = logits(unmerged), unmerged.generate(pixel_values=pixel_values, **settings)
        # What merging into the shared weight gives: far from the adapter, so the checks below tell the two apart.
        shared_merge = logits(load_for_inference(adapter).merge_and_unload())
        tolerance = 0.05 * expected.abs().max()
        assert (shared_merge - expected).abs().max() > 4 * tolerance

        prepacked = prepack_for_cpu(load_for_inference(adapter))  # same float32 arithmetic, other summation order
        torch.testing.assert_close(logits(prepacked), expected, rtol=1e-4, atol=1e-4)
        assert not prepacked.config.tie_word_embeddings  # nothing re-ties the head to the merged embedding
        assert torch.equal(prepacked.generate(pixel_values=pixel_values, **settings), captions)

        quantized = load_for_inference(adapter, quantize="int8")
        assert (logits(quantized) - expected).abs().max() < tolerance


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


def test_int8_load_reads_the_weights_file_that_from_pretrained_reads(tmp_path, tiny_tokenizer):
    """A folder saved sharded, then saved again in one file, keeps the old index (its shards are deleted):
    `from_pretrained` reads the one file, and so must the int8 load, rather than stop on a missing shard. An index
    without a weight map is refused naming the file."""
    from conftest import tiny_config_kwargs
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration
    from modeling_vitgpt2.inference.loading import load_for_inference

    for seed, shard_size in ((0, "100KB"), (1, None)):
        torch.manual_seed(seed)
        model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer)))
        model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file()  # the premise: the stale index stays
    embeddings = "decoder.wte.weight"
    loaded = dict(load_for_inference(tmp_path, quantize="int8").named_parameters())
    assert torch.equal(loaded[embeddings], model.state_dict()[embeddings])

    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json has no 'weight_map'"):
        load_for_inference(tmp_path, quantize="int8")
