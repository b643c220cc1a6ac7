"""Memory of the streamed training's shuffle buffer (`--shuffle_buffer`): peak resident memory while one pass of a
webdataset stream of 1024 x 768 JPEGs is read, shuffled and decoded, with the buffer holding undecoded samples (what
training does: shuffle, then decode) against decoded images (shuffle after decoding), at several buffer sizes.

Each configuration runs in a fresh process, so that one's freed memory does not hide the next one's peak. The images
are crops of the photos in ../shared/data/real_images (synthetic scenes where those are missing).

    python benchmarks/bench_shuffle_buffer.py --images 300 --buffers 0 100 250 \
        --output benchmarks/results/shuffle_buffer_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from common import describe_machine, peak_resident_mb, write_report
from PIL import Image

from modeling_vitgpt2.data.streaming import StreamCounts, decoded_rows, stream_webdataset
from modeling_vitgpt2.data.synthetic import draw_scene, random_scene
from modeling_vitgpt2.model.processing_vitgpt2 import IMAGE_EXTENSIONS

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real_images"
SIZE = (1024, 768)
ORDERS = {"shuffle, then decode": "encoded", "decode, then shuffle": "decoded"}


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` 1024 x 768 JPEGs (quality 90): random crops of the shared photos, or synthetic scenes."""
    rng = random.Random(seed)
    sources = sorted(path for path in PHOTOS.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)
    photos = [Image.open(path).convert("RGB") for path in sources]
    jpegs = []
    for _ in range(count):
        if photos:
            photo = rng.choice(photos)
            scale = max(SIZE[0] / photo.width, SIZE[1] / photo.height) * rng.uniform(1.0, 1.5)
            resized = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.BICUBIC)
            left, top = rng.randrange(resized.width - SIZE[0]), rng.randrange(resized.height - SIZE[1])
            image = resized.crop((left, top, left + SIZE[0], top + SIZE[1]))
        else:
            image = draw_scene(random_scene(rng), SIZE[1]).resize(SIZE)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def write_shards(folder: Path, jpegs: list[bytes], shards: int = 4) -> list[str]:
    paths = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for index in range(shard, len(jpegs), shards):
                for name, payload in ((f"{index:06d}.jpg", jpegs[index]), (f"{index:06d}.txt", b"a photo")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def one_pass(shards: list[str], order: str, buffer: int) -> dict:
    """Reads one pass in this process; returns its peak resident memory and time."""
    raw = stream_webdataset(shards)

    def shuffled(stream):
        return stream.shuffle(seed=0, buffer_size=buffer) if buffer else stream

    stream = decoded_rows(shuffled(raw), StreamCounts()) if order == "encoded" else \
        shuffled(decoded_rows(raw, StreamCounts()))
    start = time.perf_counter()
    memory, rows = peak_resident_mb(lambda: sum(1 for _ in stream))
    return {"rows": rows, "seconds": time.perf_counter() - start, **(memory or {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--buffers", type=int, nargs="+", default=[0, 100, 250])
    parser.add_argument("--output", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("ORDER", "BUFFER"), help=argparse.SUPPRESS)
    parser.add_argument("--shards", nargs="+", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:  # a child: one configuration
        print(json.dumps(one_pass(arguments.shards, arguments.one[0], int(arguments.one[1]))))
        return

    machine = describe_machine(torch.device("cpu"))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        jpegs = photo_jpegs(arguments.images)
        shards = write_shards(Path(folder), jpegs)
        for buffer in arguments.buffers:
            for label, order in ORDERS.items():
                if buffer == 0 and order == "decoded":
                    continue  # without a buffer both orders are the same
                child = subprocess.run(
                    [sys.executable, __file__, "--one", order, str(buffer), "--shards", *shards],
                    capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"},
                )
                results.append({"order": label if buffer else "no buffer", "buffer": buffer,
                                **json.loads(child.stdout.strip().splitlines()[-1])})
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine,
        "images": arguments.images,
        "image_size": list(SIZE),
        "mean_jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024,
        "results": results,
    }
    print(f"{arguments.images} JPEGs of {SIZE[0]} x {SIZE[1]} ({report['mean_jpeg_kb']:.0f} KB each on average); "
          f"{machine['cpu']}, {machine['cores']} cores")
    print(f"{'buffer':>7}  {'order':<22} {'peak RSS MB':>11} {'growth MB':>10} {'s':>6}")
    for row in results:
        print(f"{row['buffer']:>7}  {row['order']:<22} {row.get('peak', float('nan')):>11.0f} "
              f"{row.get('growth', float('nan')):>10.0f} {row['seconds']:>6.1f}")
    write_report(report, arguments.output)


if __name__ == "__main__":
    main()
