"""Streamed training data: webdataset shards as img2dataset writes them, split over processes the way `Trainer`'s
accelerate splits them, with bad samples skipped and counted."""

import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from accelerate.data_loader import prepare_data_loader
from test_training_cli import REPO, environment
from torch.utils.data import DataLoader

from conftest import ENCODER_KWARGS
from modeling_vitgpt2.data import CaptionDataError
from modeling_vitgpt2.streaming import StreamCounts, decoded_rows, expand_shards, stream_webdataset
from modeling_vitgpt2.synthetic import describe_scene, draw_scene, random_scene


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


def names_seen_by(stream, process_index: int, num_processes: int, batch_size: int = 2) -> list[str]:
    """The sample names one process gets from the data loader `Trainer` builds (accelerate, no batch dispatch)."""
    loader = prepare_data_loader(
        DataLoader(stream, batch_size=batch_size, collate_fn=lambda rows: [row["image_name"] for row in rows]),
        num_processes=num_processes, process_index=process_index, put_on_device=False, dispatch_batches=False,
    )
    return [name for batch in loader for name in batch]


def test_shard_patterns_expand_like_webdataset_and_name_missing_shards(tmp_path):
    write_shards(tmp_path, num_shards=3, per_shard=1)
    assert [Path(p).name for p in expand_shards(f"{tmp_path}/{{00000..00002}}.tar")] == \
        ["00000.tar", "00001.tar", "00002.tar"]
    assert len(expand_shards(f"{tmp_path}/*.tar")) == 3
    with pytest.raises(CaptionDataError, match=r"1 of the 4 shards.*00003.tar"):
        expand_shards(f"{tmp_path}/{{00000..00003}}.tar")


@pytest.mark.parametrize("shuffled", [False, True], ids=["in_order", "shuffled"])
def test_two_processes_over_four_shards_see_every_sample_exactly_once(tmp_path, shuffled):
    good = write_shards(tmp_path, broken={"000010001": "image", "000030004": "caption"})
    seen, counts = [], []
    for process in range(2):  # each process builds its own stream, as under accelerate launch
        stream = stream_webdataset(f"{tmp_path}/{{00000..00003}}.tar")
        if shuffled:
            stream = stream.shuffle(seed=7, buffer_size=4)
        counts.append(StreamCounts())
        seen.append(names_seen_by(decoded_rows(stream, counts[-1]), process, 2))
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(good)  # each good sample once, none twice
    assert sum(count.skipped for count in counts) == 2 and sum(count.used for count in counts) == len(good)
    assert sum((count.reasons for count in counts), start=StreamCounts().reasons) == \
        {"unreadable image": 1, "no caption": 1}


def test_rows_are_what_the_collator_reads(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=2)
    row = next(iter(decoded_rows(stream_webdataset(str(tmp_path / "00000.tar")), StreamCounts())))
    assert set(row) == {"image", "caption", "image_name"}
    assert row["image"].mode == "RGB" and row["image"].size == (32, 32) and row["caption"] and row["image_name"] == "000000000"


def streamed_training_command(pretrained_parts, shards: Path, output_dir: Path, *extra) -> list[str]:  # noqa: F811
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


CPU_DATA_PARALLEL = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
use_cpu: true
num_machines: 1
num_processes: 2
machine_rank: 0
rdzv_backend: static
same_network: true
main_training_function: main
"""


def accelerate_launch(config: Path, port: int, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *arguments]


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


def test_two_nodes_read_each_sample_once_and_match_one_node(pretrained_parts, tmp_path):  # noqa: F811
    """One `accelerate launch` of 2 processes, then two launches of one process each as machines 0 and 1 of a
    two-node job on localhost (gloo): both read one epoch of 4 shards (one bad sample in each process's half: 9 good
    samples per process = 3 steps of 3) exactly once and train to the same losses."""
    write_shards(tmp_path / "shards", broken={"000010001": "image", "000030004": "caption"})
    config = tmp_path / "cpu.yaml"
    config.write_text(CPU_DATA_PARALLEL)
    training = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3", "--shuffle_buffer", "4"]

    one_node = tmp_path / "one-node"
    result = subprocess.run(
        accelerate_launch(config, 29541, *streamed_training_command(pretrained_parts, tmp_path / "shards", one_node,
                                                                      *training)),
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    check_one_epoch_read_once(one_node, result.stderr)

    two_nodes = tmp_path / "two-nodes"
    machines = [
        subprocess.Popen(
            accelerate_launch(config, 29543, "--num_machines", "2", "--machine_rank", str(rank),
                              *streamed_training_command(pretrained_parts, tmp_path / "shards", two_nodes,
                                                         *training)),
            cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    logs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_, log) in zip(machines, logs):
        assert machine.returncode == 0, log[-4000:]
    check_one_epoch_read_once(two_nodes, logs[0][1] + logs[1][1])
    assert logged_losses(two_nodes) == pytest.approx(logged_losses(one_node), abs=1e-6)
    assert len(logged_losses(one_node)) == 3


def test_a_stream_without_max_steps_is_refused_before_anything_loads(train_script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_script.main(["--train_shards", f"{tmp_path}/missing.tar", "--output_dir", str(tmp_path / "out"),
                           "--use_cpu"])
    assert "give --max_steps" in capsys.readouterr().err


def test_any_datasets_dataset_streams_one_row_per_caption(tmp_path):
    from modeling_vitgpt2.streaming import stream_hf_dataset

    rng = random.Random(0)
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index in range(3):
            scene = random_scene(rng)
            draw_scene(scene, 32).save(folder / f"img{index}.png")
            metadata.write(json.dumps({"file_name": f"img{index}.png", "text": describe_scene(scene)[:2]}) + "\n")
    (folder / "img2.png").write_bytes(b"not a png")  # a bad sample inside a dataset
    counts = StreamCounts()
    stream = stream_hf_dataset(str(tmp_path / "imagefolder"), "train", caption_column="text")
    rows = list(decoded_rows(stream, counts))
    assert [row["image_name"] for row in rows] == ["img0", "img0", "img1", "img1"]
    assert counts.skipped == 2 and counts.reasons == {"unreadable image": 2}


class Crash(Exception):
    """Stands in for a kill between two training steps."""


def test_a_stream_resumed_mid_epoch_trains_on_the_batches_it_had_left(shapes, pretrained_parts, tmp_path, monkeypatch):
    """Trainer resumes a stream by reading it again up to the checkpoint's step (accelerate's `skip_first_batches`):
    the batches trained before the crash and after the resume are exactly those of an uninterrupted run."""
    from conftest import training_arguments
    from modeling_vitgpt2.training import CaptionTrainer, DataArguments, run_training

    write_shards(tmp_path / "shards")  # 20 samples, 10 batches of 2 per pass: steps 1-6 stay in the first pass
    trained, crash_at_step = [], {"step": None}
    original_step = CaptionTrainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        if self.state.global_step == crash_at_step["step"]:
            raise Crash
        trained.append(tuple(round(float(image.sum()), 2) for image in inputs["pixel_values"]))
        return original_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(CaptionTrainer, "training_step", recording_step)

    def run(output_dir, **overrides):
        model_args, _, peft_args, training_args = training_arguments(
            shapes, pretrained_parts, output_dir, max_steps=6, save_strategy="steps", save_steps=3,
            per_device_train_batch_size=2, **overrides)
        data_args = DataArguments(train_shards=f"{tmp_path}/shards/{{00000..00003}}.tar",
                                  val_shards=f"{tmp_path}/shards/00000.tar", max_eval_images=1,
                                  max_caption_length=24, shuffle_buffer=4)
        run_training(model_args, data_args, peft_args, training_args)

    run(tmp_path / "whole")
    uninterrupted, trained[:] = list(trained), []
    crash_at_step["step"] = 3  # after checkpoint-3 is written, before step 4 trains
    with pytest.raises(Crash):
        run(tmp_path / "resumed")
    crash_at_step["step"] = None
    run(tmp_path / "resumed", resume_from_checkpoint="true")
    assert len(uninterrupted) == 6 and len(set(uninterrupted)) == 6
    assert trained == uninterrupted  # steps 1-3, then 4-6: nothing repeated, nothing skipped
