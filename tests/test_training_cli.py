"""`train.py` as users run it: resuming a killed run, two processes, and the built-in default pipeline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_training import ENCODER_KWARGS, pretrained_parts, shapes  # noqa: F401  (module fixtures)

from modeling_vitgpt2.synthetic import write_synthetic_coco

REPO = Path(__file__).resolve().parents[1]


def train_command(shapes, pretrained_parts, output_dir, *extra):  # noqa: F811
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


def environment():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def step_losses(output_dir: Path, checkpoint: str) -> dict[int, float]:
    state = json.loads((output_dir / checkpoint / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def test_resuming_a_killed_run_loses_and_repeats_no_step(shapes, pretrained_parts, tmp_path):  # noqa: F811
    common = ["--max_steps", "9", "--save_strategy", "steps", "--save_steps", "3"]
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run([sys.executable, *train_command(shapes, pretrained_parts, reference_dir, *common)],
                   cwd=REPO, env=environment(), check=True, capture_output=True)

    # Slow each step down so the kill lands mid-run, after the first checkpoint is complete.
    process = subprocess.Popen(
        [sys.executable, *train_command(shapes, pretrained_parts, killed_dir, *common)],
        cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed_dir / "checkpoint-3" / "checkpoint_complete.json").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "checkpoint-9").exists(), "the run finished before it could be killed"

    subprocess.run(
        [sys.executable, *train_command(shapes, pretrained_parts, killed_dir, *common, "--resume_from_checkpoint", "true")],
        cwd=REPO, env=environment(), check=True, capture_output=True,
    )
    expected = step_losses(reference_dir, "checkpoint-9")
    resumed = step_losses(killed_dir, "checkpoint-9")
    assert sorted(resumed) == list(range(1, 10))
    assert resumed == pytest.approx(expected, abs=1e-4)


def test_an_incomplete_checkpoint_is_not_resumed_from(tmp_path):
    from modeling_vitgpt2.training import last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "checkpoint_complete.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


def test_two_processes_train_and_score_every_image_once(pretrained_parts, tmp_path):  # noqa: F811
    # Five validation images over two processes: an uneven split that the stock gather would pad with a duplicate.
    odd = write_synthetic_coco(tmp_path / "data", num_train=8, num_val=5, seed=2, image_size=32)
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        *train_command(odd, pretrained_parts, output_dir, "--max_steps", "3", "--save_strategy", "no",
                       "--ddp_backend", "gloo"),
    ]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    predictions = json.loads((output_dir / "eval_predictions.json").read_text())
    assert metrics["eval_images"] == 5 and len(predictions) == 5
    assert set(predictions) == {path.stem for path in odd.val_images.iterdir()}


def test_default_pipeline_end_to_end_at_reduced_size(tmp_path):
    """`python train.py` with the built-in default config, shrunk: writes the synthetic set, trains a model from
    scratch, evaluates CIDEr, and leaves a folder that captions new synthetic images through `from_pretrained`."""
    output_dir = tmp_path / "default"
    command = [
        sys.executable, "train.py", "configs/synthetic_default.yaml",
    ]
    overrides = {
        "output_dir": str(output_dir), "synthetic_dir": str(tmp_path / "shapes"), "synthetic_train_images": 40,
        "synthetic_val_images": 6, "num_train_epochs": 1, "disable_tqdm": True,
    }
    config = tmp_path / "reduced.yaml"
    import yaml

    content = yaml.safe_load((REPO / "configs" / "synthetic_default.yaml").read_text())
    content.update(overrides)
    config.write_text(yaml.safe_dump(content))
    command[-1] = str(config)
    subprocess.run(command, cwd=REPO, env=environment(), check=True, capture_output=True)

    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert metrics["eval_images"] == 6 and 0.0 <= metrics["eval_cider"]
    script = (
        "import sys, json\n"
        "from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2Processor\n"
        "from modeling_vitgpt2.synthetic import draw_scene, random_scene\n"
        "import random\n"
        "model = ViTGPT2ForConditionalGeneration.from_pretrained(sys.argv[1]).eval()\n"
        "processor = ViTGPT2Processor.from_pretrained(sys.argv[1])\n"
        "image = draw_scene(random_scene(random.Random(123)), 64)\n"
        "ids = model.generate(pixel_values=processor(images=image)['pixel_values'])\n"
        "print(json.dumps(processor.batch_decode(ids)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(output_dir)], cwd=REPO, env=environment(),
                            capture_output=True, text=True, check=True)
    caption = json.loads(result.stdout.strip().splitlines()[-1])[0]
    assert isinstance(caption, str) and caption
