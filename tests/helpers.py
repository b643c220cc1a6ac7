"""What the tests that run the command lines share: train.py commands, their environment, the webdataset shards
they stream, and readers of what the runs wrote. Fixtures and tiny models are in conftest.py."""

import io
import json
import os
import random
import tarfile
from pathlib import Path

from conftest import ENCODER_KWARGS
from modeling_vitgpt2.data.synthetic import describe_scene, draw_scene, random_scene


def environment():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def train_command(shapes, pretrained_parts, output_dir, *extra):
    encoder, decoder = pretrained_parts
    model_config = json.dumps({"encoder_name": "vit_large_patch14_clip_224.openai", "encoder_kwargs": ENCODER_KWARGS})
    return [
        "train.py",
        "--encoder", str(encoder), "--decoder", str(decoder), "--model_config", model_config,
        "--train_json", str(shapes.train_json), "--train_images", str(shapes.train_images),
        "--val_json", str(shapes.val_json), "--val_images", str(shapes.val_images),
        "--output_dir", str(output_dir), "--peft", "lora", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_strategy", "no",
        "--load_best_model_at_end", "false", "--generation_num_beams", "2", "--generation_max_length", "12",
        "--use_cpu", "--seed", "0", "--lr_scheduler_type", "constant", "--disable_tqdm", "true", *extra,
    ]


def step_losses(output_dir: Path, checkpoint: str) -> dict[int, float]:
    state = json.loads((output_dir / checkpoint / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def streamed_training_command(pretrained_parts, shards: Path, output_dir: Path, *extra) -> list[str]:
    encoder, decoder = pretrained_parts
    model_config = json.dumps({"encoder_name": "vit_large_patch14_clip_224.openai", "encoder_kwargs": ENCODER_KWARGS})
    return [
        "train.py", "--encoder", str(encoder), "--decoder", str(decoder), "--model_config", model_config,
        "--train_shards", f"{shards}/{{00000..00003}}.tar", "--val_shards", f"{shards}/00000.tar",
        "--max_eval_images", "2", "--output_dir", str(output_dir), "--peft", "lora", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "3", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--generation_num_beams", "1", "--generation_max_length", "8",
        "--use_cpu", "--seed", "0", "--disable_tqdm", "true", *extra,
    ]


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def check_one_epoch_read_once(output_dir: Path, log: str) -> None:
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    # Had each process read every shard, the counts would be doubled (36 and 4).
    assert summary["stream"]["used_samples"] == 18 and summary["stream"]["skipped_samples"] == 2
    assert summary["stream"]["skipped_by_reason"] == {"unreadable image": 1, "no caption": 1}
    assert "Skipping sample 000010001: unreadable image" in log


def huge_png(path: Path, side: int = 12_000) -> Path:
    """A 1-bit PNG of side x side pixels (144 megapixels by default, above the default pixel limit but below Pillow's
    own refusal) that compresses to a few tens of kB."""
    from PIL import Image

    Image.new("1", (side, side)).save(path)
    return path


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def write_shards(folder: Path, num_shards: int = 4, per_shard: int = 5, image_size: int = 32, seed: int = 0,
                 broken: dict[str, str] | None = None) -> list[str]:
    """img2dataset's layout: shard `00000.tar` holds `000000000.jpg`, `.txt` and `.json` per sample. `broken` maps
    sample keys to "image" (truncated JPEG bytes) or "caption" (an empty caption). Returns the good samples' keys."""
    rng, broken, good = random.Random(seed), broken or {}, []
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                scene = random_scene(rng)
                buffer = io.BytesIO()
                draw_scene(scene, image_size).save(buffer, format="JPEG")
                image, caption = buffer.getvalue(), describe_scene(scene)[0]
                if broken.get(key) == "image":
                    image = image[: len(image) // 3]
                if broken.get(key) == "caption":
                    caption = "  "
                _add(archive, f"{key}.jpg", image)
                _add(archive, f"{key}.txt", caption.encode())
                _add(archive, f"{key}.json", json.dumps({"key": key, "caption": caption, "status": "success"}).encode())
                if key not in broken:
                    good.append(key)
    return good


def load_cli_module():
    """`eval.py` / `vitgpt2 eval`, run in this process."""
    from modeling_vitgpt2.cli import eval as eval_cli

    return eval_cli


def image_bytes(format: str = "JPEG", seed: int = 0, size: int = 32) -> bytes:
    """A small synthetic scene encoded as `format`."""
    buffer = io.BytesIO()
    draw_scene(random_scene(random.Random(seed)), size).save(buffer, format=format)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar file holding `members` ((name, payload) pairs) in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            _add(archive, name, payload)
    return path
