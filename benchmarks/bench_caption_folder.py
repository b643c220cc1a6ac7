"""Captioning a folder (`eval.py caption`): images/s with image decoding and preprocessing in DataLoader workers,
overlapping the model, against the plain loop that decodes each batch in the main process (`--num_workers 0`).

The folder holds real-size JPEGs (640 x 480, as in COCO): random crops of the photos in ../shared/data/real_images,
written once into a temporary folder. Both ways caption the same files and must write the same captions.

    python benchmarks/bench_caption_folder.py --model outputs/synthetic-default --images 64 \
        --output benchmarks/results/caption_folder_cpu.json
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from common import describe_machine, write_report
from PIL import Image

from modeling_vitgpt2.evaluation.jobs import caption_images, default_loader_workers, load_captioner
from modeling_vitgpt2.evaluation.zero_shot import list_images

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real_images"


def write_photo_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` 640 x 480 JPEGs cut at random from the shared real photos."""
    sources = sorted(path for path in PHOTOS.rglob("*") if path.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not sources:
        sys.exit(f"no photos under {PHOTOS}: this benchmark needs ../shared/data/real_images")
    rng = random.Random(seed)
    photos = [Image.open(path).convert("RGB") for path in sources]
    for index in range(count):
        photo = rng.choice(photos)
        scale = max(640 / photo.width, 480 / photo.height) * rng.uniform(1.0, 1.5)
        resized = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.BICUBIC)
        left, top = rng.randrange(resized.width - 640), rng.randrange(resized.height - 480)
        resized.crop((left, top, left + 640, top + 480)).save(folder / f"photo_{index:04d}.jpg", quality=90)
    return list_images(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/synthetic-default", help="model folder (default: the default run's)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=None, help=f"default: {default_loader_workers()} here")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each way, interleaved (best kept)")
    parser.add_argument("--output", type=Path)
    arguments = parser.parse_args()
    transformers.logging.set_verbosity_error()
    workers = default_loader_workers() if arguments.num_workers is None else arguments.num_workers
    machine = describe_machine(torch.device("cpu"))
    load_at_start = os.getloadavg()[0]
    model, processor = load_captioner(arguments.model, device="cpu", quantize=arguments.quantize)
    ways = {"plain loop": 0, f"{workers} loader workers": workers}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_photo_folder(Path(folder), arguments.images)
        seconds, captions = {way: [] for way in ways}, {}
        caption_images(model, processor, paths[: arguments.batch_size], progress=False, num_workers=0)  # warm-up
        for _ in range(arguments.repeats):
            for way, num_workers in ways.items():
                start = time.perf_counter()
                captions[way] = caption_images(model, processor, paths, batch_size=arguments.batch_size,
                                               progress=False, num_workers=num_workers)
                seconds[way].append(time.perf_counter() - start)
    rates = {way: arguments.images / min(times) for way, times in seconds.items()}
    first, second = ways
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine,
        "model": arguments.model,
        "quantize": arguments.quantize,
        "images": arguments.images,
        "image_size": [640, 480],
        "batch_size": arguments.batch_size,
        "images_per_s": rates,
        "speedup": rates[second] / rates[first],
        "identical_captions": captions[first] == captions[second],
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
    }
    for way, rate in rates.items():
        print(f"{way}: {rate:.2f} images/s")
    print(f"speedup {report['speedup']:.2f}x, identical captions: {report['identical_captions']}; "
          f"CPU capability {machine['cpu_capability']}, {machine['cores']} cores, 1-minute load average "
          f"{report['load_average']['start']:.1f} at start, {report['load_average']['end']:.1f} at end")
    write_report(report, arguments.output)


if __name__ == "__main__":
    main()
