"""What bench_generate.py and bench_train.py share: the model shapes, the peer model and its conversion, the machine
description, its matmul throughput, the profiler's top ops and writing the report."""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F
from torch.profiler import ProfilerActivity
from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration
from modeling_vitgpt2.model.convert_vision_encoder_decoder import convert_vision_encoder_decoder
from modeling_vitgpt2.utils.cpu_features import relevant_cpu_flags
from modeling_vitgpt2.utils.io import write_json_atomic


@dataclass(frozen=True)
class ModelShape:
    """A ViT (patch `patch_size` at `image_size` px) + GPT-2 with cross-attention, both from scratch."""

    image_size: int
    patch_size: int
    encoder_width: int
    encoder_layers: int
    encoder_heads: int
    encoder_mlp_width: int
    decoder_width: int
    decoder_layers: int
    decoder_heads: int
    vocab_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS


def build_models(
    shape: ModelShape, seed: int
) -> tuple[VisionEncoderDecoderModel, ViTGPT2ForConditionalGeneration]:
    """The peer (a ViTModel + GPT-2 `VisionEncoderDecoderModel`) with random weights and dropout off, and ours
    converted from it with `convert_vision_encoder_decoder`: the same weights, so the same function."""
    torch.manual_seed(seed)
    end_of_text = shape.vocab_size - 1
    encoder = ViTConfig(
        hidden_size=shape.encoder_width, num_hidden_layers=shape.encoder_layers,
        num_attention_heads=shape.encoder_heads, intermediate_size=shape.encoder_mlp_width,
        image_size=shape.image_size, patch_size=shape.patch_size,
        layer_norm_eps=1e-6,  # timm's, so that the converted encoder computes exactly the same function
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    decoder = GPT2Config(
        n_embd=shape.decoder_width, n_layer=shape.decoder_layers, n_head=shape.decoder_heads,
        vocab_size=shape.vocab_size, add_cross_attention=True, is_decoder=True, bos_token_id=end_of_text,
        eos_token_id=end_of_text, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = end_of_text
    peer = VisionEncoderDecoderModel(config=config)
    ours = convert_vision_encoder_decoder(peer)  # carries the peer's (zero) dropouts over
    return peer, ours


def cuda_available() -> bool:
    # The NVML check leaves CUDA uninitialised in this process, which bench_train.py's forked processes need.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    return torch.cuda.is_available()


def skipped_without_cuda(device: torch.device, command: str, output: Path | None) -> bool:
    """True (after printing and writing a "skipped" report) when `--device cuda` was asked for on a machine without
    one, so that a sweep over devices records the gap instead of failing."""
    if device.type != "cuda" or cuda_available():
        return False
    print("skipped: --device cuda asked for, but no CUDA device is available")
    write_report({"command": command, "skipped": "no CUDA device", "machine": describe_machine(device)}, output)
    return True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """The machine's dense matrix-multiply throughput at this dtype: the ceiling the models' matmuls can approach.

    Timed with `F.linear`, the kernel of `nn.Linear` (most of the encoder's FLOPs): on CPUs without bf16
    instructions its bf16 path is about ten times faster than `torch.mm`'s. The fastest run is kept, since other
    processes on the machine can only slow a run down.
    """
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    F.linear(a, b)  # warm-up: thread pool and kernel selection
    seconds = min(timed(lambda: F.linear(a, b), device)[0] for _ in range(repeats))
    return 2 * n**3 / seconds / 1e9


def memory_read_gbs(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Main-memory read bandwidth as torch's kernels reach it: a `sum` over a tensor far larger than the caches,
    fastest of `repeats`. Decoding streams every weight at every step, so this bounds how fast a step can be."""
    data = torch.ones(megabytes * 2**20 // 4, device=device)
    data.sum()  # warm-up: pages touched, thread pool started
    seconds = min(timed(lambda: data.sum(), device)[0] for _ in range(repeats))
    return data.numel() * data.element_size() / seconds / 1e9


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_mb(function) -> tuple[dict | None, object]:
    """The process's resident memory (MB) before `function` and at its peak while it runs (sampled every
    millisecond), and `function`'s result. Linux only (`/proc/self/statm`); elsewhere None."""
    if not Path("/proc/self/statm").exists():
        return None, function()
    before = peak = _resident_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, _resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = function()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _resident_bytes())
    return {"before": before / 2**20, "peak": peak / 2**20, "growth": (peak - before) / 2**20}, result


def describe_machine(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    model_names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    return {
        "cpu": model_names[0] if model_names else platform.processor(),
        "cores": os.cpu_count(),
        # The widest vector instructions torch's CPU kernels use here (AVX2, AVX512, ...): int8 gains depend on it.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # The instructions int8 and bfloat16 speeds hinge on (avx512_vnni, avx512_bf16, AMX): every figure needs them.
        "cpu_flags": relevant_cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None,
    }


def machine_line(machine: dict) -> str:
    """`describe_machine`'s result as the one line a benchmark prints first: CPU, cores, threads and CPU flags."""
    flags = " ".join(flag for flag, present in machine["cpu_flags"].items() if present) or "none"
    return (f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} using {machine['torch_threads']} "
            f"threads, CPU capability {machine['cpu_capability']}, flags {flags}")


def profiler_activities(device: torch.device) -> list[ProfilerActivity]:
    """What `torch.profiler.profile` records on `device`: the CPU always, the GPU's kernels on CUDA runs."""
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def top_ops(profiler, device: torch.device, top: int) -> list[dict]:
    """The `top` ops of a finished `torch.profiler.profile` by self time (on the GPU for CUDA runs)."""
    self_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = profiler.key_averages()
    total = sum(getattr(event, self_time) for event in events)
    ranked = sorted(events, key=lambda event: getattr(event, self_time), reverse=True)[:top]
    return [
        {
            "op": event.key,
            "calls": event.count,
            "self_ms": getattr(event, self_time) / 1e3,
            "percent": 100 * getattr(event, self_time) / total,
        }
        for event in ranked
    ]


def print_profile(title: str, ops: list[dict]) -> None:
    print(f"\n{title}")
    for op in ops:
        print(f"  {op['op']:<40} {op['calls']:>7} calls {op['self_ms']:>10.1f} ms {op['percent']:>6.1f}%")


def write_report(report: dict, output: Path | None) -> None:
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output, report)  # an interrupted run never leaves half a report
        print(f"\nwrote {output}")
