"""The floor under an int8 caption's latency on this CPU: what one decoding step costs with every framework overhead
taken away, and in ONNX Runtime, against what it costs in `generate`.

One decoding step (beam rows = images x beams, mid-caption) is timed four ways on the same int8 weights:

- `generate`: our decode loop as users run it (`generate` given the encoder's output), per new token;
- `forward`: the model's forward for one token with its cache, without generate's beam bookkeeping;
- `flat step`: the same step written out as one function over the int8 model's own layers (its dynamic int8
  products, layer norms and activation; attention through SDPA), with no caches, masks or module wrappers: the
  PyTorch kernels alone, so no rewrite of the Python around them can beat it;
- `ONNX Runtime`: that flat step exported with `torch.onnx.export` from the float32 model and quantized with
  `onnxruntime.quantization.quantize_dynamic`: a runtime's int8 kernels and graph executor.

With the int8 encoder's batch-1 time and the image keys/values projection (once per caption) from the same run, the
floor of a one-image caption is encoder + projection + new_tokens x the fastest step, compared with
`--latency_target`. The flat step's float32 logits are checked against the model's own step, so every way computes
the same function.

onnxruntime, onnx and onnxscript are benchmark-only dependencies (see bench_int8_encoder.py); without them the ONNX
Runtime row is reported as skipped.

    .venv-bench/bin/python benchmarks/bench_decode_floor.py --size real --repeats 7 \
        --output benchmarks/results/decode_floor_cpu_real.json
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
from pathlib import Path

import torch
import transformers
from bench_generate import SIZES
from common import build_models, describe_machine, machine_line, memory_read_gbs, write_report
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

from modeling_vitgpt2.inference.quantization import quantize_for_cpu

STEP_INPUTS = ["input_ids", "position", "past_keys", "past_values", "image_keys", "image_values"]


class FlatStep(nn.Module):
    """One decoding step of `model`'s decoder and LM head, written out over its own layers (float32 or int8).

    input_ids `(rows, 1)`, position `(1,)`; past_keys/values `(blocks, rows, heads, past, head_dim)`; image
    keys/values `(blocks, images, heads, image_tokens, head_dim)`, each image's rows adjacent as in `generate`.
    Returns the next token's log-probabilities and the keys/values with this token appended.
    """

    def __init__(self, model: nn.Module, lm_head: nn.Module | None = None):
        super().__init__()
        self.decoder, self.lm_head = model.get_decoder(), lm_head or model.get_output_embeddings()
        config = model.config
        self.heads, self.width = config.n_head, config.n_embd

    def forward(self, input_ids, position, past_keys, past_values, image_keys, image_values):
        rows, heads, width = input_ids.shape[0], self.heads, self.width
        images = image_keys.shape[1]
        hidden = self.decoder.wte(input_ids) + self.decoder.wpe(position)[None]
        keys, values = [], []
        for index, block in enumerate(self.decoder.h):
            query, key, value = block.attn.c_attn(block.ln_1(hidden)).split(width, dim=2)
            query = query.view(rows, 1, heads, -1).transpose(1, 2)
            key = torch.cat([past_keys[index], key.view(rows, 1, heads, -1).transpose(1, 2)], dim=2)
            value = torch.cat([past_values[index], value.view(rows, 1, heads, -1).transpose(1, 2)], dim=2)
            keys.append(key)
            values.append(value)
            attended = F.scaled_dot_product_attention(query, key, value)
            hidden = hidden + block.attn.c_proj(attended.transpose(1, 2).reshape(rows, 1, width))
            cross = block.crossattention
            query = cross.q_attn(block.ln_cross_attn(hidden)).view(images, rows // images, heads, -1).transpose(1, 2)
            attended = F.scaled_dot_product_attention(query, image_keys[index], image_values[index])
            hidden = hidden + cross.c_proj(attended.transpose(1, 2).reshape(rows, 1, width))
            hidden = hidden + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(hidden))))
        logits = self.lm_head(self.decoder.ln_f(hidden))[:, -1]
        return F.log_softmax(logits, dim=-1), torch.stack(keys), torch.stack(values)


def image_keys_values(model: nn.Module, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block's keys/values of the image tokens, projected as `generate`'s first step projects them."""
    pairs = [block.crossattention.image_keys_values(image_tokens, image_tokens.shape[0], None)
             for block in model.get_decoder().h]
    return torch.stack([key for key, _ in pairs]), torch.stack([value for _, value in pairs])


def model_cache_after(model: nn.Module, image_tokens: torch.Tensor, tokens: torch.Tensor):
    """The model's own cache after reading `tokens` `(rows, past)`, and its step inputs in `FlatStep`'s layout."""
    with torch.inference_mode():
        output = model(decoder_input_ids=tokens, encoder_outputs=BaseModelOutput(last_hidden_state=image_tokens),
                       use_cache=True)
    layers = output.cache.self_attention_cache.layers
    return output.cache, torch.stack([layer.keys for layer in layers]), torch.stack([layer.values for layer in layers])


def check_flat_step(model: nn.Module, image_tokens: torch.Tensor, rows: int, past: int) -> float:
    """Largest difference between the float32 model's next-token log-probabilities and `FlatStep`'s."""
    tokens = torch.randint(0, model.config.vocab_size, (rows, past + 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(decoder_input_ids=tokens, encoder_outputs=BaseModelOutput(last_hidden_state=image_tokens))
        expected = F.log_softmax(full.logits[:, -1], dim=-1)
        _, past_keys, past_values = model_cache_after(model, image_tokens, tokens[:, :-1])
        flat, _, _ = FlatStep(model)(tokens[:, -1:], torch.tensor([past]), past_keys, past_values,
                                     *image_keys_values(model, image_tokens))
    return (flat - expected).abs().max().item()


def onnx_runtime_step(float32_model: nn.Module, example: tuple, folder: Path):
    """The flat step in ONNX Runtime's dynamic int8, as a function of the same inputs; None without onnxruntime."""
    if not all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnx", "onnxscript")):
        return None
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir(parents=True)
    config = float32_model.config
    # An untied plain copy of the LM head, as the int8 model has one: ONNX Runtime's quantizer leaves a product whose
    # weight is not a stored tensor of its own (the tied head reads the embedding, transposed) in float32.
    untied_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
    untied_head.weight = nn.Parameter(float32_model.get_output_embeddings().weight.detach().clone())
    exported, quantized = folder / "step.onnx", folder / "step_int8.onnx"
    rows, past = torch.export.Dim("rows"), torch.export.Dim("past", min=1, max=config.n_positions - 2)
    torch.onnx.export(
        FlatStep(float32_model, untied_head).eval(), example, exported, dynamo=True, input_names=STEP_INPUTS,
        output_names=["log_probs", "keys", "values"], external_data=True,
        dynamic_shapes=({0: rows}, None, {1: rows, 3: past}, {1: rows, 3: past}, None, None),
    )
    quantize_dynamic(exported, quantized, weight_type=QuantType.QInt8, use_external_data_format=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = onnxruntime.InferenceSession(quantized, options, providers=["CPUExecutionProvider"])
    return lambda *inputs: session.run(None, {name: tensor.numpy() for name, tensor in zip(STEP_INPUTS, inputs,
                                                                                         strict=True)})


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: weight packing, thread pool
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="real")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4], help="images per call (rows = x beams)")
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each way (median kept)")
    parser.add_argument("--with_int8_compiled", action="store_true",
                        help="also time the int8-compiled encoder (compiled once, then cached) and count the faster")
    parser.add_argument("--latency_target", type=float, default=0.5, help="seconds for one image's caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    transformers.logging.set_verbosity_error()
    machine = describe_machine(torch.device("cpu"))
    print(machine_line(machine))
    load_at_start = os.getloadavg()[0]
    bandwidth = memory_read_gbs(torch.device("cpu"))
    size = SIZES[arguments.size]
    _, float32_model = build_models(size, arguments.seed)
    float32_model.eval()
    int8_model = quantize_for_cpu(copy.deepcopy(float32_model))
    past = arguments.new_tokens // 2  # mid-caption: attention's share grows with the caption, the products' does not
    config = float32_model.config

    def encoder_output(images: int) -> torch.Tensor:
        pixels = torch.randn(images, 3, size.image_size, size.image_size,
                             generator=torch.Generator().manual_seed(arguments.seed))
        with torch.inference_mode():
            return int8_model.get_encoder()(pixel_values=pixels).last_hidden_state

    max_difference = check_flat_step(float32_model, encoder_output(1), arguments.num_beams, past)
    print(f"flat step against the model's own step, float32: largest log-probability difference {max_difference:.2e}")
    if max_difference > 1e-3:
        raise SystemExit("the flat step does not compute the model's step; fix FlatStep before timing it")

    pixels = torch.randn(1, 3, size.image_size, size.image_size)
    encoders = {"int8": int8_model.get_encoder()}
    if arguments.with_int8_compiled:
        encoders["int8_compiled"] = quantize_for_cpu(copy.deepcopy(float32_model), "int8-compiled").get_encoder()
    with torch.inference_mode():
        encoder_seconds = {name: median_seconds(lambda encoder=encoder: encoder(pixel_values=pixels),
                                                arguments.repeats) for name, encoder in encoders.items()}
        image_tokens = encoder_output(1)
        projection_s = median_seconds(lambda: image_keys_values(int8_model, image_tokens), arguments.repeats)
    encoder_s = min(encoder_seconds.values())
    print("encoder, one image: " + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in encoder_seconds.items())
          + f"; image keys/values projection: {projection_s * 1e3:.1f} ms")

    settings = dict(num_beams=arguments.num_beams, min_new_tokens=arguments.new_tokens,
                    max_new_tokens=arguments.new_tokens, do_sample=False)
    rows_report = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        for images in arguments.images:
            rows = images * arguments.num_beams
            image_tokens = encoder_output(images)
            tokens = torch.randint(0, config.vocab_size, (rows, past + 1),
                                   generator=torch.Generator().manual_seed(arguments.seed))
            cache, past_keys, past_values = model_cache_after(int8_model, image_tokens, tokens[:, :-1])
            image_keys, image_values = image_keys_values(int8_model, image_tokens)
            step = (tokens[:, -1:], torch.tensor([past]), past_keys, past_values, image_keys, image_values)
            encoder_outputs = BaseModelOutput(last_hidden_state=image_tokens)
            flat = FlatStep(int8_model)

            def forward_step() -> None:
                int8_model(decoder_input_ids=tokens[:, -1:], encoder_outputs=encoder_outputs, cache=cache)
                cache.crop(-1)  # the token just added: back to mid-caption for the next call

            ways = {
                "generate": lambda: int8_model.generate(encoder_outputs=encoder_outputs, **settings),
                "forward": forward_step,
                "flat step": lambda: flat(*step),
            }
            runtime = onnx_runtime_step(float32_model, step, Path(folder) / f"rows{rows}")
            agreement = None
            if runtime is not None:
                ways["ONNX Runtime"] = lambda: runtime(*step)
                # Same weights, other int8 kernels and rounding: the next token of each row should mostly agree.
                agreement = float((runtime(*step)[0].argmax(-1) == flat(*step)[0].argmax(-1).numpy()).mean())
            for name, function in ways.items():
                function()  # warm-up
            runs = {name: [] for name in ways}
            for _ in range(arguments.repeats):
                for name, function in ways.items():  # interleaved, so that load from other processes hits all alike
                    started = time.perf_counter()
                    function()
                    runs[name].append(time.perf_counter() - started)
            per_step = {name: statistics.median(seconds) * 1e3 for name, seconds in runs.items()}
            # generate's call also projects the image keys/values once; the rest is its new_tokens steps.
            per_step["generate"] = (per_step["generate"] - projection_s * 1e3) / arguments.new_tokens
            row = {"images": images, "rows": rows, "past_tokens": past, "step_ms": per_step,
                   "onnx_runtime_next_token_agreement": agreement,
                   "skipped": [] if runtime is not None else ["ONNX Runtime (pip install onnxruntime onnx onnxscript)"]}
            rows_report.append(row)
            print(f"{images} image(s), {rows} rows: " + ", ".join(f"{name} {ms:.1f} ms"
                                                                   for name, ms in per_step.items()) + " a step")

    one_image = rows_report[0]["step_ms"] if rows_report[0]["images"] == 1 else None
    floor = None
    if one_image is not None:
        fastest = min(one_image, key=one_image.get)
        floor = {"encoder_s": encoder_seconds, "image_keys_values_s": projection_s, "fastest_way": fastest,
                 "step_ms": one_image[fastest],
                 "caption_s": encoder_s + projection_s + arguments.new_tokens * one_image[fastest] / 1e3,
                 "as_generate_runs_s": encoder_s + projection_s + arguments.new_tokens * one_image["generate"] / 1e3,
                 "target_s": arguments.latency_target}
        print(f"one image's caption at best: {floor['caption_s']:.3f} s ({fastest} at every step) against "
              f"{floor['as_generate_runs_s']:.3f} s as generate runs it; target {arguments.latency_target} s")
    weight_bytes = sum(module.weight().numel() for module in int8_model.get_decoder().modules()
                       if isinstance(module, torch.ao.nn.quantized.dynamic.Linear))
    weight_bytes += int8_model.get_output_embeddings().weight().numel()
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine,
        "load_average": [load_at_start, os.getloadavg()[0]],
        "memory_read_gbs": bandwidth,
        "int8_weight_bytes_per_step": weight_bytes,
        "bandwidth_bound_step_ms": weight_bytes / (bandwidth * 1e9) * 1e3,
        "flat_step_max_difference": max_difference,
        "settings": {"num_beams": arguments.num_beams, "new_tokens": arguments.new_tokens, "size": arguments.size,
                     "repeats": arguments.repeats},
        "results": rows_report,
        "one_image_floor": floor,
    }
    print(f"reading the step's int8 weights ({weight_bytes / 2**20:.0f} MiB) at {bandwidth:.1f} GB/s takes "
          f"{report['bandwidth_bound_step_ms']:.1f} ms")
    write_report(report, arguments.output)


if __name__ == "__main__":
    main()
