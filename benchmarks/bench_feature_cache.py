"""How much of a frozen-encoder training step the encoder-feature cache saves (a measurement, not a test).

Times one training step (forward, backward, AdamW step on the trainable decoder) with the encoder frozen, once with
`pixel_values` (the encoder runs every step) and once with `encoder_outputs` read from `EncoderFeatureCache`, and
the encoder's forward alone, so that the encoder's share of a step and the speedup can be quoted. Also times the
one-off costs: fingerprinting the encoder weights (cache key) and the pre-pass, and the per-batch collation of both
paths (done by DataLoader workers in training, so reported apart from the step).

    python benchmarks/bench_feature_cache.py --size tiny                      # seconds, a smoke run
    python benchmarks/bench_feature_cache.py --size real --output real.json   # ViT-L/14 224 px + GPT-2 small shapes

`real` is the course's shapes with random weights (nothing is downloaded): a `vit_large_patch14_clip_224` encoder
(257 tokens of 1024) and a 12-layer, 768-wide GPT-2 decoder with a 50257-token vocabulary; batch 8, 20 caption
tokens by default. Images are random 256 px PNGs, resized and cropped by the encoder's own transform.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import synchronize, write_report  # noqa: E402  (this folder, as the other benchmarks)

from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration, ViTGPT2Processor  # noqa: E402
from modeling_vitgpt2.data.captions import CaptionCollator  # noqa: E402
from modeling_vitgpt2.data.feature_cache import CachedFeatureCollator, EncoderFeatureCache  # noqa: E402
from modeling_vitgpt2.data.synthetic import describe_scene, random_scene  # noqa: E402
from modeling_vitgpt2.training.tokenizer import train_caption_tokenizer  # noqa: E402

SIZES = {
    "tiny": dict(
        config=dict(
            encoder_name="vit_base_patch16_224",
            encoder_kwargs=dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2),
            encoder_hidden_size=48,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
        ),
        image_side=40,
    ),
    "real": dict(config=dict(encoder_name="vit_large_patch14_clip_224", encoder_hidden_size=1024), image_side=256),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--caption_tokens", type=int, default=20, help="decoder positions per caption (start included)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path, after one warm-up round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run the steps under bfloat16 autocast, as Trainer --bf16")
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    return parser.parse_args()


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}  # tensors, and the cache's encoder_outputs


def median_seconds(actions: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each of `actions` ({name: callable}) over `repeats` rounds, after one untimed warm-up
    round. The actions take turns within each round, so that a change in the machine's load (other jobs on a
    shared CPU) affects all of them alike rather than whichever happened to run then."""
    times = {name: [] for name in actions}
    for round_number in range(repeats + 1):
        for name, action in actions.items():
            synchronize(device)
            start = time.perf_counter()
            action()
            synchronize(device)
            if round_number:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def long_captions(count: int, seed: int = 0) -> list[str]:
    """Synthetic captions joined until each is comfortably longer than the caption length, so all are cut to it."""
    import random

    rng = random.Random(seed)
    return [" and ".join(describe_scene(random_scene(rng))[0] for _ in range(6)) for _ in range(count)]


def main() -> None:
    args = parse_args()
    size = SIZES[args.size]
    device = torch.device(args.device)
    torch.manual_seed(0)

    captions = long_captions(2 * args.batch_size)
    tokenizer = train_caption_tokenizer(captions * 4, vocab_size=400)
    end = tokenizer.eos_token_id
    config = ViTGPT2Config(
        **size["config"], bos_token_id=end, eos_token_id=end, pad_token_id=end, decoder_start_token_id=end
    )
    started = time.perf_counter()
    model = ViTGPT2ForConditionalGeneration(config).to(device)
    model_build_s = time.perf_counter() - started
    model.encoder.requires_grad_(False)
    model.train()
    processor = ViTGPT2Processor.from_timm_model(model.encoder.model, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        rng = np.random.default_rng(0)
        rows = []
        for index, caption in enumerate(captions):
            pixels = rng.integers(0, 256, size=(size["image_side"], size["image_side"], 3), dtype=np.uint8)
            path = scratch / f"image_{index}.png"
            Image.fromarray(pixels).save(path)
            rows.append({"image_path": str(path), "image_name": path.stem, "caption": caption})

        started = time.perf_counter()
        cache = EncoderFeatureCache(scratch / "cache", model, processor)
        fingerprint_s = time.perf_counter() - started
        started = time.perf_counter()
        cache.build(rows, batch_size=args.batch_size)
        synchronize(device)
        prepass_s = time.perf_counter() - started

        collator = CaptionCollator(processor, max_length=args.caption_tokens)
        cached_collator = CachedFeatureCollator(collator, cache)
        batch_rows = rows[: args.batch_size]
        collate_s = median_seconds(
            {"images": lambda: collator(batch_rows), "cache": lambda: cached_collator(batch_rows)},
            args.steps,
            torch.device("cpu"),
        )
        pixel_batch = to_device(collator(batch_rows), device)
        cached_batch = to_device(cached_collator(batch_rows), device)
        image_tokens = cached_batch["encoder_outputs"].last_hidden_state.shape[1]
        assert pixel_batch["decoder_input_ids"].shape == (args.batch_size, args.caption_tokens)

        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

        def train_step(batch: dict) -> None:
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def encoder_forward() -> None:
            with torch.no_grad(), autocast:
                model.encoder(pixel_batch["pixel_values"])

        step_s = median_seconds(
            {
                "without_cache": lambda: train_step(pixel_batch),
                "with_cache": lambda: train_step(cached_batch),
                "encoder_forward": encoder_forward,
            },
            args.steps,
            device,
        )
        step_without_cache_s, step_with_cache_s = step_s["without_cache"], step_s["with_cache"]
        encoder_forward_s = step_s["encoder_forward"]

    results = {
        "size": args.size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "bf16_autocast": args.bf16,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "encoder": config.encoder_name,
        "encoder_params_millions": round(sum(p.numel() for p in model.encoder.parameters()) / 1e6, 1),
        "trainable_params_millions": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 1),
        "batch_size": args.batch_size,
        "caption_tokens": args.caption_tokens,
        "image_tokens": image_tokens,
        "timed_steps": args.steps,
        "model_build_s": round(model_build_s, 2),
        "encoder_fingerprint_s": round(fingerprint_s, 3),
        "prepass_images": len(rows),
        "prepass_images_per_s": round(len(rows) / prepass_s, 2),
        "cache_bytes_per_image": image_tokens * config.encoder_hidden_size * 2,
        "collate_with_images_ms": round(collate_s["images"] * 1e3, 2),
        "collate_from_cache_ms": round(collate_s["cache"] * 1e3, 2),
        "encoder_forward_ms": round(encoder_forward_s * 1e3, 1),
        "step_without_cache_ms": round(step_without_cache_s * 1e3, 1),
        "step_with_cache_ms": round(step_with_cache_s * 1e3, 1),
        "encoder_share_of_step": round(encoder_forward_s / step_without_cache_s, 3),
        "step_time_saved": round(1 - step_with_cache_s / step_without_cache_s, 3),
        "speedup": round(step_without_cache_s / step_with_cache_s, 2),
        # Other work on the machine inflates CPU timings; the 1-minute load average puts them in context.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(results, indent=2))
    write_report(results, args.output)


if __name__ == "__main__":
    main()
