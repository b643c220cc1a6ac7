"""peft's own common test patterns (`PeftCommonTester`), run against ViTGPT2ForConditionalGeneration.

`PeftCommonTester` comes from peft 0.21.2's test files in `../shared/vendor/peft-tests` (imported from there, never
copied; the module skips when they are absent). As peft's own `test_custom_models.py` does for any torch model,
each test calls one of its `_test_*` checks for one peft set-up on a tiny model saved to a folder and loaded back
by path (the way users load a Hub id). The set-ups: LoRA on our default targets (with the cross-attention as
`modules_to_save`, as `train.py --peft lora` does) and on every decoder projection (cross-attention included), DoRA,
IA3, and our own adapter / prefix / cross-attention methods (LayerNorm tuning + the model's own modules, as
`modeling_vitgpt2.training.peft_methods` builds them).

Checks not run as they are, and why (each has a replacement here):
- `_test_mixed_adapter_batches`, `_test_generate_with_mixed_adapter_batches_and_beam_search`: they size
  `adapter_names` from `inputs["input_ids"]`, which an image captioner does not take;
  `test_mixed_adapter_batches_with_beam_search` runs the same comparison on images, greedy and with 4 beams.
- `_test_prepare_for_training`, `_test_passing_input_embeds_works`, `_test_generate_pos_args`,
  `_test_generate_half_prec`: built on the `input_ids` / `inputs_embeds` of a text model.
- `_test_disable_adapter`, `_test_unload_adapter`, `_test_merge_layers` for the LayerNorm-tuning set-ups (adapter, prefix,
  cross-attention): skipped with peft's reason below; `test_disable_adapter_restores_the_base_model_...` replaces them.
- `_test_training_gradient_checkpointing` for set-ups with `modules_to_save`: skipped with peft's reason below;
  `test_gradient_checkpointing_gives_the_same_gradients` compares gradients with and without checkpointing.
- `_test_safe_merge` runs on an untied model (reason below).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LNTuningConfig, LoraConfig

from vendored_suites import peft_suites

suites = peft_suites()

from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration  # noqa: E402
from modeling_vitgpt2.training.peft_methods import CROSS_ATTENTION, CROSS_ATTENTION_NORM, DEFAULT_LORA_TARGETS  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

ALL_DECODER_PROJECTIONS = r"decoder\.h\.\d+\.(attn\.(c_attn|c_proj)|crossattention\.(q_attn|c_attn|c_proj)|mlp\.(c_fc|c_proj))"
OWN_MODULES = {"adapter": ["attn_adapter", "cross_adapter"], "prefix": ["prefix"], "cross_attention": []}

# name -> (model config overrides, peft config class, peft config kwargs)
SETUPS = {
    "lora_default": ({}, LoraConfig, dict(target_modules=DEFAULT_LORA_TARGETS, fan_in_fan_out=True, r=4,
                                          init_lora_weights=False,
                                          modules_to_save=[CROSS_ATTENTION, CROSS_ATTENTION_NORM])),
    # peft's default rank (8): its weighted-combination check expects the ranks it derives from it.
    "lora_all_projections": ({}, LoraConfig, dict(target_modules=ALL_DECODER_PROJECTIONS, fan_in_fan_out=True,
                                                  init_lora_weights=False)),
    "dora": ({}, LoraConfig, dict(target_modules=ALL_DECODER_PROJECTIONS, fan_in_fan_out=True, use_dora=True,
                                  init_lora_weights=False)),
    "ia3": ({}, IA3Config, dict(target_modules=r"decoder\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)",
                                feedforward_modules=r"decoder\.h\.\d+\.mlp\.c_fc", fan_in_fan_out=True,
                                init_ia3_weights=False)),
    **{
        method: (
            {"adapter": {"adapter_bottleneck": 8}, "prefix": {"prefix_length": 3}}.get(method, {}),
            LNTuningConfig,
            dict(target_modules=[CROSS_ATTENTION_NORM], modules_to_save=[CROSS_ATTENTION] + OWN_MODULES[method]),
        )
        for method in OWN_MODULES
    },
}

CHECKS = [
    "_test_model_attr",
    "_test_adapter_name",
    "_test_save_pretrained",
    "_test_save_pretrained_selected_adapters",
    "_test_from_pretrained_config_construction",
    "_test_load_multiple_adapters",
    "_test_merge_layers",
    "_test_safe_merge",
    "_test_generate",
    "_test_training",
    "_test_inference_safetensors",
    "_test_disable_adapter",
    "_test_delete_adapter",
    "_test_unload_adapter",
    "_test_get_base_model_state_dict",
]


def tiny_config(**overrides) -> ViTGPT2Config:
    return ViTGPT2Config(
        encoder_name="vit_base_patch16_224",
        encoder_kwargs=dict(img_size=28, patch_size=14, embed_dim=48, depth=1, num_heads=2),
        encoder_hidden_size=48,
        vocab_size=99,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        decoder_start_token_id=0,
        **overrides,
    )


class ModelFolders:
    """Tiny models saved once per model config and loaded back by path in every check (as users load a Hub id)."""

    def __init__(self, root):
        self.root = root
        self.folders: dict[tuple, str] = {}

    def __call__(self, **overrides) -> str:
        key = tuple(sorted(overrides.items()))
        if key not in self.folders:
            torch.manual_seed(0)
            model = ViTGPT2ForConditionalGeneration(tiny_config(**overrides))
            if model.decoder.prefix is not None:
                torch.nn.init.normal_(model.decoder.prefix.keys_values, std=0.5)
            folder = self.root / f"captioner_{len(self.folders)}"
            model.save_pretrained(folder)
            self.folders[key] = str(folder)
        return self.folders[key]


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> ModelFolders:
    return ModelFolders(tmp_path_factory.mktemp("peft_models"))


class ViTGPT2PeftTester(suites.PeftCommonTester):
    transformers_class = ViTGPT2ForConditionalGeneration
    torch_device = "cpu"

    def prepare_inputs_for_testing(self):
        generator = torch.Generator().manual_seed(0)
        return {
            "pixel_values": torch.randn(2, 3, 28, 28, generator=generator),
            "decoder_input_ids": torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]]),
        }


@pytest.fixture()
def tester() -> ViTGPT2PeftTester:
    return ViTGPT2PeftTester()


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_peft_common(tester, model_folders, setup, check):
    overrides, config_cls, config_kwargs = SETUPS[setup]
    if check == "_test_safe_merge":
        # Its last step writes the merged state dict with `safetensors.save_file`, which refuses tensors that share
        # memory, as GPT-2's tied LM head and token embeddings do (`save_pretrained` handles the tie and is checked
        # by `_test_save_pretrained`): run it on an untied model.
        overrides = {**overrides, "tie_word_embeddings": False}
    if check in ("_test_disable_adapter", "_test_unload_adapter", "_test_merge_layers") and config_cls is LNTuningConfig:
        pytest.skip(
            "peft's check asserts that the freshly wrapped (or merged) model's output differs from the base model's; "
            "LayerNorm tuning and `modules_to_save` start as exact copies (peft has no init_weights=False for them), "
            "so it cannot: `test_disable_adapter_restores_the_base_model_and_merging_keeps_the_tuned_one` perturbs "
            "the copies, then checks disabling and unloading (merged)."
        )
    getattr(tester, check)(model_folders(**overrides), config_cls, copy.deepcopy(config_kwargs))


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_peft_training_with_gradient_checkpointing(tester, model_folders, setup, use_reentrant):
    overrides, config_cls, config_kwargs = SETUPS[setup]
    if config_kwargs.get("modules_to_save"):
        pytest.skip(
            "peft's check asserts that every parameter outside its tuner layers has no gradient, and does not except "
            "`modules_to_save` copies (its `_test_training` does): "
            "`test_gradient_checkpointing_gives_the_same_gradients` below covers these set-ups."
        )
    tester._test_training_gradient_checkpointing(
        model_folders(**overrides), config_cls, copy.deepcopy(config_kwargs), use_reentrant=use_reentrant
    )


def test_peft_weighted_combination_of_lora_adapters(tester, model_folders):
    overrides, config_cls, config_kwargs = SETUPS["lora_all_projections"]
    tester._test_weighted_combination_of_adapters(model_folders(**overrides), config_cls, copy.deepcopy(config_kwargs))


@pytest.mark.parametrize("setup", ["adapter", "prefix", "cross_attention"])
def test_disable_adapter_restores_the_base_model_and_merging_keeps_the_tuned_one(model_folders, setup):
    from peft import get_peft_model

    overrides, config_cls, config_kwargs = SETUPS[setup]
    model = ViTGPT2ForConditionalGeneration.from_pretrained(model_folders(**overrides)).eval()
    inputs = ViTGPT2PeftTester().prepare_inputs_for_testing()
    with torch.no_grad():
        base = model(**inputs).logits
        peft_model = get_peft_model(model, config_cls(**copy.deepcopy(config_kwargs))).eval()
        for parameter in peft_model.parameters():
            if parameter.requires_grad:  # as if trained
                parameter.add_(torch.randn_like(parameter) * 0.5)
        tuned = peft_model(**inputs).logits
        assert not torch.allclose(tuned, base)
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(**inputs).logits, base, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(peft_model(**inputs).logits, tuned, rtol=1e-6, atol=1e-6)
        # Merged back into the plain model class, the tuned modules give the tuned outputs.
        merged = peft_model.merge_and_unload()
        assert type(merged) is ViTGPT2ForConditionalGeneration
        torch.testing.assert_close(merged(**inputs).logits, tuned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("setup", ["lora_default", "adapter", "prefix", "cross_attention"])
def test_gradient_checkpointing_gives_the_same_gradients(model_folders, setup, use_reentrant):
    """`--peft prefix --gradient_checkpointing` used to crash in backward (the recomputed block appended the prefix
    to a throwaway cache a second time); every set-up must train with the same gradients as without."""
    from peft import get_peft_model

    overrides, config_cls, config_kwargs = SETUPS[setup]
    model = ViTGPT2ForConditionalGeneration.from_pretrained(model_folders(**overrides), attn_pdrop=0.0,
                                                            resid_pdrop=0.0, embd_pdrop=0.0)
    model = get_peft_model(model, config_cls(**copy.deepcopy(config_kwargs))).train()
    inputs = ViTGPT2PeftTester().prepare_inputs_for_testing()
    labels = inputs["decoder_input_ids"].roll(-1, dims=1)
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]

    def gradients():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {name: parameter.grad.clone() for name, parameter in trainable if parameter.grad is not None}

    expected = gradients()
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    checkpointed = gradients()
    assert expected.keys() == checkpointed.keys() == {name for name, _ in trainable}
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-6, msg=name)
    if setup == "prefix":
        assert any(".prefix." in name and gradient.abs().sum() > 0 for name, gradient in expected.items())


@pytest.mark.parametrize("num_beams", [1, 4])
def test_mixed_adapter_batches_with_beam_search(model_folders, num_beams):
    """peft's `_test_mixed_adapter_batches` / `..._and_beam_search` on images: each image row picks its adapter
    with `adapter_names=`, LoRA on every decoder projection (the cross-attention's image-side key/value projection
    included), and every row must match a run of that adapter alone."""
    from peft import get_peft_model

    overrides, config_cls, config_kwargs = SETUPS["lora_all_projections"]
    torch.manual_seed(0)
    model = ViTGPT2ForConditionalGeneration.from_pretrained(model_folders(**overrides))
    model = get_peft_model(model, config_cls(**copy.deepcopy(config_kwargs)), adapter_name="adapter0")
    model.add_adapter("adapter1", config_cls(**copy.deepcopy(config_kwargs)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # make the adapters matter, as peft's check does
                parameter.mul_(10.0)
    model.eval()
    pixel_values = torch.cat([ViTGPT2PeftTester().prepare_inputs_for_testing()["pixel_values"]] * 3)
    adapters = ["__base__", "adapter0", "adapter1"]
    adapter_names = [adapters[index % 3] for index in range(len(pixel_values))]
    settings = dict(pixel_values=pixel_values, num_beams=num_beams, max_new_tokens=6, min_new_tokens=6,
                    return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        mixed = model.generate(**settings, adapter_names=adapter_names)
        with model.disable_adapter():
            alone = {"__base__": model.generate(**settings)}
        for adapter in ("adapter0", "adapter1"):
            model.set_adapter(adapter)
            alone[adapter] = model.generate(**settings)
    assert not torch.equal(alone["adapter0"].sequences, alone["adapter1"].sequences)
    for index, adapter in enumerate(adapter_names):
        assert torch.equal(mixed.sequences[index], alone[adapter].sequences[index]), (index, adapter)
