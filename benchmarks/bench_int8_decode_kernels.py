"""The int8 kernels a decoding step could run on a CPU, on the real decoder's products: what `--quantize int8` runs
(`quantized::linear_dynamic`: int8 weights, activations quantized per call with one scale for all rows) against
weight-only int8 (`torch._weight_int8pack_mm`: int8 weights with one scale per output row, activations kept in
float32 or bfloat16), with float32 `F.linear` for reference.

Weight-only int8 would make a row's result independent of the other rows in its batch (dynamic int8 shares one
activation scale across them, so a caption can change with its batch) and rounds less; this measures whether its
kernel is fast enough at a decoding step's few rows. Every product of one step is timed in turn, 12 blocks with
weights of their own plus the LM head, so the weights come from memory as in a real step.

    python benchmarks/bench_int8_decode_kernels.py --output benchmarks/results/int8_decode_kernels_cpu.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from common import describe_machine, machine_line, memory_read_gbs, write_report
from torch import nn

WIDTH, BLOCKS, VOCABULARY = 768, 12, 50257
# (in, out) of a GPT-2 block's products in a decoding step: self-attention qkv and output, cross-attention query and
# output (the image keys/values are projected once per call, not per step), MLP up and down.
BLOCK_PRODUCTS = [(WIDTH, 3 * WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, 4 * WIDTH),
                  (4 * WIDTH, WIDTH)]
DynamicInt8Linear = torch.ao.nn.quantized.dynamic.Linear


def dynamic_int8(linear: nn.Linear, per_output_row: bool) -> DynamicInt8Linear:
    """As `modeling_vitgpt2.inference.quantization` builds them (per output row for the LM head only)."""
    linear.qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if per_output_row
                      else torch.ao.quantization.default_dynamic_qconfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notices of torch.ao (see quantization.py)
        return DynamicInt8Linear.from_float(linear)


def weight_only_int8(linear: nn.Linear, dtype: torch.dtype):
    """Symmetric int8 weights with one scale per output row, for `torch._weight_int8pack_mm` in `dtype`."""
    weight = linear.weight.detach()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    int8_weight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    scales, bias = scales.to(dtype), linear.bias.detach().to(dtype)
    return lambda rows: torch._weight_int8pack_mm(rows.to(dtype), int8_weight, scales) + bias


def products(seed: int) -> list[nn.Linear]:
    torch.manual_seed(seed)
    layers = [nn.Linear(fan_in, fan_out) for _ in range(BLOCKS) for fan_in, fan_out in BLOCK_PRODUCTS]
    layers.append(nn.Linear(WIDTH, VOCABULARY))
    for layer in layers:
        nn.init.normal_(layer.weight, std=0.02)  # GPT-2's initialisation
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[3, 12], help="decoder rows (images x beams)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per kernel (median kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    arguments = parser.parse_args()
    machine = describe_machine(torch.device("cpu"))
    print(machine_line(machine))
    load_at_start = os.getloadavg()[0]
    bandwidth = memory_read_gbs(torch.device("cpu"))
    layers = products(arguments.seed)
    last = len(layers) - 1
    kernels = {
        "float32 F.linear": [layer.forward for layer in layers],
        "dynamic int8 (ours)": [dynamic_int8(layer, index == last) for index, layer in enumerate(layers)],
        "weight-only int8, float32": [weight_only_int8(layer, torch.float32) for layer in layers],
        "weight-only int8, bfloat16": [weight_only_int8(layer, torch.bfloat16) for layer in layers],
    }
    rows_report = []
    with torch.inference_mode():
        for rows in arguments.rows:
            inputs = [torch.randn(rows, layer.in_features) for layer in layers]
            references = [layer(row) for layer, row in zip(layers, inputs, strict=True)]
            for name, step in kernels.items():
                def run_step() -> list[torch.Tensor]:
                    return [product(row) for product, row in zip(step, inputs, strict=True)]

                run_step()  # warm-up: packing, thread pool
                seconds = []
                for _ in range(arguments.repeats):
                    started = time.perf_counter()
                    outputs = run_step()
                    seconds.append(time.perf_counter() - started)
                error = max(((output.float() - reference).norm() / reference.norm()).item()
                            for output, reference in zip(outputs, references, strict=True))
                # A row alone against the same row inside the batch, on every product of the step.
                invariant = all(torch.equal(product(row[:1]), product(row)[:1])
                                for product, row in zip(step, inputs, strict=True))
                rows_report.append({"rows": rows, "kernel": name, "step_ms": 1e3 * statistics.median(seconds),
                                    "max_relative_error": error, "row_independent_of_batch": invariant})
                print(f"{rows:>3} rows  {name:<28} {rows_report[-1]['step_ms']:8.2f} ms a step  "
                      f"max relative error {error:.4f}  row independent of batch: {invariant}", flush=True)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine,
        "load_average": [load_at_start, os.getloadavg()[0]],
        "memory_read_gbs": bandwidth,
        "results": rows_report,
    }
    write_report(report, arguments.output)


if __name__ == "__main__":
    main()
