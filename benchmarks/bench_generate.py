"""Captioning speed of ViTGPT2ForConditionalGeneration ("ours") against transformers' VisionEncoderDecoderModel ("peer").

Both hold the same random weights: a ViTModel + GPT-2 (cross-attention in every block) VisionEncoderDecoderModel is
built and converted with `convert_vision_encoder_decoder`. Both caption the same random
images with beam search and a fixed caption length (min = max new tokens), so they do the same work and must write
the same tokens. Each run is split into encoder time (forward hooks on the encoder) and decode time (the rest).

    python benchmarks/bench_generate.py --size real --batch_sizes 1 4 \
        --output benchmarks/results/generate_cpu_fp32_real.json

See benchmarks/README.md for the FLOP formula and how to read the output.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from common import (
    ModelShape,
    build_models,
    cuda_available,
    describe_machine,
    matmul_gflops,
    print_profile,
    profiler_activities,
    synchronize,
    timed,
    top_ops,
    write_report,
)
from torch.profiler import profile


@dataclass(frozen=True)
class GenerateSize(ModelShape):
    batch_sizes: tuple[int, ...]


SIZES = {
    # The encoder is wider than the decoder at every size, so the peer needs its `enc_to_dec_proj` as at real size.
    "tiny": GenerateSize(
        image_size=28, patch_size=14, encoder_width=48, encoder_layers=2, encoder_heads=2, encoder_mlp_width=96,
        decoder_width=32, decoder_layers=2, decoder_heads=2, vocab_size=300, batch_sizes=(1, 2, 4, 8),
    ),
    "small": GenerateSize(
        image_size=112, patch_size=14, encoder_width=256, encoder_layers=4, encoder_heads=4, encoder_mlp_width=1024,
        decoder_width=192, decoder_layers=4, decoder_heads=4, vocab_size=8192, batch_sizes=(1, 4, 8, 16),
    ),
    # ViT-L/14 at 224 px (the CLIP tower this project captions with) + GPT-2 small.
    "real": GenerateSize(
        image_size=224, patch_size=14, encoder_width=1024, encoder_layers=24, encoder_heads=16, encoder_mlp_width=4096,
        decoder_width=768, decoder_layers=12, decoder_heads=12, vocab_size=50257, batch_sizes=(1, 4, 8),
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def generate_flops(size: GenerateSize, images: int, num_beams: int, new_tokens: int) -> dict[str, float]:
    """Useful FLOPs of one `generate` call: 2 per multiply-add of the weight matrices and attention products (biases,
    norms, softmax, embeddings and beam bookkeeping ignored). See benchmarks/README.md for the formula.

    The image's cross-attention keys/values are counted once per image, as the work needs; the peer projects them
    once per beam, and applies its `enc_to_dec_proj` to every beam's image tokens at every step, which is not counted.
    """
    tokens, width, mlp = size.image_tokens, size.encoder_width, size.encoder_mlp_width
    encoder_layer = 2 * tokens * (4 * width**2 + 2 * width * mlp) + 4 * tokens**2 * width
    encoder = images * size.encoder_layers * encoder_layer

    d_model = size.decoder_width
    cross_keys_values = size.decoder_layers * 2 * tokens * width * 2 * d_model
    # Per layer and token: self-attention q/k/v + output (4 d^2), cross-attention query + output (2 d^2), MLP (8 d^2).
    decoder_weights = size.decoder_layers * 14 * d_model**2 + size.vocab_size * d_model

    def step(context_length: int) -> int:  # one token of one beam, attending to `context_length` text tokens
        attention = size.decoder_layers * 4 * d_model * (context_length + tokens)
        return 2 * decoder_weights + attention

    per_beam = sum(step(context_length) for context_length in range(1, new_tokens + 1))
    decode = images * cross_keys_values + images * num_beams * per_beam
    return {"encoder": float(encoder), "decode": float(decode)}


class EncoderClock:
    """Wall time spent inside the encoder's forward, so that a `generate` run splits into encoding and decoding."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._started = 0.0
        encoder.register_forward_pre_hook(self._start)
        encoder.register_forward_hook(self._stop)

    def _start(self, module, args) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._started


def generate_once(model, clock: EncoderClock, pixels: torch.Tensor, settings: dict, device: torch.device):
    clock.seconds = 0.0
    seconds, tokens = timed(lambda: model.generate(pixel_values=pixels, **settings), device)
    return seconds, clock.seconds, tokens


def benchmark_batch(models: dict, clocks: dict, pixels, settings, repeats, device) -> tuple[dict, dict]:
    """Median total/encoder/decode seconds of each model over `repeats` runs after a warm-up, and its tokens."""
    tokens = {name: generate_once(model, clocks[name], pixels, settings, device)[2] for name, model in models.items()}
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():  # interleaved, so that drifts in machine speed hit both models alike
            total, encoder, _ = generate_once(model, clocks[name], pixels, settings, device)
            runs[name].append((total, encoder))
    timings = {
        name: {
            "seconds": statistics.median(total for total, _ in model_runs),
            "encoder_s": statistics.median(encoder for _, encoder in model_runs),
            "decode_s": statistics.median(total - encoder for total, encoder in model_runs),
        }
        for name, model_runs in runs.items()
    }
    return timings, tokens


def profile_decoding(model, pixels: torch.Tensor, settings: dict, device: torch.device, top: int) -> list[dict]:
    """Top ops by self time of one decode loop; the encoder runs beforehand, so its ops do not crowd the list."""
    with torch.inference_mode():
        encoder_outputs = model.get_encoder()(pixel_values=pixels)
    with profile(activities=profiler_activities(device)) as profiler:
        model.generate(encoder_outputs=encoder_outputs, **settings)
        synchronize(device)
    return top_ops(profiler, device, top)


def print_table(rows: list[dict], matmul: float) -> None:
    header = (
        f"{'batch':>5} {'peer cap/s':>10} {'ours cap/s':>10} {'speedup':>7} "
        f"{'peer enc s':>10} {'peer dec s':>10} {'ours enc s':>10} {'ours dec s':>10} "
        f"{'peer %mm':>8} {'ours %mm':>8} {'identical':>9} {'agree':>6}"
    )
    print(header)
    for row in rows:
        peer, ours = row["peer"], row["ours"]
        print(
            f"{row['batch_size']:>5} {peer['captions_per_s']:>10.3f} {ours['captions_per_s']:>10.3f} "
            f"{row['speedup']:>7.2f} {peer['encoder_s']:>10.3f} {peer['decode_s']:>10.3f} "
            f"{ours['encoder_s']:>10.3f} {ours['decode_s']:>10.3f} "
            f"{100 * peer['fraction_of_matmul']:>7.1f}% {100 * ours['fraction_of_matmul']:>7.1f}% "
            f"{str(row['identical']):>9} {row['token_agreement']:>6.3f}"
        )
    print(f"%mm: share of the measured {matmul:.1f} GFLOP/s matmul throughput reached (useful FLOPs / time)")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--batch_sizes", type=int, nargs="+", help="default: depends on --size")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=20, help="every caption is exactly this long")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and batch size (median kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="profile one decode loop of each model")
    parser.add_argument("--profile_top", type=int, default=12, help="how many ops --profile lists")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    transformers.logging.set_verbosity_error()  # generate's warnings about the pad token repeat on every call
    command = shlex.join(["python", *sys.argv])
    device = torch.device(arguments.device)
    if device.type == "cuda" and not cuda_available():
        print("skipped: --device cuda asked for, but no CUDA device is available")
        write_report({"command": command, "skipped": "no CUDA device", "machine": describe_machine(device)},
                     arguments.output)
        return

    size = SIZES[arguments.size]
    dtype = DTYPES[arguments.dtype]
    batch_sizes = arguments.batch_sizes or size.batch_sizes
    settings = dict(
        num_beams=arguments.num_beams, min_new_tokens=arguments.new_tokens, max_new_tokens=arguments.new_tokens,
        do_sample=False,
    )
    machine = describe_machine(device)
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} using {machine['torch_threads']} "
          f"threads, transformers {machine['transformers']}" + (f", {machine['gpu']}" if machine["gpu"] else ""))
    # Other processes on the machine slow both models and the matmul alike, but make every figure noisier.
    load_at_start = os.getloadavg()[0]
    matmul = matmul_gflops(dtype, device)
    print(f"matmul throughput ({arguments.dtype}, {device.type}): {matmul:.1f} GFLOP/s")

    peer, ours = build_models(size, arguments.seed)
    models = {"peer": peer.eval().to(device=device, dtype=dtype), "ours": ours.eval().to(device=device, dtype=dtype)}
    clocks = {name: EncoderClock(model.get_encoder(), device) for name, model in models.items()}
    print(f"size {arguments.size} ({size.image_tokens} image tokens), {arguments.dtype}, beams {arguments.num_beams}, "
          f"{arguments.new_tokens} new tokens, median of {arguments.repeats} runs after a warm-up\n")

    def random_images(batch_size: int) -> torch.Tensor:
        shape = (batch_size, 3, size.image_size, size.image_size)
        pixels = torch.randn(shape, generator=torch.Generator().manual_seed(arguments.seed))
        return pixels.to(device=device, dtype=dtype)

    rows = []
    for batch_size in batch_sizes:
        pixels = random_images(batch_size)
        timings, tokens = benchmark_batch(models, clocks, pixels, settings, arguments.repeats, device)
        flops = generate_flops(size, batch_size, arguments.num_beams, arguments.new_tokens)
        for timing in timings.values():
            timing["captions_per_s"] = batch_size / timing["seconds"]
            timing["fraction_of_matmul"] = (flops["encoder"] + flops["decode"]) / timing["seconds"] / 1e9 / matmul
        rows.append({
            "batch_size": batch_size,
            "speedup": timings["peer"]["seconds"] / timings["ours"]["seconds"],
            "identical": torch.equal(tokens["ours"], tokens["peer"]),
            "token_agreement": (tokens["ours"] == tokens["peer"]).float().mean().item(),
            "flops": flops,
            **timings,
        })
        print(f"batch {batch_size} done", file=sys.stderr)

    print_table(rows, matmul)
    # One figure for the run: the geometric mean, since speedups are ratios.
    speedup = math.exp(statistics.mean(math.log(row["speedup"]) for row in rows))
    identical = all(row["identical"] for row in rows)
    print(f"\nspeedup (geometric mean over batch sizes): {speedup:.2f}x; identical tokens at every batch size: "
          f"{identical}")
    load_average = {"start": load_at_start, "end": os.getloadavg()[0]}
    print(f"1-minute load average: {load_average['start']:.1f} at start, {load_average['end']:.1f} at end "
          f"({machine['cores']} cores)")

    report = {
        "command": command,
        "machine": machine,
        "size": arguments.size,
        "model": asdict(size) | {"image_tokens": size.image_tokens},
        "dtype": arguments.dtype,
        "device": device.type,
        "num_beams": arguments.num_beams,
        "new_tokens": arguments.new_tokens,
        "repeats": arguments.repeats,
        "load_average": load_average,
        "matmul_gflops": matmul,
        "speedup": speedup,
        "identical": identical,
        "rows": rows,
    }
    if arguments.profile:
        # At the largest batch size, where per-row copies weigh most.
        pixels = random_images(max(batch_sizes))
        report["profile"] = {
            "batch_size": max(batch_sizes),
            **{name: profile_decoding(model, pixels, settings, device, arguments.profile_top)
               for name, model in models.items()},
        }
        for name in models:
            print_profile(f"{name}: top ops of the decode loop (self time)", report["profile"][name])
    write_report(report, arguments.output)


if __name__ == "__main__":
    main()
