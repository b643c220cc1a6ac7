"""Demo throughput: concurrent visitors of `app.py` against the one-at-a-time page (`--max_batch_size 1`) and the
batched page (`--max_batch_size N`), in one run, through `gradio_client` on 127.0.0.1.

Both pages serve the same model folder: our model with random weights at `--size` (the shapes of
bench_generate.py; a made-up vocabulary of the model's size, so that every token decodes), or `--model FOLDER`,
with the same `--quantize` (none, int8 or int8-compiled, as a Space on a CPU would run it).
First every image is captioned alone, one call at a time: its single-call caption. Then `--callers` threads, each
its own client, start together and each sends `--requests` captions back to back; every answer must equal its
image's single-call caption. Reported per page: images/s over the burst, latency p50/p95 per request; and the
ratio of the two images/s. The loads alternate between the pages `--repeats` times (median kept), so load from
other processes on the machine falls on both.

Bounded: at most 64 callers and 16 requests each, loopback only, and a burst that runs past `--time_limit` seconds
stops the run.

    python benchmarks/bench_demo_batching.py --size tiny --output benchmarks/results/demo_batching_cpu_tiny.json
    python benchmarks/bench_demo_batching.py --size real --callers 16 --requests 1 \
        --output benchmarks/results/demo_batching_cpu_real.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shlex
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

import torch
import transformers
from bench_generate import SIZES
from common import build_models, describe_machine, write_report
from gradio_client import Client, handle_file
from transformers import GPT2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from modeling_vitgpt2 import ViTGPT2Processor
from modeling_vitgpt2.data.synthetic import draw_scene, random_scene

APP = Path(__file__).resolve().parents[1] / "app.py"
END_OF_TEXT = "<|endoftext|>"
MAX_CALLERS, MAX_REQUESTS = 64, 16


def made_up_tokenizer(vocab_size: int) -> GPT2Tokenizer:
    """A GPT-2 tokenizer of exactly `vocab_size` tokens (GPT-2's 256 byte symbols, made-up words, then the end
    token last, where the benchmark models have it), so that a random model's every token decodes."""
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    words = ("".join(letters) for length in itertools.count(2)
             for letters in itertools.product(string.ascii_lowercase, repeat=length))
    while len(vocab) < vocab_size - 1:
        vocab["Ġ" + next(words)] = len(vocab)
    vocab[END_OF_TEXT] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=[], bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
                         pad_token=END_OF_TEXT)


def save_random_model(size_name: str, folder: Path, seed: int) -> None:
    _, model = build_models(SIZES[size_name], seed)
    tokenizer = made_up_tokenizer(model.config.vocab_size)
    assert tokenizer.eos_token_id == model.config.vocab_size - 1  # build_models' end token
    ViTGPT2Processor.from_timm_model(model.encoder.model, tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """`count` different generated scenes, 320 px."""
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        path = folder / f"scene_{index:03d}.png"
        draw_scene(random_scene(rng), 320).save(path)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, max_batch_size: int, log_path: Path, quantize: str | None = None,
            start_seconds: float = 600):
    """`python app.py --model MODEL --max_batch_size N [--quantize Q]` on 127.0.0.1; yields its URL once it
    answers."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(APP), "--model", str(model), "--max_batch_size", str(max_batch_size),
             "--server_name", "127.0.0.1", "--server_port", str(port),
             *(["--quantize", quantize] if quantize else [])],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + start_seconds
        try:
            while True:
                if process.poll() is not None:
                    sys.exit(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
                if time.monotonic() > deadline:
                    sys.exit(f"app.py did not serve {url} within {start_seconds} s")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def caption(client: Client, image: Path, settings: dict, timeout: float) -> str:
    job = client.submit(handle_file(str(image)), settings["num_beams"], settings["max_new_tokens"], 1.0, ["all"],
                        "mean", api_name="/caption")
    return job.result(timeout=timeout)[0]


def run_burst(url: str, images: list[Path], callers: int, requests: int, settings: dict, time_limit: float,
              server_log: Path) -> dict:
    """`callers` clients start together; each sends `requests` captions back to back (its own run of images)."""
    clients = [Client(url, verbose=False) for _ in range(callers)]
    start_line = threading.Barrier(callers + 1)
    answers: list[list] = [[] for _ in range(callers)]
    errors: list[BaseException] = []

    def visitor(index: int) -> None:
        start_line.wait()
        try:
            for request in range(requests):
                image = images[(index * requests + request) % len(images)]
                sent = time.perf_counter()
                text = caption(clients[index], image, settings, time_limit)
                answers[index].append((image, text, time.perf_counter() - sent))
        except BaseException as error:  # a timed-out or failed request fails the run below
            errors.append(error)

    threads = [threading.Thread(target=visitor, args=(index,), daemon=True) for index in range(callers)]
    for thread in threads:
        thread.start()
    start_line.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=max(0.0, time_limit - (time.perf_counter() - started)))
    seconds = time.perf_counter() - started
    if errors or any(thread.is_alive() for thread in threads):
        # The caller's traceback says which request broke, the server's log why.
        failure = "".join(traceback.format_exception(errors[0])[-6:]) if errors else "still running\n"
        sys.exit(f"the burst failed or ran past --time_limit {time_limit} s ({len(errors)} of {callers} callers "
                 f"failed):\n{failure}server log ({server_log}), last lines:\n{server_log.read_text()[-3000:]}")
    for client in clients:
        client.close()
    done = [answer for caller in answers for answer in caller]
    latencies = sorted(latency for _, _, latency in done)
    return {
        "images": len(done),
        "seconds": seconds,
        "images_per_s": len(done) / seconds,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "captions": [(image.name, text) for image, text, _ in done],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "small", "real"], default="tiny",
                        help="random weights at bench_generate.py's shapes (ignored with --model)")
    parser.add_argument("--model", type=Path, help="a model folder to serve instead")
    parser.add_argument("--max_batch_size", type=int, default=8, help="the batched page's --max_batch_size")
    parser.add_argument("--quantize", choices=["int8", "int8-compiled"], help="both pages' --quantize")
    parser.add_argument("--callers", type=int, default=16, help=f"concurrent clients (at most {MAX_CALLERS})")
    parser.add_argument("--requests", type=int, default=2, help=f"captions per caller (at most {MAX_REQUESTS})")
    parser.add_argument("--images", type=int, default=16, help="different images the callers send")
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="bursts per page, alternating (median kept)")
    parser.add_argument("--time_limit", type=float, default=900, help="seconds one burst may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    arguments = parser.parse_args()
    if not (1 <= arguments.callers <= MAX_CALLERS and 1 <= arguments.requests <= MAX_REQUESTS):
        parser.error(f"--callers 1..{MAX_CALLERS} and --requests 1..{MAX_REQUESTS}")
    transformers.logging.set_verbosity_error()
    machine = describe_machine(torch.device("cpu"))
    flags = " ".join(flag for flag, present in machine["cpu_flags"].items() if present)
    print(f"{machine['cpu']}, {machine['cores']} cores ({flags}), torch {machine['torch']}")
    settings = {"num_beams": arguments.num_beams, "max_new_tokens": arguments.max_new_tokens}

    with tempfile.TemporaryDirectory(prefix="bench-demo-") as scratch:
        scratch = Path(scratch)
        model = arguments.model
        if model is None:
            model = scratch / "model"
            save_random_model(arguments.size, model, arguments.seed)
        images = write_images(scratch, arguments.images, arguments.seed)
        pages = {"one_at_a_time": 1, "batched": arguments.max_batch_size}
        with contextlib.ExitStack() as servers:
            urls = {name: servers.enter_context(serving(model, size, scratch / f"{name}.log", arguments.quantize))
                    for name, size in pages.items()}
            # Single-call captions: one request at a time, so each is a batch of one.
            single_client = Client(urls["one_at_a_time"], verbose=False)
            alone = {image.name: caption(single_client, image, settings, arguments.time_limit) for image in images}
            single_client.close()
            bursts: dict[str, list[dict]] = {name: [] for name in pages}
            for repeat in range(arguments.repeats):
                for name in pages:
                    burst = run_burst(urls[name], images, arguments.callers, arguments.requests, settings,
                                      arguments.time_limit, scratch / f"{name}.log")
                    equal = [alone[image] == text for image, text in burst.pop("captions")]
                    burst["identical_captions"] = all(equal)
                    burst["captions_equal_to_single_call"] = sum(equal)
                    bursts[name].append(burst)
                    print(f"  repeat {repeat + 1} {name:<14} {burst['images_per_s']:6.2f} images/s  p50 "
                          f"{burst['latency_p50_s']:6.2f} s  p95 {burst['latency_p95_s']:6.2f} s  "
                          f"captions equal to single-call: {sum(equal)} of {len(equal)}")

    rows = {}
    for name, size in pages.items():
        runs = bursts[name]
        rows[name] = {
            "max_batch_size": size,
            **{key: statistics.median(run[key] for run in runs)
               for key in ("images_per_s", "latency_p50_s", "latency_p95_s", "seconds")},
            "images": runs[0]["images"],
            "identical_captions": all(run["identical_captions"] for run in runs),
            "runs": runs,
        }
    speedup = rows["batched"]["images_per_s"] / rows["one_at_a_time"]["images_per_s"]
    print(f"\n{'page':<16}{'batch':>6}{'images/s':>10}{'p50 s':>9}{'p95 s':>9}  captions = single-call")
    for name, row in rows.items():
        print(f"{name:<16}{row['max_batch_size']:>6}{row['images_per_s']:>10.2f}{row['latency_p50_s']:>9.2f}"
              f"{row['latency_p95_s']:>9.2f}  {row['identical_captions']}")
    print(f"batched / one at a time: {speedup:.2f}x images/s")
    write_report({
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine,
        "load_average": os.getloadavg()[0],
        "model": str(arguments.model) if arguments.model else f"random weights, --size {arguments.size}",
        "quantize": arguments.quantize,
        "callers": arguments.callers,
        "requests_per_caller": arguments.requests,
        "settings": {**settings, "length_penalty": 1.0, "layers": "all", "head": "mean"},
        "pages": rows,
        "speedup": speedup,
        "identical_captions": all(row["identical_captions"] for row in rows.values()),
    }, arguments.output)


if __name__ == "__main__":
    main()
