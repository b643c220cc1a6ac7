"""The vision encoder alone, on the same weights, in every runtime we compare on a CPU: ours in float32 (prepacked, as
`eval.py caption` runs it), in int8 (`--quantize int8`: eager fbgemm layers), int8 compiled (`--quantize
int8-compiled`: torchao PT2E + Inductor) and bfloat16 (`--dtype bfloat16`, where the CPU has its instructions);
ONNX Runtime's dynamic int8 (the timm ViT exported with `torch.onnx.export`, quantized with
`onnxruntime.quantization.quantize_dynamic`); OpenVINO at its default precision for this CPU (bfloat16 where it has
avx512_bf16 or AMX) and in float32, converted from the same module with `openvino.convert_model`.

The encoder is where int8 and bfloat16 pay off: it is bound by arithmetic, while the decode loop is bound by reading
weights (bench_generate.py times both). Calls are interleaved (each repeat times every runtime once, in turn), medians
kept, so that load from other processes falls on all of them alike. Each runtime's output is compared with float32's
(cosine similarity of the tokens), which also shows that all of them run the same weights.

onnxruntime, onnx and openvino are benchmark-only dependencies, in their own environment (they are not needed by the
package): a runtime whose package is missing is reported as skipped.

    python -m venv --system-site-packages .venv-bench && .venv-bench/bin/pip install onnxruntime onnx openvino
    .venv-bench/bin/python benchmarks/bench_int8_encoder.py --size real --batch_sizes 1 4 8 --repeats 5 \
        --output benchmarks/results/int8_encoder_cpu_real.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_generate import SIZES
from common import build_models, describe_machine, write_report
from torch import nn

from modeling_vitgpt2.inference.compiled_encoder import TokenFeatures
from modeling_vitgpt2.inference.prepacking import prepack_for_cpu
from modeling_vitgpt2.inference.quantization import quantize_for_cpu
from modeling_vitgpt2.utils.cpu_features import has_fast_bfloat16

# What each runtime is, as the table's footnote and the JSON say it.
RUNTIMES = {
    "fp32": "ours, float32 with prepacked linear layers (eval.py caption's default on a CPU)",
    "int8": "ours, --quantize int8: eager dynamic int8 layers (fbgemm through torch.ao quantize_dynamic)",
    "int8_compiled": "ours, --quantize int8-compiled: torchao PT2E x86 dynamic int8, compiled by Inductor with "
                     "freezing, one image per call",
    "bf16": "ours, --dtype bfloat16",
    "ort_int8": "ONNX Runtime, dynamic int8 (onnxruntime.quantization.quantize_dynamic, QInt8 weights)",
    "openvino": "OpenVINO at its default inference precision for this CPU",
    "openvino_fp32": "OpenVINO with INFERENCE_PRECISION_HINT f32",
}


def ours(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    encoder = model.get_encoder()

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encoder(pixel_values=pixels).last_hidden_state.float()

    return run


def onnx_runtime_int8(vit: nn.Module, example: torch.Tensor, folder: Path, threads: int):
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path, int8_path = folder / "encoder.onnx", folder / "encoder_int8.onnx"
    torch.onnx.export(TokenFeatures(vit).eval(), (example,), str(float_path), input_names=["pixel_values"],
                      output_names=["tokens"], dynamic_axes={"pixel_values": {0: "batch"}, "tokens": {0: "batch"}},
                      dynamo=False)
    quantize_dynamic(str(float_path), str(int8_path), weight_type=QuantType.QInt8)
    float_path.unlink()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    return lambda pixels: torch.from_numpy(session.run(None, {"pixel_values": pixels.numpy()})[0])


def openvino_model(vit: nn.Module, example: torch.Tensor, threads: int, precision: str | None):
    import openvino

    converted = openvino.convert_model(TokenFeatures(vit).eval(), example_input=example,
                                       input=[(-1, *example.shape[1:])])
    config = {"INFERENCE_NUM_THREADS": threads, **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
    compiled = openvino.Core().compile_model(converted, "CPU", config)
    precision_used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(compiled(pixels.numpy())[0]))

    return run, precision_used


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per runtime and batch size (median kept)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES),
                        help="which to time (default: all; those whose package is missing are skipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    command = shlex.join(["python", *sys.argv])
    machine = describe_machine(torch.device("cpu"))
    threads = torch.get_num_threads()
    print(f"{machine['cpu']}, {machine['cores']} cores, {threads} threads, CPU capability "
          f"{machine['cpu_capability']}, flags {', '.join(f for f, present in machine['cpu_flags'].items() if present)}")
    load_at_start = os.getloadavg()[0]
    size = SIZES[arguments.size]
    peer, model = build_models(size, arguments.seed)
    del peer
    model.eval()
    vit = model.get_encoder().model
    example = torch.randn(1, 3, size.image_size, size.image_size, generator=torch.Generator().manual_seed(0))

    wanted = set(arguments.runtimes)
    skipped = {}
    for name, module in (("ort_int8", "onnxruntime"), ("openvino", "openvino"), ("openvino_fp32", "openvino")):
        if name in wanted and importlib.util.find_spec(module) is None:
            skipped[name] = f"{module} is not installed"
    if "bf16" in wanted and not has_fast_bfloat16():
        skipped["bf16"] = "this CPU has neither avx512_bf16 nor AMX (--dtype bfloat16 is refused here)"
    wanted -= set(skipped)

    runtimes, setup_s, notes = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name in RUNTIMES:
            if name not in wanted:
                continue
            print(f"preparing {name}...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            if name == "fp32":
                runtimes[name] = ours(prepack_for_cpu(copy.deepcopy(model)))
            elif name == "int8":
                runtimes[name] = ours(quantize_for_cpu(copy.deepcopy(model)))
            elif name == "int8_compiled":
                runtimes[name] = ours(quantize_for_cpu(copy.deepcopy(model), "int8-compiled"))
            elif name == "bf16":
                runtimes[name] = ours(copy.deepcopy(model).to(torch.bfloat16))
            elif name == "ort_int8":
                runtimes[name] = onnx_runtime_int8(vit, example, Path(folder), threads)
            else:
                runtimes[name], notes[name] = openvino_model(vit, example, threads,
                                                             "f32" if name == "openvino_fp32" else None)
            setup_s[name] = time.perf_counter() - started

        rows = []
        for batch_size in arguments.batch_sizes:
            pixels = torch.randn(batch_size, 3, size.image_size, size.image_size,
                                 generator=torch.Generator().manual_seed(arguments.seed))
            reference = runtimes["fp32"](pixels) if "fp32" in runtimes else None
            seconds = {name: [] for name in runtimes}
            agreement = {}
            for name, run in runtimes.items():  # warm-up, and the output to compare
                output = run(pixels)
                if reference is not None:
                    agreement[name] = torch.nn.functional.cosine_similarity(
                        output.flatten(), reference.flatten(), dim=0).item()
            for _ in range(arguments.repeats):
                for name, run in runtimes.items():
                    started = time.perf_counter()
                    run(pixels)
                    seconds[name].append(time.perf_counter() - started)
            row = {"batch_size": batch_size,
                   **{name: {"seconds": statistics.median(times), "runs": times,
                             "images_per_s": batch_size / statistics.median(times),
                             "cosine_to_fp32": agreement.get(name)} for name, times in seconds.items()}}
            for name in runtimes:
                if "ort_int8" in runtimes and name != "ort_int8":
                    row[name]["speedup_over_ort_int8"] = row["ort_int8"]["seconds"] / row[name]["seconds"]
                if "fp32" in runtimes and name != "fp32":
                    row[name]["speedup_over_fp32"] = row["fp32"]["seconds"] / row[name]["seconds"]
            rows.append(row)
            print(f"batch {batch_size} done", file=sys.stderr, flush=True)

    names = list(runtimes)
    print(f"\nseconds per encoder call (median of {arguments.repeats}, interleaved), size {arguments.size}")
    print(f"{'batch':>5} " + " ".join(f"{name:>13}" for name in names))
    for row in rows:
        print(f"{row['batch_size']:>5} " + " ".join(f"{row[name]['seconds']:>13.3f}" for name in names))
    for reference_name in ("ort_int8", "fp32"):
        if reference_name in runtimes:
            others = [name for name in names if name != reference_name]
            print(f"\nspeedup over {reference_name}")
            for row in rows:
                print(f"{row['batch_size']:>5} " + " ".join(
                    f"{name}={row[name][f'speedup_over_{reference_name}']:.2f}x" for name in others))
    print("\ncosine similarity to float32 (batch " + f"{rows[0]['batch_size']}): " + ", ".join(
        f"{name} {rows[0][name]['cosine_to_fp32']:.5f}" for name in names if rows[0][name]["cosine_to_fp32"]))
    print("set-up seconds (export, quantize, compile): " + ", ".join(f"{k} {v:.1f}" for k, v in setup_s.items()))
    for name in names:
        print(f"{name}: {RUNTIMES[name]}" + (f" (precision used: {notes[name]})" if name in notes else ""))
    for name, reason in skipped.items():
        print(f"{name}: skipped, {reason}")
    load_average = {"start": load_at_start, "end": os.getloadavg()[0]}
    print(f"1-minute load average: {load_average['start']:.1f} at start, {load_average['end']:.1f} at end")

    versions = {package: _version(package) for package in ("torch", "torchao", "onnxruntime", "openvino")}
    write_report({
        "command": command, "machine": machine, "versions": versions, "size": arguments.size,
        "repeats": arguments.repeats, "load_average": load_average, "runtimes": {n: RUNTIMES[n] for n in names},
        "openvino_precision": notes, "setup_s": setup_s, "skipped": skipped, "rows": rows,
    }, arguments.output)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
