"""What a static cache and `torch.compile` give ViTGPT2ForConditionalGeneration's `generate`.

The same converted model (bench_generate.py's sizes and weights) captions the same random images with beam search and
a fixed caption length, three ways: the default growing `DynamicCache`; `cache_implementation="static"` (fixed-size
self-attention cache, eager decoding steps); and the static cache with the model's forward compiled by
`torch.compile(fullgraph=True)`. transformers 5.24's `generate` compiles the decoding step by itself only for greedy
search and sampling on an accelerator (its beam search always calls the plain forward), so here the forward is
compiled explicitly: one graph for the first step, one for the decoding steps. All three must write the same tokens.
The first compiled call (tracing and compiling) is timed separately.

    python benchmarks/bench_static_compile.py --size small --batch_sizes 1 4 \
        --output benchmarks/results/static_compile_cpu_fp32_small.json
    python benchmarks/bench_static_compile.py --size real --device cuda      # says "skipped" without a GPU
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from bench_generate import DTYPES, SIZES
from common import build_models, describe_machine, skipped_without_cuda, synchronize, write_report
from transformers import GenerationConfig


def generation_config(base: GenerationConfig, variant: str, settings: dict) -> GenerationConfig:
    config = GenerationConfig.from_dict({**base.to_dict(), **settings})
    if variant != "dynamic":
        config.cache_implementation = "static"
    config.disable_compile = True  # the compiled variant compiles the forward itself (see the module docstring)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    arguments = parser.parse_args()
    transformers.logging.set_verbosity_error()
    command = shlex.join(["python", *sys.argv])
    device = torch.device(arguments.device)
    if skipped_without_cuda(device, command, arguments.output):
        return

    size, dtype = SIZES[arguments.size], DTYPES[arguments.dtype]
    machine = describe_machine(device)
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} using {machine['torch_threads']} "
          f"threads" + (f", {machine['gpu']}" if machine["gpu"] else ""))
    load_at_start = os.getloadavg()[0]
    _, model = build_models(size, arguments.seed)
    model = model.eval().to(device=device, dtype=dtype)
    settings = dict(num_beams=arguments.num_beams, min_new_tokens=arguments.new_tokens,
                    max_new_tokens=arguments.new_tokens, do_sample=False)
    variants = ("dynamic", "static", "static+compile")
    eager_forward = model.forward
    compiled_forward = torch.compile(model.forward, fullgraph=True)

    rows = []
    for batch_size in arguments.batch_sizes:
        shape = (batch_size, 3, size.image_size, size.image_size)
        pixels = torch.randn(shape, generator=torch.Generator().manual_seed(arguments.seed)).to(device, dtype)
        configs = {variant: generation_config(model.generation_config, variant, settings) for variant in variants}
        tokens, first_call, runs = {}, {}, {variant: [] for variant in variants}

        def run(variant: str) -> float:
            model.forward = compiled_forward if variant == "static+compile" else eager_forward
            synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode():
                tokens[variant] = model.generate(pixel_values=pixels, generation_config=configs[variant])
            synchronize(device)
            model.forward = eager_forward
            return time.perf_counter() - start

        for variant in variants:
            first_call[variant] = run(variant)  # warm-up; for the compiled variant, tracing and compiling
        for _ in range(arguments.repeats):
            for variant in variants:  # interleaved, so that drifts in machine speed hit all alike
                runs[variant].append(run(variant))
        seconds = {variant: statistics.median(times) for variant, times in runs.items()}
        rows.append({
            "batch_size": batch_size,
            "seconds": seconds,
            "first_call_s": first_call,
            "speedup_over_dynamic": {variant: seconds["dynamic"] / seconds[variant] for variant in variants},
            "identical": all(torch.equal(tokens[variant], tokens["dynamic"]) for variant in variants),
        })
        print(f"batch {batch_size} done", file=sys.stderr)

    print(f"\nsize {arguments.size}, {arguments.dtype}, {device.type}, beams {arguments.num_beams}, "
          f"{arguments.new_tokens} new tokens; seconds per generate call, median of {arguments.repeats}")
    print(f"{'batch':>5} | " + " | ".join(f"{variant:>15}" for variant in variants) + " | first compiled call | same tokens")
    for row in rows:
        cells = " | ".join(
            f"{row['seconds'][v]:7.3f} ({row['speedup_over_dynamic'][v]:4.2f}x)" for v in variants
        )
        print(f"{row['batch_size']:>5} | {cells} | {row['first_call_s']['static+compile']:17.1f} s | "
              f"{row['identical']}")
    load_average = {"start": load_at_start, "end": os.getloadavg()[0]}
    print(f"1-minute load average: {load_average['start']:.1f} at start, {load_average['end']:.1f} at end "
          f"({machine['cores']} cores)")
    write_report({
        "command": command, "machine": machine, "size": arguments.size, "dtype": arguments.dtype,
        "device": device.type, "num_beams": arguments.num_beams, "new_tokens": arguments.new_tokens,
        "repeats": arguments.repeats, "load_average": load_average, "rows": rows,
    }, arguments.output)


if __name__ == "__main__":
    main()
