"""Peak resident memory of loading a saved captioner for CPU inference (float32, float32 prepacked, int8, int8 with a
LoRA adapter, int8 with the encoder compiled: compiling it, and loading it compiled from the cache the first load
wrote), each followed by one `generate` call, every configuration in a fresh process.

A process's peak resident set size (`ru_maxrss`) only grows, so each configuration runs in its own subprocess: the
figure is what a user who loads the model this way needs, loading included. The model is built once at the chosen
size with random weights and saved with `save_pretrained` into a temporary folder (or `--model_dir`, kept for
later runs). `--compare_with PATH` also runs the int8 configuration with the package imported from another
checkout (e.g. a `git worktree` of main), and its int8 route through a LoRA adapter (merged into the float32
weights first), so a change's before and after are measured on the same machine and folder.

    python benchmarks/bench_int8_memory.py --size real --compare_with ../main \
        --output benchmarks/results/int8_memory_cpu_real.json

The machine is shared with other jobs: generate timings are noisy, resident memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import describe_machine, write_report

REPOSITORY = Path(__file__).resolve().parents[1]

# Encoder and decoder sizes; "real" is the default ViTGPT2Config: ViT-L/14 at 224 px + GPT-2 small.
SIZES = {
    "tiny": dict(encoder_name="vit_large_patch14_clip_224",
                 encoder_kwargs=dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2),
                 encoder_hidden_size=32, vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                 bos_token_id=299, eos_token_id=299, pad_token_id=299, decoder_start_token_id=299),
    "real": {},
}
CONFIGURATIONS = ("fp32", "fp32_prepacked", "int8", "int8_lora", "int8_compiled", "int8_compiled_cached")
LORA_FOLDER = "lora"  # inside the model folder: a LoRA adapter on it, for the int8 route that merges one first


def save_random_model(size: str, folder: Path, seed: int) -> int:
    """Saves a model of `size` with random weights (dropout off) into `folder`; returns its parameter count."""
    from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration

    torch.manual_seed(seed)
    config = ViTGPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SIZES[size])
    model = ViTGPT2ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def save_models(arguments: argparse.Namespace) -> None:
    """Run in a child process: the random model (and LoRA adapter) the configurations load, unless already saved."""
    folder = arguments.model_dir
    if not (folder / "config.json").is_file():
        parameters = save_random_model(arguments.size, folder, arguments.seed)
        print(f"saved a random {arguments.size} model ({parameters / 1e6:.0f}M parameters) to {folder}")
    if "int8_lora" in arguments.configurations and not (folder / LORA_FOLDER).is_dir():
        save_random_lora(folder, arguments.seed)


def save_random_lora(folder: Path, seed: int) -> None:
    """Saves a LoRA adapter with random (not identity) weights on the model in `folder` into `folder/lora`, with
    the model as its bundled base: `load_for_inference` merges it into the float32 weights before int8."""
    from peft import LoraConfig, get_peft_model

    from modeling_vitgpt2.inference.loading import BASE_MODEL_FOLDER, load_for_inference
    from modeling_vitgpt2.training.peft_methods import DEFAULT_LORA_TARGETS

    torch.manual_seed(seed)
    adapter = folder / LORA_FOLDER
    model = get_peft_model(load_for_inference(folder), LoraConfig(
        r=8, target_modules=DEFAULT_LORA_TARGETS, fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(adapter)
    (adapter / BASE_MODEL_FOLDER).symlink_to(folder.resolve(), target_is_directory=True)


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def measure(configuration: str, folder: Path, num_beams: int, new_tokens: int) -> dict:
    """Run in the child process: load `folder` as `configuration`, then one generate call at batch 1."""
    import transformers

    from modeling_vitgpt2.inference.loading import load_for_inference

    transformers.logging.set_verbosity_error()
    imported = {"resident_mb": _resident_mb(), "peak_mb": _peak_mb()}
    start = time.perf_counter()
    if configuration.startswith("int8"):
        model = load_for_inference(folder / LORA_FOLDER if configuration == "int8_lora" else folder,
                                   quantize="int8-compiled" if "compiled" in configuration else "int8")
    else:
        model = load_for_inference(folder)
        if configuration == "fp32_prepacked":
            from modeling_vitgpt2.inference.prepacking import prepack_for_cpu

            model = prepack_for_cpu(model)
    # int8_compiled compiles in a child process: its peak is memory the machine needs at the same time.
    loaded = {"seconds": time.perf_counter() - start, "resident_mb": _resident_mb(), "peak_mb": _peak_mb(),
              "child_peak_mb": _peak_mb(resource.RUSAGE_CHILDREN)}
    side = model.config.encoder_kwargs.get("img_size", 224)
    pixels = torch.randn((1, 3, side, side), generator=torch.Generator().manual_seed(0))
    settings = dict(num_beams=num_beams, min_new_tokens=new_tokens, max_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        start = time.perf_counter()
        tokens = model.generate(pixel_values=pixels, **settings)
        seconds = time.perf_counter() - start
    generated = {"seconds": seconds, "resident_mb": _resident_mb(), "peak_mb": _peak_mb()}
    return {"after_import": imported, "after_load": loaded, "after_generate": generated,
            "tokens": tokens.tolist()}


def run_child(configuration: str, folder: Path, arguments, code: Path, compiled_cache: Path) -> dict:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]),
                       VITGPT2_COMPILED_ENCODER_CACHE=str(compiled_cache))
    finished = subprocess.run(
        [sys.executable, __file__, "--child", configuration, "--model_dir", str(folder),
         "--num_beams", str(arguments.num_beams), "--new_tokens", str(arguments.new_tokens)],
        capture_output=True, text=True, env=environment, check=False,
    )
    if finished.returncode != 0:
        raise RuntimeError(f"{configuration} with {code} failed:\n{finished.stderr}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def git_commit(code: Path) -> str | None:
    found = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or None


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--configurations", nargs="+", choices=CONFIGURATIONS, default=list(CONFIGURATIONS))
    parser.add_argument("--compare_with", type=Path,
                        help="another checkout of this repository: its int8 path is measured too")
    parser.add_argument("--model_dir", type=Path,
                        help="where the random model is saved (kept; reused when it holds one already)")
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=20, help="every caption is exactly this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--save_child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.child:
        print(json.dumps(measure(arguments.child, arguments.model_dir, arguments.num_beams, arguments.new_tokens)))
        return
    if arguments.save_child:
        save_models(arguments)
        return
    command = shlex.join(["python", *sys.argv])
    machine = describe_machine(torch.device("cpu"))
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0] if Path(
        "/proc/cpuinfo").exists() else ""
    machine["cpu_flags"] = sorted(flag for flag in flags.replace(":", " ").split()
                                  if flag.startswith(("avx", "amx", "fma", "f16c")))
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, CPU capability "
          f"{machine['cpu_capability']}, flags {' '.join(machine['cpu_flags'])}")
    with tempfile.TemporaryDirectory() as temporary:
        folder = arguments.model_dir or Path(temporary)
        # In a process of its own: a child process starts with its parent's peak resident size (ru_maxrss carries
        # over fork and exec), so a parent that had held the model would set every measurement's floor.
        subprocess.run([sys.executable, __file__, "--save_child", "--size", arguments.size, "--model_dir", str(folder),
                        "--seed", str(arguments.seed), "--configurations", *arguments.configurations], check=True)
        weights_mb = sum(path.stat().st_size for path in folder.glob("*.safetensors")) / 2**20
        # int8_compiled compiles into an empty cache of this run's own; int8_compiled_cached loads what it wrote.
        compiled_cache = Path(temporary) / "compiled_encoders"
        configurations = list(arguments.configurations)
        if "int8_compiled_cached" in configurations and "int8_compiled" not in configurations:
            configurations.insert(configurations.index("int8_compiled_cached"), "int8_compiled")
        runs = [(configuration, REPOSITORY) for configuration in configurations]
        if arguments.compare_with is not None:
            runs[:0] = [(configuration, arguments.compare_with.resolve()) for configuration in ("int8", "int8_lora")
                        if configuration in arguments.configurations]
        results = []
        for configuration, code in runs:
            label = configuration if code == REPOSITORY else f"{configuration} ({code.name})"
            result = run_child(configuration, folder, arguments, code, compiled_cache)
            results.append({"configuration": label, "code": str(code), "commit": git_commit(code), **result})
            print(f"{label} done", file=sys.stderr)
    compared = {result["configuration"].split()[0]: result for result in results if result["code"] != str(REPOSITORY)}
    for result in results:
        baseline = compared.get(result["configuration"]) if result["code"] == str(REPOSITORY) else None
        result["same_tokens_as_compared"] = None if baseline is None else result["tokens"] == baseline["tokens"]
    print(f"\nsaved weights {weights_mb:.0f} MiB; beams {arguments.num_beams}, {arguments.new_tokens} new tokens, "
          "batch 1; every configuration in a fresh process\n")
    print(f"{'configuration':<22} {'load s':>7} {'RSS loaded MiB':>14} {'peak load MiB':>13} "
          f"{'peak MiB':>9} {'child peak MiB':>14} {'generate s':>10} {'same tokens':>11}")
    for result in results:
        print(f"{result['configuration']:<22} {result['after_load']['seconds']:>7.1f} "
              f"{result['after_load']['resident_mb']:>14.0f} {result['after_load']['peak_mb']:>13.0f} "
              f"{result['after_generate']['peak_mb']:>9.0f} {result['after_load']['child_peak_mb']:>14.0f} "
              f"{result['after_generate']['seconds']:>10.2f} {str(result['same_tokens_as_compared']):>11}")
    print("peak: the process's peak resident set size (ru_maxrss) over import, load and one generate call; 'child "
          "peak': the largest child process's (int8_compiled compiles in one, while the process holds the float32 "
          "encoder; the other configurations' children are helper processes that importing torch and transformers "
          "starts); 'same tokens': the generated tokens equal those of the same configuration run with "
          "--compare_with's code")
    write_report({"command": command, "machine": machine, "size": arguments.size, "weights_mib": weights_mb,
                  "num_beams": arguments.num_beams, "new_tokens": arguments.new_tokens,
                  "load_average_end": os.getloadavg()[0], "runs": results}, arguments.output)


if __name__ == "__main__":
    main()
