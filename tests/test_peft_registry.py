"""A PEFT method is one record: registering a new one is all it takes to train, save and publish with it."""

import json

import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig

from conftest import training_arguments
from modeling_vitgpt2.applications.hub import build_model_card
from modeling_vitgpt2.inference.loading import load_for_inference
from modeling_vitgpt2.training.peft_methods import (
    CROSS_ATTENTION,
    PEFT_METHODS,
    PeftArguments,
    PeftMethod,
    apply_peft,
    peft_method,
    register_peft_method,
)
from modeling_vitgpt2.training.run import run_training


def mlp_lora(arguments, always_trained):
    return LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True, modules_to_save=always_trained)


@pytest.fixture()
def toy_method():
    method = register_peft_method(PeftMethod(
        name="mlp_lora", title="MLP LoRA", tag="mlp-lora", peft_config=mlp_lora,
        describe=lambda peft: "Rank-2 LoRA on the decoder's MLP input projections.",
    ))
    yield method
    del PEFT_METHODS[method.name]


def test_a_registered_method_trains_saves_and_is_carded(toy_method, shapes, pretrained_parts, tmp_path):
    output_dir = tmp_path / "mlp_lora"
    metrics = run_training(*training_arguments(shapes, pretrained_parts, output_dir, peft="mlp_lora", max_steps=2))
    assert "eval_cider" in metrics

    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["target_modules"] == ["c_fc"]
    model = load_for_inference(output_dir)
    lora_layers = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
    assert lora_layers and all(".mlp.c_fc." in name for name in lora_layers)
    assert any(CROSS_ATTENTION in name and "modules_to_save" in name for name, _ in model.named_modules())

    card = build_model_card(output_dir, "someone/mlp-lora")
    assert "mlp-lora" in card.data.tags
    assert "**Method: MLP LoRA.**" in card.content
    assert "Rank-2 LoRA on the decoder's MLP input projections." in card.content
    assert ModelCard(str(card)).data.library_name == "peft"


def test_an_unknown_method_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match="unknown PEFT method 'dora': registered are lora, adapter, prefix"):
        PeftArguments(peft="dora")
    with pytest.raises(ValueError, match="already registered"):
        register_peft_method(peft_method("lora"))


def test_a_registered_method_that_trains_a_copy_of_the_tied_embedding_is_refused(tiny_model):
    """A trained copy of `wte` (or of a module holding it) leaves the LM head on the original weight: unmerged they
    differ, merged the copy replaces the embedding and the LM head keeps the original."""
    def embedding_copy(arguments, always_trained):
        return LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True, modules_to_save=[*always_trained, "wte"])

    register_peft_method(PeftMethod(name="embedding_copy", title="embedding copy", peft_config=embedding_copy,
                                    describe=lambda peft: "LoRA on c_fc and a trained copy of the embedding."))
    try:
        with pytest.raises(ValueError, match=r"^--peft embedding_copy adapts decoder.wte, which shares its weight "
                                             r"with lm_head .*choose a method that leaves wte and lm_head frozen"):
            apply_peft(tiny_model, "embedding_copy", PeftArguments(peft="embedding_copy"))
    finally:
        del PEFT_METHODS["embedding_copy"]
