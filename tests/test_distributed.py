"""Beyond one process: the accelerate configs for FSDP and DeepSpeed, and the refusal of a sharding config that
accelerate would silently run as plain data-parallel."""

import json
from pathlib import Path

import pytest
import timm
from accelerate import PartialState
from accelerate.commands.config.config_args import load_config_from_file

from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration
from modeling_vitgpt2.training import check_requested_sharding

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
