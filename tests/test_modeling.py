"""The model: forward and loss, generation with and without cache, beam search, attention weights, shape errors."""

import pytest
import torch

from conftest import tiny_config_kwargs
from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration

GENERATE = dict(max_length=12, do_sample=False)


def random_pixels(images: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(images, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_loss_is_token_cross_entropy_ignoring_padding(tiny_model):
    pixels = random_pixels(2)
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    output = tiny_model(pixel_values=pixels, labels=labels)
    assert output.logits.shape == (2, 4, tiny_model.config.vocab_size)
    kept = labels != -100
    expected = torch.nn.functional.cross_entropy(output.logits[kept], labels[kept])
    torch.testing.assert_close(output.loss, expected)
    # Trainer's gradient-accumulation convention: a sum over the tokens divided by the whole batch's count.
    halved = tiny_model(pixel_values=pixels, labels=labels, num_items_in_batch=2 * int(kept.sum())).loss
    torch.testing.assert_close(halved, expected / 2)


def test_decoder_inputs_derived_from_labels_start_with_the_start_token(tiny_model):
    pixels = random_pixels(1)
    labels = torch.tensor([[5, 6, 7, tiny_model.config.eos_token_id]])
    explicit = torch.tensor([[tiny_model.config.decoder_start_token_id, 5, 6, 7]])
    torch.testing.assert_close(
        tiny_model(pixel_values=pixels, labels=labels).logits,
        tiny_model(pixel_values=pixels, decoder_input_ids=explicit).logits,
    )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_matches_one_image_at_a_time(tiny_model, num_beams):
    pixels = random_pixels(3)
    batched = tiny_model.generate(pixel_values=pixels, num_beams=num_beams, **GENERATE)
    for index in range(3):
        alone = tiny_model.generate(pixel_values=pixels[index : index + 1], num_beams=num_beams, **GENERATE)
        row = batched[index, : alone.shape[1]]
        assert torch.equal(row, alone[0])
        assert (batched[index, alone.shape[1] :] == tiny_model.config.pad_token_id).all()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_and_uncached_decoding_give_identical_captions(tiny_model, num_beams):
    pixels = random_pixels(4, seed=1)
    cached = tiny_model.generate(pixel_values=pixels, num_beams=num_beams, use_cache=True, **GENERATE)
    uncached = tiny_model.generate(pixel_values=pixels, num_beams=num_beams, use_cache=False, **GENERATE)
    assert torch.equal(cached, uncached)


def test_generation_settings_come_from_generation_config_json(tiny_model, tmp_path):
    # The model's defaults (3 beams, 40 tokens) live in the saved generation_config.json, never in __init__, so a
    # user's or a checkpoint's settings are what `generate` uses.
    assert tiny_model.generation_config.num_beams in (None, 1)
    tiny_model.generation_config.num_beams = 2
    tiny_model.save_pretrained(tmp_path)
    loaded = ViTGPT2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.generation_config.num_beams == 2
    pixels = random_pixels(2, seed=2)
    assert torch.equal(
        loaded.generate(pixel_values=pixels, **GENERATE),
        loaded.generate(pixel_values=pixels, num_beams=2, **GENERATE),
    )


def test_cross_attention_keys_values_are_projected_once_per_image_per_generate_call(tiny_model):
    rows_seen = []
    hooks = [
        block.crossattention.c_attn.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape[0]))
        for block in tiny_model.decoder.h
    ]
    images = 4
    sequences = tiny_model.generate(pixel_values=random_pixels(images), num_beams=3, min_new_tokens=6, **GENERATE)
    for hook in hooks:
        hook.remove()
    assert sequences.shape[1] > 2, "generation must run several steps for this check to mean anything"
    # One projection per layer for the whole call, at one row per image (not one per beam).
    assert rows_seen == [images] * tiny_model.config.n_layer


def test_cross_attention_layers_can_be_a_subset(tiny_tokenizer):
    config = ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer, n_layer=3, cross_attention_layers=[1]))
    model = ViTGPT2ForConditionalGeneration(config).eval()
    assert [block.crossattention is not None for block in model.decoder.h] == [False, True, False]
    model.set_attn_implementation("eager")
    out = model.generate(pixel_values=random_pixels(2), output_attentions=True, return_dict_in_generate=True, **GENERATE)
    assert len(out.cross_attentions[0]) == 1


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_generate_returns_real_cross_attention_weights(tiny_model, implementation):
    tiny_model.set_attn_implementation(implementation)
    images, beams = 2, 3
    out = tiny_model.generate(
        pixel_values=random_pixels(images),
        num_beams=beams,
        output_attentions=True,
        return_dict_in_generate=True,
        min_new_tokens=4,
        **GENERATE,
    )
    image_tokens = 1 + (28 // 14) ** 2
    assert out.beam_indices.shape[0] == images
    assert len(out.cross_attentions) == out.sequences.shape[1] - 1
    for step in out.cross_attentions:
        assert len(step) == tiny_model.config.n_layer
        for layer in step:
            assert layer.shape == (images * beams, tiny_model.config.n_head, 1, image_tokens)
            torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:-1]))


def test_sdpa_and_eager_give_the_same_logits(tiny_model):
    pixels, ids = random_pixels(2), torch.randint(0, 50, (2, 7))
    tiny_model.set_attn_implementation("sdpa")
    sdpa = tiny_model(pixel_values=pixels, decoder_input_ids=ids).logits
    tiny_model.set_attn_implementation("eager")
    eager = tiny_model(pixel_values=pixels, decoder_input_ids=ids).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_left_padded_prompts_continue_like_unpadded_ones(tiny_model):
    start = tiny_model.config.decoder_start_token_id
    pad = tiny_model.config.pad_token_id
    pixels = random_pixels(2, seed=3)
    prompts = torch.tensor([[start, 11, 12, 13], [pad, pad, start, 20]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    batched = tiny_model.generate(
        pixel_values=pixels, decoder_input_ids=prompts, decoder_attention_mask=mask, num_beams=1, **GENERATE
    )
    alone = tiny_model.generate(
        pixel_values=pixels[1:], decoder_input_ids=torch.tensor([[start, 20]]), num_beams=1, max_length=10,
        do_sample=False,
    )
    assert torch.equal(batched[1, 2 : 2 + alone.shape[1]], alone[0])


def test_rows_must_be_a_whole_number_per_image(tiny_model):
    with pytest.raises(ValueError, match="rows per image"):
        tiny_model(pixel_values=random_pixels(2), decoder_input_ids=torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize(
    "shape, message",
    [((2, 3, 32, 32), r"\(batch, 3, 28, 28\)"), ((2, 1, 28, 28), "shape"), ((3, 28, 28), "shape")],
)
def test_pixel_values_of_the_wrong_shape_get_a_clear_error(tiny_model, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(pixel_values=torch.zeros(shape), max_length=4)


def test_missing_inputs_get_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="pixel_values"):
        tiny_model(decoder_input_ids=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_input_ids"):
        tiny_model(pixel_values=random_pixels(1))


def test_encoder_width_mismatch_is_reported(tiny_tokenizer):
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tiny_tokenizer, encoder_hidden_size=64)))


def test_weights_are_tied(tiny_model):
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.decoder.wte.weight.data_ptr()


def test_lm_head_inference_form_is_the_same_product_as_training(tiny_model):
    # Under no_grad on CPU the LM head computes (weight @ hidden.T).T, BLAS's fast form for a few rows.
    hidden = torch.randn(2, 5, tiny_model.config.n_embd, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        inference = tiny_model.lm_head(hidden)
    training = tiny_model.lm_head(hidden)
    assert training.requires_grad and not inference.requires_grad
    assert inference.shape == (2, 5, tiny_model.config.vocab_size) and inference.is_contiguous()
    torch.testing.assert_close(inference, training.detach())
