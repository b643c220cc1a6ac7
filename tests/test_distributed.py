"""Beyond one process: the accelerate configs for FSDP and DeepSpeed, and the refusal of a sharding config that
accelerate would silently run as plain data-parallel."""

import json
from pathlib import Path

import pytest
import timm
from accelerate import PartialState
from accelerate.commands.config.config_args import load_config_from_file

from conftest import training_arguments
from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration
from modeling_vitgpt2.training import check_requested_sharding, run_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def test_the_fsdp_config_wraps_blocks_that_exist_in_the_model():
    config = load_config_from_file(str(CONFIGS / "fsdp_full_finetune.yaml"))
    assert config.distributed_type == "FSDP" and not config.use_cpu
    wrapped = set(config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(
        encoder_name="vit_large_patch14_clip_224", encoder_kwargs={"img_size": 28, "patch_size": 14, "embed_dim": 32,
                                                                   "depth": 1, "num_heads": 2},
        encoder_hidden_size=32, n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
    ))
    present = {type(module).__name__ for module in model.modules()}
    assert wrapped <= present, f"FSDP would not wrap {wrapped - present}: the model's block classes are renamed"
    assert isinstance(model.encoder.model.blocks[0], timm.models.vision_transformer.Block)


def test_the_deepspeed_config_parses_and_leaves_the_shared_settings_to_trainer():
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert config.distributed_type == "DEEPSPEED"
    settings = json.loads((CONFIGS.parents[1] / config.deepspeed_config["deepspeed_config_file"]).read_text())
    assert settings["zero_optimization"]["stage"] == 2
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert settings[key] == "auto"  # filled in from train.py's flags, so the two cannot disagree


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharding_config_that_accelerate_would_ignore_is_refused(monkeypatch, variable):
    # `accelerate launch` with use_cpu: true sets this variable but runs plain data-parallel (MULTI_CPU).
    monkeypatch.setenv(variable, "true")
    with pytest.raises(RuntimeError, match="accelerate is running this job as"):
        check_requested_sharding(PartialState())
    monkeypatch.delenv(variable)
    check_requested_sharding(PartialState())


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision and gradient checkpointing: flags of train.py that work with PEFT


def first_losses(shapes, pretrained_parts, output_dir, peft="lora", train_encoder=False, **training):
    model_args, data_args, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, output_dir, peft=peft, max_steps=3, save_strategy="steps", save_steps=3,
        per_device_train_batch_size=4, **training)
    peft_args.train_encoder = train_encoder
    run_training(model_args, data_args, peft_args, training_args)
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_gradient_checkpointing_reaches_the_timm_encoder():
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(
        encoder_name="vit_large_patch14_clip_224", encoder_kwargs={"img_size": 28, "patch_size": 14, "embed_dim": 32,
                                                                   "depth": 1, "num_heads": 2},
        encoder_hidden_size=32, n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
    ))
    model.activation_checkpointing_enable()
    assert model.encoder.model.grad_checkpointing and model.decoder.h[0].gradient_checkpointing
    model.activation_checkpointing_disable()
    assert not model.encoder.model.grad_checkpointing


@pytest.mark.parametrize("peft, train_encoder", [("lora", False), ("full", True)], ids=["lora", "full_with_encoder"])
def test_checkpointing_keeps_the_losses_and_bf16_autocast_stays_close(shapes, pretrained_parts, tmp_path, peft,
                                                                      train_encoder):
    reference = first_losses(shapes, pretrained_parts, tmp_path / "fp32", peft, train_encoder=train_encoder)
    checkpointed = first_losses(shapes, pretrained_parts, tmp_path / "checkpointed", peft,
                                train_encoder=train_encoder, activation_checkpointing=True)
    # Recomputing activations changes nothing: the same losses, step after step (so the same gradients).
    assert checkpointed == pytest.approx(reference, abs=1e-5)
    both = first_losses(shapes, pretrained_parts, tmp_path / "bf16", peft, train_encoder=train_encoder,
                        activation_checkpointing=True, bf16=True)
    # bf16 keeps 8 bits of mantissa: losses of about 6 agree to a few hundredths over the first steps.
    assert both == pytest.approx(reference, abs=0.05) and both != reference
