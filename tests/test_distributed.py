"""Beyond one process: FSDP on the CPU through accelerate, the configs for FSDP and DeepSpeed, and the refusal of a
DeepSpeed config that accelerate would silently run as plain data-parallel."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from accelerate import PartialState
from accelerate.commands.config.config_args import load_config_from_file

from conftest import REPO, training_arguments
from helpers import environment, logged_losses, train_command
from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration
from modeling_vitgpt2.data.synthetic import write_synthetic_coco
from modeling_vitgpt2.training.run import check_requested_sharding, run_training

CONFIGS = REPO / "configs" / "accelerate"


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


def test_a_deepspeed_config_that_accelerate_would_ignore_is_refused(monkeypatch):
    # `accelerate launch` with use_cpu: true sets this variable but runs plain data-parallel (MULTI_CPU).
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="runs on GPUs only: here it would train this job as"):
        check_requested_sharding(PartialState())
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    check_requested_sharding(PartialState())


def test_the_cpu_fsdp_config_is_the_gpu_one_on_two_cpu_processes():
    gpu, cpu = (load_config_from_file(str(CONFIGS / name)) for name in ("fsdp_full_finetune.yaml", "fsdp_cpu.yaml"))
    assert cpu.use_cpu and cpu.num_processes == 2 and cpu.fsdp_config == gpu.fsdp_config


def test_the_feature_cache_leaves_an_fsdp_sharded_encoder_to_fsdp(tmp_path):
    # Under FSDP (as with configs/accelerate/fsdp_cpu.yaml and --cache_encoder_features) the encoder's weights are
    # DTensor shards: paging them out crashed the run ("invalid python storage"); each process holds its share only.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from modeling_vitgpt2.training.run import PageOutEncoderCallback

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(
            encoder_name="vit_large_patch14_clip_224", encoder_kwargs={"img_size": 28, "patch_size": 14,
                                                                       "embed_dim": 32, "depth": 1, "num_heads": 2},
            encoder_hidden_size=32, n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
        ))
        model.get_encoder().requires_grad_(False)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        callback = PageOutEncoderCallback(model, tmp_path / "feature-cache")
        callback.on_train_begin(None, None, None)
        callback.on_train_end(None, None, None)
        assert all(isinstance(parameter, DTensor) for parameter in model.get_encoder().parameters())
        assert not (tmp_path / "feature-cache").exists()
    finally:
        torch.distributed.destroy_process_group()


def launch_training(config: Path, data, pretrained_parts, output_dir: Path, *extra: str) -> dict:
    """Two processes of train.py from `accelerate launch`, full fine-tuning with the encoder, 3 steps; the summary."""
    with socket.socket() as probe:  # a free port: a fixed one collides with another test run on the same machine
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_ip", "127.0.0.1", "--main_process_port", port,
               *train_command(data, pretrained_parts, output_dir, "--peft", "full", "--train_encoder", "true",
                              "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3",
                              "--per_device_eval_batch_size", "2", *extra)]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output_dir / "training_summary.json").read_text())


def test_fsdp_on_two_cpu_processes_shards_the_weights_and_trains_as_data_parallel(pretrained_parts, tmp_path):
    # Five validation images, captioned two at a time: process 0 has two batches, process 1 one (and a spare).
    data = write_synthetic_coco(tmp_path / "data", num_train=8, num_val=5, seed=2, image_size=32)
    ddp_config = tmp_path / "ddp.yaml"
    ddp_config.write_text("distributed_type: MULTI_GPU\nuse_cpu: true\nnum_machines: 1\nnum_processes: 2\n")
    ddp = launch_training(ddp_config, data, pretrained_parts, tmp_path / "ddp")
    fsdp = launch_training(CONFIGS / "fsdp_cpu.yaml", data, pretrained_parts, tmp_path / "fsdp")

    assert (ddp["distributed_type"], fsdp["distributed_type"]) == ("MULTI_CPU", "FSDP")
    total = fsdp["total_parameters"]
    assert ddp["parameters_held_per_process"] == [total, total]
    held = fsdp["parameters_held_per_process"]
    assert sum(held) == total and max(held) < 0.6 * total, held  # each process holds about half, not all
    # Sharded gradients and optimizer states train as data-parallel does: the same losses, the same weights.
    assert logged_losses(tmp_path / "fsdp") == pytest.approx(logged_losses(tmp_path / "ddp"), abs=1e-4)
    saved = ViTGPT2ForConditionalGeneration.from_pretrained(tmp_path / "fsdp").state_dict()
    # The step-3 checkpoint holds the same weights, gathered by accelerate's own FSDP checkpointing.
    gathered = torch.load(tmp_path / "fsdp" / "checkpoint-3" / "pytorch_model_fsdp.bin")
    assert gathered.keys() == saved.keys()
    assert all(torch.equal(saved[name], weight) for name, weight in gathered.items())
    replicated = ViTGPT2ForConditionalGeneration.from_pretrained(tmp_path / "ddp").state_dict()
    assert saved.keys() == replicated.keys()
    for name, weight in saved.items():
        # Attention key biases get no gradient (softmax ignores a shift), so Adam turns rounding noise into steps
        # of up to the learning rate (1e-2): there the two runs may part by more.
        tolerance = 3e-2 if name.endswith(("c_attn.bias", "qkv.bias")) else 1e-4
        assert torch.allclose(weight, replicated[name], atol=tolerance), name
    # Saved as the model's own class: its remote code, not torch's FSDP sources.
    auto_map = json.loads((tmp_path / "fsdp" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_vitgpt2.ViTGPT2ForConditionalGeneration"
    assert not list((tmp_path / "fsdp").glob("_fsdp*.py"))
    assert len(json.loads((tmp_path / "fsdp" / "eval_predictions.json").read_text())) == 5

    # bf16 autocast and activation checkpointing under FSDP: close to the float32 run.
    both = tmp_path / "fsdp-bf16-checkpointing"
    launch_training(CONFIGS / "fsdp_cpu.yaml", data, pretrained_parts, both, "--bf16", "true",
                    "--activation_checkpointing", "true")
    assert logged_losses(both) == pytest.approx(logged_losses(tmp_path / "fsdp"), abs=0.05)
    assert logged_losses(both) != logged_losses(tmp_path / "fsdp")  # bf16 did run


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision and gradient checkpointing: flags of train.py that work with PEFT


def first_losses(shapes, pretrained_parts, output_dir, peft="lora", train_encoder=False, feature_cache=None,
                 **training):
    model_args, data_args, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, output_dir, peft=peft, max_steps=3, save_strategy="steps", save_steps=3,
        per_device_train_batch_size=4, **training)
    peft_args.train_encoder = train_encoder
    if feature_cache is not None:
        data_args.cache_encoder_features, data_args.feature_cache_dir = True, str(feature_cache)
    run_training(model_args, data_args, peft_args, training_args)
    return logged_losses(output_dir)


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


@pytest.mark.parametrize("peft, train_encoder, cached", [("lora", False, False), ("full", True, False),
                                                          ("lora", False, True)],
                         ids=["lora", "full_with_encoder", "lora_with_feature_cache"])
def test_checkpointing_keeps_the_losses_and_bf16_autocast_stays_close(shapes, pretrained_parts, tmp_path, peft,
                                                                      train_encoder, cached):
    # With the feature cache every run reads the features the first one stored (float16); the decoder trains on them.
    settings = dict(train_encoder=train_encoder, feature_cache=tmp_path / "feature-cache" if cached else None)
    reference = first_losses(shapes, pretrained_parts, tmp_path / "fp32", peft, **settings)
    checkpointed = first_losses(shapes, pretrained_parts, tmp_path / "checkpointed", peft,
                                activation_checkpointing=True, **settings)
    # Recomputing activations changes nothing: the same losses, step after step (so the same gradients).
    assert checkpointed == pytest.approx(reference, abs=1e-5)
    both = first_losses(shapes, pretrained_parts, tmp_path / "bf16", peft, activation_checkpointing=True, bf16=True,
                        **settings)
    # bf16 keeps 8 bits of mantissa: losses of about 6 agree to a few hundredths over the first steps.
    assert both == pytest.approx(reference, abs=0.05) and both != reference
