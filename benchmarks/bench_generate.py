"""Captioning speed of ViTGPT2ForConditionalGeneration ("ours") against transformers' VisionEncoderDecoderModel ("peer").

Both hold the same random weights: a ViTModel + GPT-2 (cross-attention in every block) VisionEncoderDecoderModel is
built and converted with `convert_vision_encoder_decoder`. Both caption the same random
images with beam search and a fixed caption length (min = max new tokens), so they do the same work and must write
the same tokens. Each run is split into encoder time (forward hooks on the encoder) and decode time (the rest).
On the CPU in float32 "ours" runs as `eval.py caption` and the demo run it, with its linear layers prepacked for
oneDNN (`modeling_vitgpt2.inference.prepacking`); "ours_blas" is the same model without prepacking. It also times our model in
int8 (`modeling_vitgpt2.inference.quantization`), with `--with_int8_compiled` in int8 with its vision encoder
compiled (`--quantize int8-compiled`), and with `--with_bf16` in bfloat16 loaded as `--dtype bfloat16` loads it
(`load_for_inference(..., dtype="bfloat16")`), interleaved with the others, their latency for one image, and (with
`--trained_model`) each one's CIDEr against float32 on a trained model.

    python benchmarks/bench_generate.py --size real --batch_sizes 1 4 \
        --output benchmarks/results/generate_cpu_fp32_real.json

See benchmarks/README.md for the FLOP formula and how to read the output.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from common import (
    ModelShape,
    build_models,
    describe_machine,
    matmul_gflops,
    memory_read_gbs,
    peak_resident_mb,
    print_profile,
    profiler_activities,
    skipped_without_cuda,
    synchronize,
    timed,
    top_ops,
    write_report,
)
from torch.profiler import profile

from modeling_vitgpt2.inference.loading import load_for_inference
from modeling_vitgpt2.inference.prepacking import PrepackedLinear, prepack_for_cpu
from modeling_vitgpt2.inference.quantization import quantize_for_cpu


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


# Bytes a weight of each timed model takes; the others hold float32 (or bfloat16 with --dtype bf16).
WEIGHT_BYTES = {"int8": 1, "int8_compiled": 1, "bf16": 2}

# Our model run other ways than float32, as users load it; each is timed beside float32, its captions compared.
VARIANT_DESCRIPTIONS = {
    "int8": "our model with int8 linear layers (--quantize int8)",
    "int8_compiled": "int8 with the vision encoder compiled for the CPU's int8 kernels (--quantize int8-compiled; "
                     "its compiling is not timed)",
    "bf16": "our model loaded in bfloat16 as --dtype bfloat16 loads it",
}


def decode_weight_bytes(size: GenerateSize, bytes_per_weight: int) -> float:
    """Bytes of weights one decoding step reads (each weight once, whatever the batch and beams): the decoder's
    products and the vocabulary projection at `bytes_per_weight`; biases, norms and embeddings ignored."""
    d_model = size.decoder_width
    return float((size.decoder_layers * 14 * d_model**2 + size.vocab_size * d_model) * bytes_per_weight)


def latency(models: dict, pixels: torch.Tensor, settings: dict, calls: int, device: torch.device) -> dict:
    """p50/p95 seconds of `calls` one-image `generate` calls per model after a warm-up, the models interleaved."""
    for model in models.values():
        model.generate(pixel_values=pixels, **settings)
    runs = {name: [] for name in models}
    for _ in range(calls):
        for name, model in models.items():
            runs[name].append(timed(lambda: model.generate(pixel_values=pixels, **settings), device)[0])
    return {
        name: {"calls": calls, "p50_s": statistics.median(times),
               "p95_s": statistics.quantiles(times, n=20, method="inclusive")[18] if calls > 1 else times[0]}
        for name, times in runs.items()
    }


# How `eval.py caption` runs each variant: its --quantize and --dtype.
CAPTION_OPTIONS = {"fp32": {}, "int8": {"quantize": "int8"}, "int8_compiled": {"quantize": "int8-compiled"},
                   "bf16": {"dtype": "bfloat16"}}


def trained_model_quality(model_path: Path, images: int, variants: tuple[str, ...]) -> dict[str, dict]:
    """CIDEr of a trained model (the default run's: `python train.py`) in float32 and in each of `variants` (int8,
    bf16) on the first `images` of the built-in synthetic validation split, and the share of images captioned as in
    float32, through `eval.py caption`'s code with the model's own generation settings."""
    from modeling_vitgpt2.data.synthetic import write_synthetic_coco
    from modeling_vitgpt2.evaluation.jobs import caption_folder, score_predictions

    with tempfile.TemporaryDirectory() as folder:
        # The validation split has its own random stream: without training images it is the run's validation set.
        split = write_synthetic_coco(folder, num_train=0, num_val=images)
        captions = {name: caption_folder(model_path, split.val_images, progress=False, device="cpu",
                                         **CAPTION_OPTIONS[name])
                    for name in ("fp32", *variants)}
        cider = {name: score_predictions(predictions, split.val_json, metrics=["cider"]).cider
                 for name, predictions in captions.items()}
    reports = {}
    for name in variants:
        same = sum(captions["fp32"][image] == captions[name][image] for image in captions["fp32"])
        reports[name] = {
            "model": str(model_path),
            "images": images,
            "cider_fp32": cider["fp32"],
            f"cider_{name}": cider[name],
            # An untrained model can score 0 in float32: no relative difference then.
            "cider_difference_percent": 100 * (cider[name] - cider["fp32"]) / cider["fp32"] if cider["fp32"] else None,
            "identical_captions": same / len(captions["fp32"]),
        }
    return reports


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


def weights_mb(model: torch.nn.Module) -> float:
    """Megabytes of the model's weights as stored (int8 layers' packed weights count one byte per value; tied
    weights once; oneDNN-prepacked weights as the float32 values they hold)."""
    seen = set()

    def nbytes(value) -> int:
        if isinstance(value, torch.Tensor):
            key = id(value) if value.is_mkldnn else value.data_ptr()  # an opaque oneDNN tensor has no data pointer
            if key in seen:
                return 0
            seen.add(key)
            return value.numel() * value.element_size()
        if isinstance(value, (tuple, list)):
            return sum(nbytes(part) for part in value)
        return 0

    entries = []  # all kept alive while counting: int8 layers unpack into new tensors, whose addresses get reused
    for module in model.modules():
        if isinstance(module, PrepackedLinear):  # its state_dict refuses: the packed weight is no parameter
            entries += [module.packed_weight, module.bias]
        else:
            own = {}
            module._save_to_state_dict(own, "", keep_vars=True)  # the module's own entries, int8 packing included
            entries += own.values()
    return sum(nbytes(value) for value in entries) / 2**20


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


def print_table(rows: list[dict], matmul: float, bandwidth: float) -> None:
    header = (
        f"{'batch':>5} {'peer cap/s':>10} {'ours cap/s':>10} {'speedup':>7} "
        f"{'peer enc s':>10} {'peer dec s':>10} {'ours enc s':>10} {'ours dec s':>10} "
        f"{'peer %mm':>8} {'ours %mm':>8} {'ours %bw':>8} {'identical':>9} {'agree':>6}"
    )
    blas = "speedup_blas" in rows[0]
    if blas:
        header += f" {'blas x':>6}"
    variants = [name for name in VARIANT_DESCRIPTIONS if name in rows[0]]
    columns = {name: [f"{name} {column}" for column in ("cap/s", "x", "%bw", "same")] for name in variants}
    for name in variants:
        header += "".join(f" {column:>{max(10, len(column))}}" for column in columns[name])
    print(header)
    for row in rows:
        peer, ours = row["peer"], row["ours"]
        line = (
            f"{row['batch_size']:>5} {peer['captions_per_s']:>10.3f} {ours['captions_per_s']:>10.3f} "
            f"{row['speedup']:>7.2f} {peer['encoder_s']:>10.3f} {peer['decode_s']:>10.3f} "
            f"{ours['encoder_s']:>10.3f} {ours['decode_s']:>10.3f} "
            f"{100 * peer['fraction_of_matmul']:>7.1f}% {100 * ours['fraction_of_matmul']:>7.1f}% "
            f"{100 * ours['decode_fraction_of_bandwidth']:>7.1f}% "
            f"{str(row['identical']):>9} {row['token_agreement']:>6.3f}"
        )
        if blas:
            line += f" {row['speedup_blas']:>6.2f}"
        for name in variants:
            widths = [max(10, len(column)) for column in columns[name]]
            line += (f" {row[name]['captions_per_s']:>{widths[0]}.3f} {row[f'{name}_speedup']:>{widths[1]}.2f} "
                     f"{100 * row[name]['decode_fraction_of_bandwidth']:>{widths[2] - 1}.1f}% "
                     f"{row[f'{name}_identical_captions']:>{widths[3]}.2f}")
        print(line)
    print(f"%mm: share of the measured {matmul:.1f} GFLOP/s matmul throughput reached (useful FLOPs / time); "
          f"%bw: the decode loop's share of its weight-bandwidth bound (weight bytes per step x steps / "
          f"{bandwidth:.1f} GB/s measured read bandwidth, over decode time)")
    if blas:
        print("ours: linear layers prepacked for oneDNN, as eval.py caption and the demo run on a CPU; 'blas x' is "
              "the speedup over the peer of the same model without prepacking")
    for name in variants:
        print(f"{name}: {VARIANT_DESCRIPTIONS[name]}; '{name} x' is its speedup over ours in float32 (prepacked), "
              f"'{name} same' the share of images whose caption equals float32's")


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
    parser.add_argument("--no_int8", action="store_true", help="skip our model in int8 (CPU float32 runs only)")
    parser.add_argument("--with_int8_compiled", action="store_true",
                        help="also time our model with --quantize int8-compiled (needs torchao and a C++ compiler; "
                             "compiling takes about a minute at real size), and with --trained_model its CIDEr")
    parser.add_argument("--with_bf16", action="store_true",
                        help="also time our model in bfloat16, loaded through load_for_inference(dtype='bfloat16') "
                             "as --dtype bfloat16 loads it (CPU float32 runs only; refused on a CPU without "
                             "avx512_bf16 or AMX), and with --trained_model its CIDEr against float32")
    parser.add_argument("--latency_calls", type=int, default=20,
                        help="one-image generate calls per model for latency p50/p95 (0 skips)")
    parser.add_argument("--trained_model", type=Path,
                        help="a trained model folder (the default run's: outputs/synthetic-default): CIDEr of int8 "
                             "(and bfloat16 with --with_bf16) against float32 on the built-in synthetic validation "
                             "split")
    parser.add_argument("--trained_model_images", type=int, default=200,
                        help="validation images for --trained_model (the default run's split has 200)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    transformers.logging.set_verbosity_error()  # generate's warnings about the pad token repeat on every call
    command = shlex.join(["python", *sys.argv])
    device = torch.device(arguments.device)
    if skipped_without_cuda(device, command, arguments.output):
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
    bandwidth = memory_read_gbs(device)
    print(f"matmul throughput ({arguments.dtype}, {device.type}): {matmul:.1f} GFLOP/s; memory read bandwidth "
          f"{bandwidth:.1f} GB/s; CPU capability {machine['cpu_capability']}")

    peer, ours = build_models(size, arguments.seed)
    models = {"peer": peer.eval().to(device=device, dtype=dtype), "ours": ours.eval().to(device=device, dtype=dtype)}
    on_cpu_in_float32 = device.type == "cpu" and dtype == torch.float32
    with_int8 = not arguments.no_int8 and on_cpu_in_float32
    if with_int8:
        models["int8"] = quantize_for_cpu(copy.deepcopy(models["ours"]))
    if arguments.with_int8_compiled and on_cpu_in_float32:
        models["int8_compiled"] = quantize_for_cpu(copy.deepcopy(models["ours"]), "int8-compiled")
    with_bf16 = arguments.with_bf16 and on_cpu_in_float32
    if with_bf16:
        with tempfile.TemporaryDirectory() as folder:  # the same weights, through the loader users' --dtype takes
            models["ours"].save_pretrained(folder)
            models["bf16"] = load_for_inference(folder, dtype="bfloat16", device=device)
    if on_cpu_in_float32:  # as eval.py caption and the demo load it on a CPU
        models["ours_blas"] = copy.deepcopy(models["ours"])
        models["ours"] = prepack_for_cpu(models["ours"])
    variants = [name for name in VARIANT_DESCRIPTIONS if name in models]
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
        for name, timing in timings.items():
            timing["captions_per_s"] = batch_size / timing["seconds"]
            timing["fraction_of_matmul"] = (flops["encoder"] + flops["decode"]) / timing["seconds"] / 1e9 / matmul
            weight_bytes = decode_weight_bytes(size, WEIGHT_BYTES.get(name, dtype.itemsize))
            bound_s = arguments.new_tokens * weight_bytes / (bandwidth * 1e9)
            timing["decode_fraction_of_bandwidth"] = bound_s / timing["decode_s"]
        row = {
            "batch_size": batch_size,
            "speedup": timings["peer"]["seconds"] / timings["ours"]["seconds"],
            "identical": torch.equal(tokens["ours"], tokens["peer"]),
            "token_agreement": (tokens["ours"] == tokens["peer"]).float().mean().item(),
            "flops": flops,
            **timings,
        }
        if on_cpu_in_float32:
            row["speedup_blas"] = timings["peer"]["seconds"] / timings["ours_blas"]["seconds"]
            row["blas_identical"] = torch.equal(tokens["ours_blas"], tokens["peer"])
        for name in variants:
            row[f"{name}_speedup"] = timings["ours"]["seconds"] / timings[name]["seconds"]
            row[f"{name}_identical_captions"] = (tokens[name] == tokens["ours"]).all(dim=1).float().mean().item()
            row[f"{name}_token_agreement"] = (tokens[name] == tokens["ours"]).float().mean().item()
        rows.append(row)
        print(f"batch {batch_size} done", file=sys.stderr)

    print_table(rows, matmul, bandwidth)
    # One figure for the run: the geometric mean, since speedups are ratios.
    speedup = math.exp(statistics.mean(math.log(row["speedup"]) for row in rows))
    identical = all(row["identical"] for row in rows)
    print(f"\nspeedup (geometric mean over batch sizes): {speedup:.2f}x; identical tokens at every batch size: "
          f"{identical}")
    extra = {}
    if on_cpu_in_float32:
        extra["speedup_blas"] = math.exp(statistics.mean(math.log(row["speedup_blas"]) for row in rows))
        print(f"without prepacking (ours_blas): {extra['speedup_blas']:.2f}x; identical tokens at every batch size: "
              f"{all(row['blas_identical'] for row in rows)}")
    for name in variants:
        extra[f"{name}_speedup"] = math.exp(statistics.mean(math.log(row[f"{name}_speedup"]) for row in rows))
        print(f"{name} speedup over ours in float32 (geometric mean): {extra[f'{name}_speedup']:.2f}x")
    if arguments.latency_calls > 0:
        latency_models = {name: models[name] for name in ("ours", "ours_blas", *variants)}
        extra["latency_batch_1"] = latency(latency_models, random_images(1), settings, arguments.latency_calls,
                                           device)
        for name, figures in extra["latency_batch_1"].items():
            print(f"latency, one image ({name}): p50 {figures['p50_s']:.3f} s, p95 {figures['p95_s']:.3f} s over "
                  f"{figures['calls']} calls")
    # Resident memory during one call at the largest batch size; every model's weights stay loaded throughout, so
    # the growth during the call (activations, caches) and each model's weight bytes are the comparable figures.
    pixels = random_images(max(batch_sizes))
    extra["memory_mb"] = {"batch_size": max(batch_sizes)}
    for name, model in models.items():
        extra["memory_mb"][name] = {
            # The compiled encoder's weights are constants inside Inductor's generated code, out of reach here.
            "weights": None if name == "int8_compiled" else weights_mb(model),
            **(peak_resident_mb(lambda: model.generate(pixel_values=pixels, **settings))[0] or {}),
        }
    print(f"memory at batch {max(batch_sizes)}, MB: " + "; ".join(
        f"{name} weights {figures['weights'] or float('nan'):.0f}, growth during a call {figures.get('growth', float('nan')):.0f}"
        for name, figures in extra["memory_mb"].items() if name != "batch_size")
        + f" (process peak {max(f.get('peak', 0) for k, f in extra['memory_mb'].items() if k != 'batch_size'):.0f})")
    if arguments.trained_model is not None:
        for name, quality in trained_model_quality(arguments.trained_model, arguments.trained_model_images,
                                                   tuple(dict.fromkeys(("int8", *variants)))).items():
            extra[f"trained_model_{name}"] = quality
            print(f"{quality['model']} on {quality['images']} synthetic validation images: CIDEr "
                  f"{quality['cider_fp32']:.4f} float32, {quality[f'cider_{name}']:.4f} {name} "
                  f"({quality['cider_difference_percent'] or 0:+.2f}%), identical captions "
                  f"{100 * quality['identical_captions']:.1f}%")
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
        "memory_read_gbs": bandwidth,
        "speedup": speedup,
        "identical": identical,
        "rows": rows,
        **extra,
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
