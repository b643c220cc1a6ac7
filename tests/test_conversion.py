"""Building from real pretrained parts, and importing `VisionEncoderDecoderModel` checkpoints with identical outputs.

The parity with transformers' own ViT -> GPT-2 model (same weights, same pixels) is what proves this decoder,
its cache and its generation right.
"""

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
)

from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2Processor
from modeling_vitgpt2.inference.prepacking import prepack_for_cpu
from modeling_vitgpt2.model.convert_vision_encoder_decoder import convert_vision_encoder_decoder
from modeling_vitgpt2.model.convert_vision_encoder_decoder import main as convert_main


def tiny_vision_encoder_decoder(tokenizer, encoder_width: int, **decoder_settings) -> VisionEncoderDecoderModel:
    """Large initial weights (initializer range 0.2-0.3), so every difference between the two models, such as a
    LayerNorm epsilon of 1e-6 against ViT's 1e-12, shows in the logits."""
    torch.manual_seed(0)
    end = tokenizer.eos_token_id
    encoder = ViTConfig(
        hidden_size=encoder_width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * encoder_width,
        image_size=28, patch_size=14, initializer_range=0.3,
    )
    decoder = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=64, add_cross_attention=True,
        is_decoder=True, bos_token_id=end, eos_token_id=end, attn_pdrop=0.05, initializer_range=0.2,
        **decoder_settings,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = end
    return VisionEncoderDecoderModel(config=config).eval()


@pytest.mark.parametrize("prepacked", [False, True], ids=["blas", "prepacked"])
@pytest.mark.parametrize("encoder_width", [48, 32], ids=["with-enc_to_dec_proj", "same-width"])
def test_converted_model_matches_vision_encoder_decoder(tiny_tokenizer, encoder_width, prepacked):
    reference = tiny_vision_encoder_decoder(tiny_tokenizer, encoder_width)
    assert hasattr(reference, "enc_to_dec_proj") == (encoder_width != 32)
    ours = convert_vision_encoder_decoder(reference).eval()
    if prepacked:  # how eval.py and the demo run on a CPU
        ours = prepack_for_cpu(ours)
    # The decoder keeps GPT-2's dropouts and initialisation, not only its sizes.
    assert (ours.config.attn_pdrop, ours.config.initializer_range) == (0.05, 0.2)
    pixels = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, len(tiny_tokenizer), (4, 9), generator=torch.Generator().manual_seed(2))

    with torch.inference_mode():
        expected = reference(pixel_values=pixels, decoder_input_ids=ids).logits
        actual = ours(pixel_values=pixels, decoder_input_ids=ids).logits
    assert (expected - actual).abs().max() < 1e-5

    for num_beams in (1, 3):
        for settings in (dict(max_length=14), dict(max_length=14, min_new_tokens=13)):
            assert torch.equal(
                reference.generate(pixel_values=pixels, num_beams=num_beams, **settings),
                ours.generate(pixel_values=pixels, num_beams=num_beams, **settings),
            ), f"captions differ with num_beams={num_beams}, {settings}"


def test_conversion_from_a_saved_folder_brings_its_processor(tiny_tokenizer, tmp_path):
    reference = tiny_vision_encoder_decoder(tiny_tokenizer, 48)
    reference.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    # The command-line conversion, as users run it on a Hub id; the result loads like any saved model.
    converted = tmp_path / "converted"
    assert convert_main([str(tmp_path), str(converted)]) == 0
    ours = ViTGPT2ForConditionalGeneration.from_pretrained(converted).eval()
    # The ViT's LayerNorm epsilon is saved with the model, not only set on the converted instance.
    assert ours.config.encoder_layer_norm_eps == reference.encoder.config.layer_norm_eps == 1e-12
    assert {module.eps for module in ours.encoder.modules() if isinstance(module, torch.nn.LayerNorm)} == {1e-12}
    processor = ViTGPT2Processor.from_pretrained(converted)
    image = torch.randint(0, 255, (40, 60, 3), dtype=torch.uint8).numpy()
    pixels = processor(images=[image, image])["pixel_values"]
    assert pixels.shape == (2, 3, 28, 28)
    assert torch.equal(
        reference.generate(pixel_values=pixels, num_beams=3, max_length=10),
        ours.generate(pixel_values=pixels, num_beams=3, max_length=10),
    )


def test_only_vit_and_gpt2_checkpoints_convert(tiny_tokenizer):
    reference = tiny_vision_encoder_decoder(tiny_tokenizer, 32)
    reference.decoder.config.add_cross_attention = False
    with pytest.raises(ValueError, match="cross-attention"):
        convert_vision_encoder_decoder(reference)
    # Unscaled attention scores: converted without a word, it captioned differently.
    with pytest.raises(ValueError, match="scale_attn_weights=False .* cannot be converted"):
        convert_vision_encoder_decoder(tiny_vision_encoder_decoder(tiny_tokenizer, 32, scale_attn_weights=False))


def test_a_gpt2_with_its_own_vocabulary_projection_converts_untied(tiny_tokenizer, tmp_path):
    """A GPT-2 whose `lm_head` is not its input embedding: the converted model had tied them, dropping the head."""
    reference = tiny_vision_encoder_decoder(tiny_tokenizer, 48, tie_word_embeddings=False)
    assert not torch.equal(reference.decoder.lm_head.weight, reference.decoder.transformer.wte.weight)
    convert_vision_encoder_decoder(reference).save_pretrained(tmp_path)
    ours = ViTGPT2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        difference = reference(pixel_values=pixels, decoder_input_ids=ids).logits - ours(
            pixel_values=pixels, decoder_input_ids=ids).logits
    assert difference.abs().max() < 1e-5
    assert torch.equal(reference.generate(pixel_values=pixels, num_beams=3, max_length=10),
                       ours.generate(pixel_values=pixels, num_beams=3, max_length=10))


def test_from_encoder_decoder_pretrained_loads_local_timm_and_gpt2_weights(tiny_tokenizer, tmp_path):
    """The path users take with `("vit_large_patch14_clip_224.openai", "openai-community/gpt2")`, offline: a timm
    weights file for the architecture, and a GPT-2 folder; only cross-attention may be new."""
    encoder_kwargs = dict(img_size=28, patch_size=14, embed_dim=48, depth=1, num_heads=2)
    torch.manual_seed(0)
    timm_model = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=0, **encoder_kwargs)
    weights_file = tmp_path / "vit.safetensors"
    save_file(timm_model.state_dict(), weights_file)
    end = tiny_tokenizer.eos_token_id
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tiny_tokenizer), n_positions=64,
                   bos_token_id=end, eos_token_id=end, resid_pdrop=0.15, initializer_range=0.03)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")

    model, info = ViTGPT2ForConditionalGeneration.from_encoder_decoder_pretrained(
        weights_file,
        tmp_path / "gpt2",
        encoder_name="vit_large_patch14_clip_224.openai",
        encoder_kwargs=encoder_kwargs,
        output_loading_info=True,
    )
    cross_attention = {
        f"decoder.h.{layer}.{name}"
        for layer in range(2)
        for name in [
            "ln_cross_attn.weight", "ln_cross_attn.bias",
            "crossattention.q_attn.weight", "crossattention.q_attn.bias",
            "crossattention.c_attn.weight", "crossattention.c_attn.bias",
            "crossattention.c_proj.weight", "crossattention.c_proj.bias",
        ]
    }
    assert set(info["newly_initialized"]) == cross_attention
    assert model.config.encoder_hidden_size == 48
    assert (model.config.resid_pdrop, model.config.initializer_range) == (0.15, 0.03)
    # A captioner built from pretrained parts decodes with 3 beams and up to 40 tokens, saved with it.
    assert (model.generation_config.num_beams, model.generation_config.max_length) == (3, 40)
    assert model.decoder.h[0].crossattention.c_attn.weight.shape == (48, 64)  # 48-d image tokens -> K and V
    for name, weight in timm_model.state_dict().items():
        torch.testing.assert_close(model.encoder.model.state_dict()[name], weight, rtol=0, atol=0)
    for name, weight in gpt2.state_dict().items():
        ours = model.state_dict()["lm_head.weight" if name == "lm_head.weight" else name.replace("transformer.", "decoder.")]
        torch.testing.assert_close(ours, weight, rtol=0, atol=0)

    processor = ViTGPT2Processor.from_timm_model(model.encoder.model, tiny_tokenizer)
    assert processor(images=torch.zeros(50, 70, 3, dtype=torch.uint8).numpy())["pixel_values"].shape == (1, 3, 28, 28)


def test_processor_reproduces_timms_pretrained_transform(tiny_tokenizer, shared_data):
    """`vit_large_patch14_clip_224.openai`'s transform (224 px, bicubic, crop_pct 1, CLIP mean/std) as saved with the
    model, compared on a real photo with timm's own pipeline."""
    from PIL import Image

    encoder = timm.create_model("vit_large_patch14_clip_224.openai", pretrained=False, num_classes=0, depth=1)
    processor = ViTGPT2Processor.from_timm_model(encoder, tiny_tokenizer)
    data_config = timm.data.resolve_model_data_config(encoder)
    assert data_config["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    transform = timm.data.create_transform(**data_config)
    image = Image.open(shared_data / "real_images" / "skimage" / "astronaut.png").convert("RGB")
    ours = processor(images=image)["pixel_values"][0]
    assert ours.shape == (3, 224, 224)
    assert (ours - transform(image)).abs().mean() < 1e-4
