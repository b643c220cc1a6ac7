"""The cost of training on COCO and CC3M, on paper: FLOPs per epoch for each PEFT method with and without the feature
cache, GPU time at an assumed utilisation, and the feature cache's disk size. Prints markdown tables (the README's
scaling section) and writes JSON.

    python benchmarks/scaling_on_paper.py --output benchmarks/results/scaling_on_paper.json

The counting rules are `bench_train.training_flops`' (2 FLOPs per multiply-add of a weight matrix per token; a frozen
matrix costs a forward and an input gradient, 4; a trained one also its weight gradient, 6; the encoder runs forward
only when frozen), applied to the model shape and caption length recorded in `benchmarks/results/
train_cpu_fp32_real.json`; the script first checks that for LoRA they give exactly that run's `epoch_flops`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SOURCE = RESULTS / "train_cpu_fp32_real.json"

DATASETS = {
    # name: (images, captions) of one training epoch; each caption is one training sample (one row per caption).
    "COCO 2017 train": (118_287, 591_753),
    "CC3M": (3_300_000, 3_300_000),
}
GPU = {"name": "NVIDIA A100 80GB SXM", "bf16_dense_tflops": 312.0}
UTILISATION = 0.40  # model FLOPs utilisation assumed for bf16 training of ViT-L/14 + GPT-2 small
FEATURE_BYTES = 2  # the cache stores float16
METHODS = ("lora", "adapter", "prefix", "cross_attention", "full", "full + encoder")


def per_sample_flops(model: dict, caption_tokens: int) -> dict[str, dict[str, float]]:
    """{method: {"encoder": FLOPs of one image through the encoder, "decoder": FLOPs of one caption's decoder step}}.

    LoRA's rank-r matrices, the adapters' bottlenecks and prefix tuning's extra keys add under 1% and are left out, as
    in `bench_train.training_flops`: the frozen-decoder methods cost the same on paper."""
    tokens, width, mlp, layers = model["image_tokens"], model["encoder_width"], model["encoder_mlp_width"], \
        model["encoder_layers"]
    encoder_forward = layers * (2 * tokens * (4 * width**2 + 2 * width * mlp) + 4 * tokens**2 * width)
    d_model, decoder_layers, vocab = model["decoder_width"], model["decoder_layers"], model["vocab_size"]
    text_weights = decoder_layers * 12 * d_model**2 + vocab * d_model  # self-attention, MLP, LM head
    cross_text_weights = decoder_layers * 2 * d_model**2  # new cross-attention: query and output projections
    cross_image_weights = decoder_layers * width * 2 * d_model  # new cross-attention: image keys/values
    frozen_decoder = (caption_tokens * (4 * text_weights + 6 * cross_text_weights)
                      + tokens * 4 * cross_image_weights)
    full_decoder = caption_tokens * 6 * (text_weights + cross_text_weights) + tokens * 4 * cross_image_weights
    costs = {method: {"encoder": encoder_forward, "decoder": frozen_decoder} for method in METHODS[:4]}
    costs["full"] = {"encoder": encoder_forward, "decoder": full_decoder}
    # Training the encoder: its forward, input and weight gradients (3x), and the image keys/values pass gradients on.
    costs["full + encoder"] = {"encoder": 3 * encoder_forward,
                               "decoder": full_decoder + tokens * 2 * cross_image_weights}
    return {method: {part: float(value) for part, value in cost.items()} for method, cost in costs.items()}


def check_against_benchmark(report: dict, costs: dict) -> None:
    images = report["num_images"]
    expected = report["epoch_flops"]
    lora = costs["lora"]
    got = {"ours": images * (lora["encoder"] + lora["decoder"]), "ours_cached": images * lora["decoder"]}
    for name, value in got.items():
        if abs(value - expected[name]) > 1e-6 * expected[name]:
            raise SystemExit(f"counting rules disagree with {SOURCE.name}: {name} {value:.6e} != {expected[name]:.6e}")


def epoch_costs(costs: dict, images: int, captions: int) -> dict[str, dict[str, float | None]]:
    """FLOPs of one epoch over `captions` samples, and of the cache's one-off pre-pass over `images` images."""
    rows = {}
    for method, cost in costs.items():
        cacheable = method != "full + encoder"
        rows[method] = {
            "epoch": captions * (cost["encoder"] + cost["decoder"]),
            "cached_epoch": captions * cost["decoder"] if cacheable else None,
            "cache_prepass": images * cost["encoder"] if cacheable else None,
        }
    return rows


def hours(flops: float | None, gpus: int) -> float | None:
    return None if flops is None else flops / (gpus * GPU["bf16_dense_tflops"] * 1e12 * UTILISATION) / 3600


def build_report() -> dict:
    source = json.loads(SOURCE.read_text())
    model = source["model"]
    costs = per_sample_flops(model, source["caption_tokens"])
    check_against_benchmark(source, costs)
    feature_bytes = model["image_tokens"] * model["encoder_width"] * FEATURE_BYTES
    report = {
        "source": str(SOURCE.relative_to(RESULTS.parent.parent)),
        "caption_tokens": source["caption_tokens"],
        "gpu": GPU, "utilisation": UTILISATION,
        "per_sample_flops": costs,
        "feature_bytes_per_image": feature_bytes,
        "datasets": {},
    }
    for name, (images, captions) in DATASETS.items():
        epochs = epoch_costs(costs, images, captions)
        report["datasets"][name] = {
            "images": images, "captions": captions,
            "cache_bytes": images * feature_bytes,
            "methods": {
                method: {**row, **{f"{key}_hours_{gpus}gpu": hours(row[key], gpus) for key in row for gpus in (1, 8)}}
                for method, row in epochs.items()
            },
        }
    return report


def _flops(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e15:,.0f}"


def _minutes(value: float | None) -> str:
    return "—" if value is None else f"{value * 60:,.1f}" if value < 1 / 6 else f"{value * 60:,.0f}"


def print_tables(report: dict) -> None:
    costs = report["per_sample_flops"]
    effective = GPU["bf16_dense_tflops"] * 1e12 * UTILISATION
    print(f"Per training sample ({report['caption_tokens']} caption tokens): GFLOPs of encoder / decoder, and the "
          f"samples per second one {GPU['name']} at {UTILISATION:.0%} of {GPU['bf16_dense_tflops']:.0f} TFLOP/s "
          "consumes (from images / from the cache)\n")
    print("| method | encoder GFLOP | decoder GFLOP | samples/s per GPU | cached samples/s per GPU |")
    print("|---|---|---|---|---|")
    for method, cost in costs.items():
        cached = "—" if method == "full + encoder" else f"{effective / cost['decoder']:,.0f}"
        print(f"| {method} | {cost['encoder'] / 1e9:.1f} | {cost['decoder'] / 1e9:.1f} | "
              f"{effective / (cost['encoder'] + cost['decoder']):,.0f} | {cached} |")
    print(f"\nfeature cache: {report['feature_bytes_per_image']:,} bytes per image\n")
    for name, data in report["datasets"].items():
        print(f"### {name}: {data['images']:,} images, {data['captions']:,} captions; cache "
              f"{data['cache_bytes'] / 1e9:,.1f} GB\n")
        print("| method | PFLOP/epoch | cached: PFLOP/epoch | cache pre-pass PFLOP (once) | "
              "min/epoch, 1 GPU | min/epoch, 8 GPUs | cached min/epoch, 1 GPU | cached min/epoch, 8 GPUs | "
              "pre-pass min, 1 / 8 GPUs |")
        print("|---|---|---|---|---|---|---|---|---|")
        for method, row in data["methods"].items():
            print(f"| {method} | {_flops(row['epoch'])} | {_flops(row['cached_epoch'])} | "
                  f"{_flops(row['cache_prepass'])} | {_minutes(row['epoch_hours_1gpu'])} | "
                  f"{_minutes(row['epoch_hours_8gpu'])} | {_minutes(row['cached_epoch_hours_1gpu'])} | "
                  f"{_minutes(row['cached_epoch_hours_8gpu'])} | {_minutes(row['cache_prepass_hours_1gpu'])} / "
                  f"{_minutes(row['cache_prepass_hours_8gpu'])} |")
        print()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    arguments = parser.parse_args(argv)
    report = build_report()
    print_tables(report)
    if arguments.output:
        arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
