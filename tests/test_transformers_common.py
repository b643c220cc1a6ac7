"""transformers' own common test suites, run against ViTGPT2ForConditionalGeneration as outsiders would.

`ModelTesterMixin`, `GenerationTesterMixin` and `ConfigTester` come from transformers 5.24's test files in
`../shared/vendor/transformers-tests` (imported from there, never copied; see tests/vendored_suites.py); the module
skips when they are absent. The model tester follows transformers' own image-to-text testers
(`tests/models/pix2struct`, `blip`, `git`): a tiny config, random images and captions. A second tester makes the
encoder wider than the decoder, so the cross-attention's key/value projection really maps one width to the other.
The suites' slow-marked tests that run on a CPU (eager vs SDPA generate, static cache, torch.compile, torch.export)
run too (RUN_SLOW=0 leaves them out).

Every skip, and why it does not apply (per test class; the suites' own skip messages name them):
- Hardware or libraries this CPU test run does not have: Flash Attention 2/3/4 (GPU kernels), accelerator, multiple
  accelerators and MPS tests, DeepSpeed, the `kernels` library, optimum-quanto (quantized cache), ONNXScript /
  ONNX Runtime and ExecuTorch (the torch.export tests do run).
- Decoder-only machinery: "Model is an encoder-decoder", "This model is encoder-decoder (and has an Encoder-Decoder
  Cache)", "No decoder-only architecture/language modeling head": left-padding, padding-free and
  continue-from-inputs_embeds tests written for causal LMs.
- Inputs a captioner does not take: `inputs_embeds` (the decoder starts from a start token, the image comes in as
  pixels), `position_ids` (GPT-2's learned positions follow the cache and the padding mask), `logits_to_keep` (the
  prompt is one start token, so there is nothing to trim; the suite's test also reads `input_ids`).
- Architecture features it has none of: RoPE (4 tests, "no `base_model_class`": GPT-2 has learned positions),
  sliding-window masks, sparse experts / router logits / grouped_mm, recurrent layers, MTP heads, a tensor-parallel
  plan, `_keep_in_fp32_modules`, weight-conversion mappings ("No conversion found"), sub-configs / composite
  configs ("No subconfigs", "not composite", "does not support SDPA" is the composite-dispatch test), transformers'
  `capture_outputs` decorator, position-embedding resizing.
- Registration: "ViTGPT2Config not in MODEL_MAPPING" (a remote-code model is registered with the Auto classes at
  import, not in transformers' own mapping).
- `test_generate_without_input_ids`, `test_resize_tokens_embeddings`, `test_resize_embeddings_untied` and, for the
  wider encoder, `test_hidden_states_output`: skipped below with their reasons, each replaced by an equivalent test.
"""

from __future__ import annotations

import unittest

import pytest
import torch

from vendored_suites import transformers_suites

suites = transformers_suites()

from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class ViTGPT2ModelTester:
    def __init__(
        self,
        parent,
        batch_size=2,
        image_size=28,
        patch_size=14,
        encoder_hidden_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=99,
        seq_length=7,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = 3
        self.encoder_hidden_size = encoder_hidden_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.decoder_seq_length = seq_length
        self.is_training = is_training
        # The encoder's tokens: a class token, then one per patch.
        self.encoder_seq_length = (image_size // patch_size) ** 2 + 1
        self.key_length = self.encoder_seq_length
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 1, 0, 2

    def get_config(self) -> ViTGPT2Config:
        return ViTGPT2Config(
            encoder_name="vit_base_patch16_224",
            encoder_kwargs=dict(
                img_size=self.image_size,
                patch_size=self.patch_size,
                embed_dim=self.encoder_hidden_size,
                depth=self.num_hidden_layers,
                num_heads=self.num_attention_heads,
                mlp_ratio=2.0,
            ),
            encoder_hidden_size=self.encoder_hidden_size,
            vocab_size=self.vocab_size,
            n_positions=64,
            n_embd=self.hidden_size,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_inner=37,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            decoder_start_token_id=self.bos_token_id,
        )

    def prepare_config_and_inputs(self):
        pixel_values = suites.floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        decoder_input_ids = suites.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        decoder_input_ids[:, 0] = self.bos_token_id
        decoder_attention_mask = torch.ones_like(decoder_input_ids)
        return self.get_config(), pixel_values, decoder_input_ids, decoder_attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, decoder_input_ids, decoder_attention_mask = self.prepare_config_and_inputs()
        inputs = {
            "pixel_values": pixel_values,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
        }
        return config, inputs


class ViTGPT2ModelTest(suites.ModelTesterMixin, suites.GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (ViTGPT2ForConditionalGeneration,)
    all_generative_model_classes = (ViTGPT2ForConditionalGeneration,)
    is_encoder_decoder = True
    # The suite skips this for models older than 2023 unless asked; ours must initialise every weight it adds.
    test_can_init_all_missing_weights_before_2023 = True
    tester_kwargs: dict = {}

    def setUp(self):
        self.model_tester = ViTGPT2ModelTester(self, **self.tester_kwargs)
        self.config_tester = suites.ConfigTester(
            self, config_class=ViTGPT2Config, has_text_modality=True, n_embd=32, n_layer=2, n_head=2
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The suite adds labels only for classes in transformers' own task mappings; a captioner's labels are the
        # caption tokens, aligned with the logits (as BLIP's and GIT's testers add them).
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = inputs_dict["decoder_input_ids"].clone()
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    # Skipped, each for a reason that holds for every image-to-text model (transformers' own BLIP, Pix2Struct and
    # GIT testers skip or override the same tests):

    @unittest.skip(reason="A caption is generated from an image: `generate()` without `pixel_values` has nothing to "
                   "describe and raises (Pix2Struct and BLIP skip this test for the same reason).")
    def test_generate_without_input_ids(self):
        pass

    @unittest.skip(reason="The suite writes new token ids into `inputs_dict['input_ids']`, which an image-to-text "
                   "model does not take (Pix2Struct overrides this test for the same reason); "
                   "`test_resize_token_embeddings_of_the_caption_decoder` below runs the same checks on "
                   "`decoder_input_ids`.")
    def test_resize_tokens_embeddings(self):
        pass

    @unittest.skip(reason="Writes into `inputs_dict['input_ids']` like the test above; "
                   "`test_resize_token_embeddings_of_the_caption_decoder` covers untied embeddings too.")
    def test_resize_embeddings_untied(self):
        pass

    def test_resize_token_embeddings_of_the_caption_decoder(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ViTGPT2ForConditionalGeneration(config).eval()
        vocab_size = config.vocab_size
        embeddings = model.resize_token_embeddings(vocab_size + 10)
        self.assertEqual(model.config.vocab_size, vocab_size + 10)
        self.assertEqual(embeddings.weight.shape[0], vocab_size + 10)
        # The LM head is tied to the token embeddings, so it grows with them.
        self.assertIs(model.lm_head.weight, model.decoder.wte.weight)
        inputs["decoder_input_ids"][:, -2] = vocab_size + 9
        self.assertEqual(model(**inputs).logits.shape[-1], vocab_size + 10)
        model.resize_token_embeddings(vocab_size - 15)
        inputs["decoder_input_ids"].clamp_(max=vocab_size - 16)
        self.assertEqual(model(**inputs).logits.shape[-1], vocab_size - 15)

        config.tie_word_embeddings = False
        untied = ViTGPT2ForConditionalGeneration(config).eval()
        untied.resize_token_embeddings(vocab_size + 10)
        self.assertIsNot(untied.lm_head.weight, untied.decoder.wte.weight)
        self.assertEqual(untied.lm_head.weight.shape[0], vocab_size + 10)
        self.assertEqual(untied(**inputs).logits.shape[-1], vocab_size + 10)


class ViTGPT2WiderEncoderModelTest(ViTGPT2ModelTest):
    """The same suites with 48-wide image tokens feeding a 32-wide decoder."""

    tester_kwargs = {"encoder_hidden_size": 48}

    def _check_encoder_hidden_states_for_generate(self, hidden_states, batch_size, config, prompt_length):
        # The suite assumes encoder width == decoder width (`config.hidden_size`); here the encoder is wider.
        expected = (batch_size, prompt_length, self.model_tester.encoder_hidden_size)
        self.assertListEqual([tuple(layer.shape) for layer in hidden_states], [expected] * len(hidden_states))

    @unittest.skip(reason="Checks the encoder's hidden states against the decoder's `hidden_size`; the equal-width "
                   "class above runs it, and `test_encoder_hidden_states_have_the_encoder_width` covers this one.")
    def test_hidden_states_output(self):
        pass

    def test_encoder_hidden_states_have_the_encoder_width(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ViTGPT2ForConditionalGeneration(config).eval()
        with torch.no_grad():
            outputs = model(**inputs, output_hidden_states=True)
        tester = self.model_tester
        expected_encoder = (tester.batch_size, tester.encoder_seq_length, tester.encoder_hidden_size)
        expected_decoder = (tester.batch_size, tester.seq_length, tester.hidden_size)
        self.assertEqual(len(outputs.encoder_hidden_states), tester.num_hidden_layers + 1)
        self.assertEqual({tuple(h.shape) for h in outputs.encoder_hidden_states}, {expected_encoder})
        self.assertEqual({tuple(h.shape) for h in outputs.decoder_hidden_states}, {expected_decoder})
