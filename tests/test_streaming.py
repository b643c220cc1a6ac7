"""Streamed training data: webdataset shards as img2dataset writes them, split over processes the way `Trainer`'s
accelerate splits them, with bad samples skipped and counted."""

import contextlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from conftest import REPO
from helpers import (
    check_one_epoch_read_once,
    environment,
    logged_losses,
    step_losses,
    streamed_training_command,
    write_shards,
)
from modeling_vitgpt2.data.captions import CaptionDataError
from modeling_vitgpt2.data.streaming import StreamCounts, decoded_rows, expand_shards, stream_webdataset
from modeling_vitgpt2.data.synthetic import describe_scene, draw_scene, random_scene


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
    # A trailing or doubled comma named a shard "" and was refused as "1 of the 3 shards ... are missing: ".
    assert len(expand_shards(f"{tmp_path}/00000.tar,,{tmp_path}/00001.tar, ")) == 2
    with pytest.raises(CaptionDataError, match=r"1 of the 4 shards.*00003.tar"):
        expand_shards(f"{tmp_path}/{{00000..00003}}.tar")
    # A folder or file whose own name holds glob characters is that file, not a pattern matching nothing.
    write_shards(tmp_path / "run[lr=1e-4]", num_shards=2, per_shard=1)
    assert len(expand_shards(f"{tmp_path}/run[lr=1e-4]/{{00000..00001}}.tar")) == 2


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


def test_a_streamed_image_past_the_pixel_limit_is_skipped_undecoded_and_counted(tmp_path, monkeypatch):
    good = write_shards(tmp_path, num_shards=1, per_shard=3, image_size=32)  # 1,024 pixels each
    monkeypatch.setenv("VITGPT2_MAX_IMAGE_PIXELS", "1000")  # the same limit as every other entry point
    counts = StreamCounts()
    assert list(decoded_rows(stream_webdataset(str(tmp_path / "00000.tar")), counts)) == []
    assert counts.skipped == len(good) and counts.reasons == {"image too large": len(good)}


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


def test_two_nodes_read_each_sample_once_and_match_one_node(pretrained_parts, tmp_path):
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


def test_two_processes_resume_their_own_streams_without_reading_them_again(pretrained_parts, tmp_path):
    """2 processes (accelerate launch, gloo) over 4 shards of 6 samples: each reads 2 shards, 4 batches of 3 per
    pass. A run resumed from checkpoint-2 of a 4-step run (what a kill right after it leaves) trains steps 3 and 4 to
    the same losses, and its processes decode only the 2 batches each they had left: 12 samples, not 24."""
    write_shards(tmp_path / "shards", per_shard=6)
    config = tmp_path / "cpu.yaml"
    config.write_text(CPU_DATA_PARALLEL)
    training = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2",
                "--shuffle_buffer", "0"]
    runs = {"whole": [], "resumed": ["--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-2")]}
    for port, (name, extra) in zip((29551, 29553), runs.items()):
        result = subprocess.run(
            accelerate_launch(config, port, *streamed_training_command(pretrained_parts, tmp_path / "shards",
                                                                       tmp_path / name, *training, *extra)),
            cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
    positions = sorted(path.name for path in (tmp_path / "whole" / "checkpoint-2" / "stream_position").iterdir())
    assert positions == ["process_0.json", "process_1.json"]
    assert step_losses(tmp_path / "resumed", "checkpoint-4") == step_losses(tmp_path / "whole", "checkpoint-4")
    counted = {name: json.loads((tmp_path / name / "training_summary.json").read_text())["stream"] for name in runs}
    assert {name: (stream["counted_from_step"], stream["used_samples"]) for name, stream in counted.items()} == \
        {"whole": (0, 24), "resumed": (2, 12)}


def test_a_stream_without_max_steps_is_refused_before_anything_loads(train_script, tmp_path, capsys):
    status = train_script.main(["--train_shards", f"{tmp_path}/missing.tar", "--output_dir", str(tmp_path / "out"),
                                "--use_cpu"])
    assert status == 2
    assert "give --max_steps" in capsys.readouterr().err


def write_imagefolder(tmp_path, images: int):
    """A `datasets` imagefolder at tmp_path/imagefolder with a train split of `images` scenes, two captions each."""
    rng = random.Random(0)
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index in range(images):
            scene = random_scene(rng)
            draw_scene(scene, 32).save(folder / f"img{index}.png")
            metadata.write(json.dumps({"file_name": f"img{index}.png", "text": describe_scene(scene)[:2]}) + "\n")
    return folder


def test_any_datasets_dataset_streams_one_row_per_caption(tmp_path):
    from modeling_vitgpt2.data.streaming import stream_hf_dataset

    folder = write_imagefolder(tmp_path, images=3)
    (folder / "img2.png").write_bytes(b"not a png")  # a bad sample inside a dataset
    counts = StreamCounts()
    stream = stream_hf_dataset(str(tmp_path / "imagefolder"), "train", caption_column="text")
    rows = list(decoded_rows(stream, counts))
    assert [row["image_name"] for row in rows] == ["img0", "img0", "img1", "img1"]
    assert counts.skipped == 2 and counts.reasons == {"unreadable image": 2}


def test_a_datasets_stream_resumes_between_two_captions_of_one_image(tmp_path, monkeypatch):
    """--dataset_name --streaming: a position between two captions of one image resumes at the next caption; only
    the rows after the position are decoded (each row its image)."""
    import modeling_vitgpt2.data.streaming as streaming
    from modeling_vitgpt2.data.streaming import stream_hf_dataset

    write_imagefolder(tmp_path, images=4)
    decoded, decode = [], streaming.as_rgb_image
    monkeypatch.setattr(streaming, "as_rgb_image", lambda image, name: decoded.append(name) or decode(image, name))

    def loader():
        stream = decoded_rows(stream_hf_dataset(str(tmp_path / "imagefolder"), "train", caption_column="text"),
                              StreamCounts())
        return prepare_data_loader(
            DataLoader(stream, batch_size=3, collate_fn=lambda rows: [(row["image_name"], row["caption"]) for row in rows]),
            num_processes=1, process_index=0, put_on_device=False, dispatch_batches=False, use_stateful_dataloader=True,
        )

    whole = list(loader())
    stopped = loader()
    trained = next(iter(stopped))  # img0's two captions and img1's first
    decoded.clear()
    resumed = loader()
    resumed.load_state_dict(stopped.state_dict())
    rest = list(resumed)
    assert [trained, *rest] == whole and [name for name, _ in trained] == ["img0", "img0", "img1"]
    assert decoded == [name for batch in rest for name, _ in batch] == ["img1", "img2", "img2", "img3", "img3"]


class Crash(Exception):
    """Stands in for a kill between two training steps."""


class StreamRecorder:
    """What one training run reads and trains, by sample key: the keys read from the tar files, the images
    decoded, and the keys of each trained batch with the pass of the stream it came from. Only what the training
    stream does counts (from `on_train_begin` to `on_train_end`); the validation set is read before."""

    def __init__(self, monkeypatch):
        from transformers import TrainerCallback

        import modeling_vitgpt2.data.streaming as streaming
        from modeling_vitgpt2.data.captions import CaptionCollator
        from modeling_vitgpt2.training.trainer import CaptionTrainer

        self.recording, self.crash_at_step = False, None
        self.read, self.decoded, self.trained, self.collated = [], [], [], []
        recorder = self

        read_tar = streaming._shard_samples

        def reading(shard):
            for sample in read_tar(shard):
                if recorder.recording:
                    recorder.read.append(sample["image_name"])
                yield sample

        decode = streaming.as_rgb_image

        def decoding(image, name=None):
            if recorder.recording:
                recorder.decoded.append(name)
            return decode(image, name=name)

        collate = CaptionCollator.__call__

        def collating(self, rows):
            recorder.collated.append([row["image_name"] for row in rows])  # batches are trained in this order
            return collate(self, rows)

        training_step = CaptionTrainer.training_step

        def recording_step(self, *args, **kwargs):
            if self.state.global_step == recorder.crash_at_step:
                raise Crash
            recorder.trained.append((self.callback_handler.train_dataloader.iteration, recorder.collated.pop(0)))
            return training_step(self, *args, **kwargs)

        class Window(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.recording = True
                recorder.read, recorder.decoded, recorder.trained, recorder.collated = [], [], [], []

            def on_train_end(self, args, state, control, **kwargs):
                recorder.recording = False

        monkeypatch.setattr(streaming, "_shard_samples", reading)
        monkeypatch.setattr(streaming, "as_rgb_image", decoding)
        monkeypatch.setattr(CaptionCollator, "__call__", collating)
        monkeypatch.setattr(CaptionTrainer, "training_step", recording_step)
        self.callback = Window()

    def run(self, shapes, pretrained_parts, shards: Path, output_dir: Path, crash_at_step=None, shuffle_buffer=0,
            **training):
        from conftest import training_arguments
        from modeling_vitgpt2.training.arguments import DataArguments
        from modeling_vitgpt2.training.run import run_training

        self.crash_at_step = crash_at_step
        model_args, _, peft_args, training_args = training_arguments(shapes, pretrained_parts, output_dir, **training)
        data_args = DataArguments(train_shards=f"{shards}/{{00000..00003}}.tar", val_shards=f"{shards}/00000.tar",
                                  max_eval_images=1, max_caption_length=24, shuffle_buffer=shuffle_buffer)
        run_training(model_args, data_args, peft_args, training_args, callbacks=[self.callback])

    def trained_keys(self) -> list[str]:
        return [key for _, batch in self.trained for key in batch]


def test_a_stream_resumed_mid_pass_continues_where_it_stopped_without_reading_it_again(shapes, pretrained_parts,
                                                                                       tmp_path, monkeypatch):
    """Killed after a checkpoint, then resumed, three times: in the middle of the first pass, at its last batch and in
    the middle of the second; the resumed runs train exactly the samples of an uninterrupted run, and none of them
    decodes a sample from before its checkpoint or reads a tar file before the one it stopped in."""
    keys = write_shards(tmp_path / "shards")  # 20 samples, in 4 batches of 5 per pass
    recorder = StreamRecorder(monkeypatch)
    training = dict(max_steps=7, save_strategy="steps", save_steps=2, per_device_train_batch_size=5)
    recorder.run(shapes, pretrained_parts, tmp_path / "shards", tmp_path / "whole", **training)
    uninterrupted = recorder.trained
    assert [pass_ for pass_, _ in uninterrupted] == [0, 0, 0, 0, 1, 1, 1]
    assert sorted(recorder.trained_keys()[:20]) == keys  # the first pass: every sample once, in order

    resumed, trained = tmp_path / "resumed", []
    for resume, crash in ((False, 2), (True, 4), (True, 6), (True, None)):
        with pytest.raises(Crash) if crash else contextlib.nullcontext():
            recorder.run(shapes, pretrained_parts, tmp_path / "shards", resumed, crash_at_step=crash,
                         resume_from_checkpoint="true" if resume else None, **training)
        trained += recorder.trained
        if crash:
            manifest = json.loads((resumed / f"checkpoint-{crash}" / "checkpoint_complete.json").read_text())
            assert "stream_position/process_0.json" in manifest["files"]  # verified like every file of a checkpoint
        if not resume:
            continue
        # The first image the resumed run decodes is the first one it trains: nothing from before its checkpoint.
        assert recorder.decoded[: len(recorder.trained_keys())] == recorder.trained_keys()
        # Before it, datasets reads again (without decoding) the tar file the checkpoint stopped in, from its
        # beginning to the checkpoint's position; the tar files before that one are not opened. A checkpoint at the
        # end of a pass starts the next one, reading nothing again.
        last_pass, last_batch = trained[-len(recorder.trained) - 1]
        read_again = [key for key in keys if key[:5] == last_batch[-1][:5] and key <= last_batch[-1]]
        assert recorder.read[: recorder.read.index(recorder.decoded[0])] == \
            (read_again if recorder.trained[0][0] == last_pass else [])
    assert trained == uninterrupted  # the same samples in the same batches and passes: none repeated, none skipped


def test_a_saved_position_resumes_a_data_loader_with_workers(tmp_path):
    """With `--dataloader_num_workers` the position is torchdata's snapshot of every worker's stream; loaded into a
    new data loader it gives the batches that were left, and says how far into the pass it was."""
    from modeling_vitgpt2.training.trainer import _batches_read

    write_shards(tmp_path)

    def loader():
        stream = decoded_rows(stream_webdataset(f"{tmp_path}/{{00000..00003}}.tar"), StreamCounts())
        return prepare_data_loader(
            DataLoader(stream, batch_size=2, num_workers=2, collate_fn=lambda rows: [row["image_name"] for row in rows]),
            num_processes=1, process_index=0, put_on_device=False, dispatch_batches=False, use_stateful_dataloader=True,
        )

    whole = list(loader())
    stopped = loader()
    batches = iter(stopped)
    trained = [next(batches) for _ in range(3)]
    position = stopped.state_dict()
    assert "_snapshot" in position and _batches_read(position) == 3
    resumed = loader()
    resumed.load_state_dict(position)
    assert trained + list(resumed) == whole and len(whole) == 10


def test_a_checkpoint_is_resumed_only_by_as_many_processes_as_wrote_its_stream_positions(tmp_path):
    from modeling_vitgpt2.training.checkpoints import read_stream_position

    positions = tmp_path / "checkpoint-4" / "stream_position"
    positions.mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no stream position"):
        read_stream_position(tmp_path / "checkpoint-4", 0, 1)
    for process in (0, 1):
        (positions / f"process_{process}.json").write_text(json.dumps({"pass": 0, "process": process}))
    with pytest.raises(ValueError, match="positions of 2 processes, but this run has 1: resume with 2 processes"):
        read_stream_position(tmp_path / "checkpoint-4", 0, 1)
    assert read_stream_position(tmp_path / "checkpoint-4", 1, 2) == {"pass": 0, "process": 1}


def test_a_shuffle_buffer_loses_its_content_on_resume_and_nothing_is_repeated(shapes, pretrained_parts, tmp_path,
                                                                             monkeypatch):
    """datasets does not save a shuffle buffer's content: a resumed stream refills the buffer from where its reading
    stopped, so the samples that were in the buffer are not trained in that pass (at most --shuffle_buffer of them),
    and none is trained twice."""
    write_shards(tmp_path / "shards")
    recorder = StreamRecorder(monkeypatch)
    training = dict(max_steps=10, save_strategy="steps", save_steps=3, per_device_train_batch_size=2)
    with pytest.raises(Crash):
        recorder.run(shapes, pretrained_parts, tmp_path / "shards", tmp_path / "run", crash_at_step=3,
                     shuffle_buffer=4, **training)
    before = recorder.trained_keys()[:6]
    recorder.run(shapes, pretrained_parts, tmp_path / "shards", tmp_path / "run", resume_from_checkpoint="true",
                 shuffle_buffer=4, **training)
    after = [key for pass_, batch in recorder.trained if pass_ == 0 for key in batch]
    # The rest of the first pass decodes exactly the samples it trains: none from before the checkpoint.
    assert sorted(recorder.decoded[: len(after)]) == sorted(after)
    first_pass = before + after
    assert len(first_pass) == len(set(first_pass))  # nothing trained twice
    lost = 20 - len(first_pass)
    assert 0 < lost < 4  # fewer than --shuffle_buffer
    assert any(pass_ == 1 for pass_, _ in recorder.trained)  # the next pass then starts with every sample


def test_samples_may_mix_image_extensions_and_keys_follow_webdataset(tmp_path):
    """Shard 0 holds PNGs, shards 1-2 JPEGs with one PNG and one upper-case .JPEG among them, and a key with a dot
    in its folder: every sample is used. `v1.2.jpg` has the key `v1` (webdataset's rule: the key ends at the first
    dot of the file name), so its fields are `2.jpg` and `2.txt`: skipped as "no image", not "no caption"."""
    from helpers import image_bytes, write_tar

    def sample(key, extension, format="JPEG"):
        return [(f"{key}.{extension}", image_bytes(format, seed=len(key))), (f"{key}.txt", f"a caption of {key}".encode())]

    write_tar(tmp_path / "00000.tar", [m for i in range(5) for m in sample(f"p{i}", "png", "PNG")])
    write_tar(tmp_path / "00001.tar", [m for i in range(4) for m in sample(f"j{i}", "jpg")] + sample("odd", "png", "PNG"))
    write_tar(tmp_path / "00002.tar", [m for i in range(4) for m in sample(f"k{i}", "jpg")] + sample("UP", "JPEG")
              + sample("take.v2/cat", "webp", "WEBP") + sample("v1.2", "jpg"))
    counts = StreamCounts()
    rows = list(decoded_rows(stream_webdataset(f"{tmp_path}/{{00000..00002}}.tar"), counts))
    assert [row["image_name"] for row in rows] == [*(f"p{i}" for i in range(5)), *(f"j{i}" for i in range(4)), "odd",
                                                   *(f"k{i}" for i in range(4)), "UP", "take.v2/cat"]
    assert rows[-1]["caption"] == "a caption of take.v2/cat" and set(rows[0]) == {"image", "caption", "image_name"}
    assert counts.used == 16 and counts.reasons == {"no image": 1}
    assert counts.by_shard == {f"{tmp_path}/00002.tar": {"no image": 1}}


@pytest.mark.parametrize("where", ["two_shards", "one_shard"])
def test_duplicate_validation_keys_are_refused_naming_both_shards(tmp_path, where):
    """Two downloads of one validation shard, or a key repeated inside one, would be merged into one image and the
    metric computed on fewer images: refused, as the COCO path refuses two images of one name."""
    from helpers import image_bytes, write_tar
    from modeling_vitgpt2.training.run import DataArguments, load_streamed_caption_data

    write_shards(tmp_path / "train", num_shards=1)
    samples = [m for key in ("v0", "v1") for m in ((f"{key}.jpg", image_bytes()), (f"{key}.txt", b"a caption"))]
    first = write_tar(tmp_path / "val-a.tar", samples)
    second = write_tar(tmp_path / "val-b.tar", samples) if where == "two_shards" else first
    if where == "one_shard":
        write_tar(first, samples + samples[:2])
    data_args = DataArguments(train_shards=str(tmp_path / "train" / "00000.tar"),
                              val_shards=f"{first},{second}" if where == "two_shards" else str(first))
    with pytest.raises(CaptionDataError, match=rf"two validation samples have the key 'v0': in {first} and in "
                                               rf"{second}"):
        load_streamed_caption_data(data_args, seed=0)


def test_the_shuffle_buffer_holds_undecoded_samples(tmp_path, monkeypatch):
    """--shuffle_buffer 8: taking the first 2 training rows decodes 2 images, not the 8 + 2 a buffer of decoded
    images would (each decoded original weighs megabytes; its JPEG a tenth or less)."""
    import modeling_vitgpt2.data.streaming as streaming
    from modeling_vitgpt2.training.run import DataArguments, load_streamed_caption_data

    write_shards(tmp_path)
    data_args = DataArguments(train_shards=f"{tmp_path}/{{00000..00003}}.tar", val_shards=f"{tmp_path}/00000.tar",
                              shuffle_buffer=8)
    train, _, _, _ = load_streamed_caption_data(data_args, seed=0)
    decoded, decode = [], streaming.as_rgb_image
    monkeypatch.setattr(streaming, "as_rgb_image", lambda image, name: decoded.append(name) or decode(image, name))
    first = [row["image_name"] for _, row in zip(range(2), train)]
    assert decoded == first


@pytest.mark.parametrize("change, message", [
    ({"train_shards": "SHARDS/{00000..00002}.tar"}, r"1 shard\(s\) no longer given \(.*00003.tar\)"),
    ({"train_shards": "SHARDS/00004.tar,SHARDS/{00000..00003}.tar"}, r"1 shard\(s\) new \(.*00004.tar\)"),
    ({"shuffle_buffer": 4}, r"--shuffle_buffer was 0, is now 4"),
], ids=["shard_dropped", "shard_added_in_front", "shuffle_buffer_changed"])
def test_a_stream_is_resumed_only_on_the_stream_it_stopped_in(shapes, pretrained_parts, tmp_path, change, message):
    """The saved position is an index into the stream: on another shard list it would skip or repeat samples, on
    another shuffle buffer datasets fails with a KeyError. Refused, naming the difference; --ignore_data_skip starts
    the new stream from its beginning."""
    from conftest import training_arguments
    from modeling_vitgpt2.training.run import DataArguments, run_training

    write_shards(tmp_path / "shards", num_shards=5)

    def run(max_steps, train_shards="SHARDS/{00000..00003}.tar", shuffle_buffer=0, **training):
        model_args, _, peft_args, training_args = training_arguments(
            shapes, pretrained_parts, tmp_path / "out", max_steps=max_steps, save_strategy="steps", save_steps=2,
            per_device_train_batch_size=3, **training)
        data_args = DataArguments(train_shards=train_shards.replace("SHARDS", str(tmp_path / "shards")),
                                  val_shards=f"{tmp_path}/shards/00000.tar", max_eval_images=1, max_caption_length=24,
                                  shuffle_buffer=shuffle_buffer)
        run_training(model_args, data_args, peft_args, training_args)

    run(2)
    with pytest.raises(ValueError, match=rf"checkpoint-2 stopped in another stream than this run's: {message}.*"
                                         r"--ignore_data_skip true"):
        run(4, resume_from_checkpoint="true", **change)
    run(4, resume_from_checkpoint="true", ignore_data_skip=True, **change)
    assert json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_stream_named_through_a_symbolic_link_resumes_on_the_same_files_named_directly(shapes, pretrained_parts,
                                                                                       tmp_path):
    """A scratch disk linked into the project: the output folder and the shard folder are symbolic links to it. A
    position saved while the shards were named through the link was refused when the run was resumed with their
    real path ("4 shard(s) no longer given (...); 4 shard(s) new (...)"), though it indexes the very same files. It
    resumes, to the losses of the run it was copied from."""
    from conftest import training_arguments
    from modeling_vitgpt2.training.run import DataArguments, run_training

    scratch = tmp_path / "scratch"
    write_shards(scratch / "shards")
    (scratch / "out").mkdir()
    (tmp_path / "data").symlink_to(scratch, target_is_directory=True)
    (tmp_path / "out").symlink_to(scratch / "out", target_is_directory=True)

    def run(output_dir, shards, **training):
        model_args, _, peft_args, training_args = training_arguments(
            shapes, pretrained_parts, output_dir, max_steps=4, save_strategy="steps", save_steps=2,
            save_total_limit=2, per_device_train_batch_size=3, **training)
        data_args = DataArguments(train_shards=f"{shards}/{{00000..00003}}.tar", val_shards=f"{shards}/00000.tar",
                                  max_eval_images=1, max_caption_length=24, shuffle_buffer=0)
        run_training(model_args, data_args, peft_args, training_args)

    run(tmp_path / "whole", tmp_path / "data" / "shards")
    # What a kill right after checkpoint-2 leaves, in the linked output folder.
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "out" / "checkpoint-2")
    run(tmp_path / "out", scratch / "shards", resume_from_checkpoint="true")
    assert step_losses(tmp_path / "out", "checkpoint-4") == step_losses(tmp_path / "whole", "checkpoint-4")
    assert json.loads((scratch / "out" / "training_summary.json").read_text())["stream"]["counted_from_step"] == 2


def test_a_stream_trains_without_a_validation_set_when_it_never_evaluates(shapes, pretrained_parts, tmp_path):
    """--eval_strategy no needs no validation set; and a finished run leaves no lock file in its output folder."""
    from conftest import training_arguments
    from modeling_vitgpt2.training.run import DataArguments, run_training

    write_shards(tmp_path / "shards", num_shards=2)
    model_args, _, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, tmp_path / "out", max_steps=2, per_device_train_batch_size=3, eval_strategy="no")
    data_args = DataArguments(train_shards=f"{tmp_path}/shards/{{00000..00001}}.tar", max_caption_length=24)
    assert run_training(model_args, data_args, peft_args, training_args) == {}
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["eval_images"] is None
    assert not list((tmp_path / "out").glob(".train.lock*"))


def test_field_names_in_upper_case_and_oversized_captions(tmp_path, monkeypatch):
    """`KEY.JPG` with `KEY.TXT` (cameras and Windows tools write upper case) is a sample like any other; a caption
    member larger than the limit is skipped, counted, and never read into memory; fields the reader does not use
    (a video beside the image) are not read either."""
    import tarfile

    from helpers import image_bytes, write_tar
    from modeling_vitgpt2.data import streaming

    monkeypatch.setattr(streaming, "MAX_TEXT_FIELD_BYTES", 1000)
    write_tar(tmp_path / "00000.tar", [("UP.JPG", image_bytes()), ("UP.TXT", b"an upper-case caption"),
                                       ("big.jpg", image_bytes()), ("big.txt", b"x" * 1001),
                                       ("meta.jpg", image_bytes()), ("meta.JSON", b'{"caption": "from json"}'),
                                       ("clip.jpg", image_bytes()), ("clip.txt", b"with a video"),
                                       ("clip.mp4", b"v" * 5000)])
    read_sizes = []
    extractfile = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, member: read_sizes.append(member.size) or extractfile(self, member))
    counts = StreamCounts()
    rows = list(decoded_rows(stream_webdataset([str(tmp_path / "00000.tar")]), counts))
    assert [(row["image_name"], row["caption"]) for row in rows] == [
        ("UP", "an upper-case caption"), ("meta", "from json"), ("clip", "with a video")]
    assert counts.reasons == {"caption too large": 1}
    assert max(read_sizes) < 1000  # neither the oversized caption nor the video was read


def test_linked_members_are_skipped_naming_the_link_and_never_followed(tmp_path):
    """`tar` over a folder with hard-linked duplicates writes the second copy as a hard link to the first member,
    which a tar stream cannot go back to: that sample was skipped as "no image: the sample has the fields ['txt']".
    Now each linked field skips its sample as a "link" naming the member, its target and how to re-pack; a symbolic
    link pointing outside the shard is never opened (its target's bytes appear in no row), and the regular samples
    around the links still come through."""
    import os
    import tarfile

    from helpers import image_bytes

    secret_image, secret_text = tmp_path / "secret.png", tmp_path / "secret.txt"
    secret_image.write_bytes(image_bytes("PNG", seed=99))  # a valid image: followed, it would have been trained on
    secret_text.write_text("TOP-SECRET-CONTENT")
    folder = tmp_path / "folder"
    folder.mkdir()
    for key in ("a", "c", "t", "z"):
        (folder / f"{key}.jpg").write_bytes(image_bytes(seed=len(key) + ord(key)))
    for key in ("a", "b", "c", "s", "f", "z"):
        (folder / f"{key}.txt").write_text(f"a caption of {key}")
    os.link(folder / "a.jpg", folder / "b.jpg")  # a duplicate image, hard-linked as `cp -l` or rdfind leave it
    os.symlink(secret_image, folder / "s.jpg")
    os.symlink(secret_text, folder / "t.txt")
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        for name in ("a.jpg", "a.txt", "b.jpg", "b.txt", "c.jpg", "c.txt", "s.jpg", "s.txt", "t.jpg", "t.txt"):
            archive.add(folder / name, arcname=name)  # tarfile writes b.jpg as a hard link to a.jpg, as tar does
        fifo = tarfile.TarInfo("f.jpg")
        fifo.type = tarfile.FIFOTYPE
        archive.addfile(fifo)
        archive.add(folder / "f.txt", arcname="f.txt")
        archive.add(folder / "z.jpg", arcname="z.jpg")
        archive.add(folder / "z.txt", arcname="z.txt")
    with tarfile.open(shard) as archive:
        assert [(member.name, member.type) for member in archive if not member.isfile()] == [
            ("b.jpg", tarfile.LNKTYPE), ("s.jpg", tarfile.SYMTYPE), ("t.txt", tarfile.SYMTYPE),
            ("f.jpg", tarfile.FIFOTYPE)]

    raw = list(stream_webdataset([str(shard)]))
    problems = {row["image_name"]: row["problem"] for row in raw if row["problem"]}
    assert problems == {
        "b": "link: b.jpg is a hard link to 'a.jpg', and links in a shard are not followed; re-pack the shard with "
             "the files' contents (GNU tar --hard-dereference, or webdataset's TarWriter)",
        "s": f"link: s.jpg is a symbolic link to {str(secret_image)!r}, and links in a shard are not followed; "
             "re-pack the shard with the files' contents (GNU tar --dereference, or webdataset's TarWriter)",
        "t": f"link: t.txt is a symbolic link to {str(secret_text)!r}, and links in a shard are not followed; "
             "re-pack the shard with the files' contents (GNU tar --dereference, or webdataset's TarWriter)",
        "f": "not a file: f.jpg is a FIFO, not a regular file; re-pack the shard with the files' contents",
    }
    for row in raw:  # the targets' bytes were never read
        assert "TOP-SECRET-CONTENT" not in str(row)
        assert row["image"] is None or row["image"]["bytes"] != secret_image.read_bytes()

    counts = StreamCounts()
    rows = list(decoded_rows(stream_webdataset([str(shard)]), counts))
    assert [(row["image_name"], row["caption"]) for row in rows] == [
        ("a", "a caption of a"), ("c", "a caption of c"), ("z", "a caption of z")]
    assert counts.used == 3 and counts.reasons == {"link": 3, "not a file": 1}
    assert counts.by_shard == {str(shard): {"link": 3, "not a file": 1}}


def test_an_image_member_over_the_byte_limit_is_skipped_unread(tmp_path, monkeypatch):
    """An image member is read whole before the pixel limit can look at its header: one of several gigabytes made
    every process allocate it. Over `MAX_IMAGE_FIELD_BYTES` (made small here) its sample is skipped, counted, and
    its bytes never read; the samples on either side are used."""
    import tarfile

    from helpers import image_bytes, write_tar
    from modeling_vitgpt2.data import streaming

    assert streaming.MAX_IMAGE_FIELD_BYTES == 256 << 20  # 3 bytes x the default pixel limit, rounded up
    monkeypatch.setattr(streaming, "MAX_IMAGE_FIELD_BYTES", 1000)
    big = image_bytes(size=128)  # a valid image: read, it would have been used
    assert len(big) > 1000 > len(image_bytes())
    write_tar(tmp_path / "00000.tar", [("a.jpg", image_bytes()), ("a.txt", b"before"),
                                       ("big.JPG", big), ("big.txt", b"a huge image"),
                                       ("z.jpg", image_bytes(seed=1)), ("z.txt", b"after")])
    read_sizes = []
    extractfile = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, member: read_sizes.append(member.size) or extractfile(self, member))
    raw = list(stream_webdataset([str(tmp_path / "00000.tar")]))
    assert [row["problem"] for row in raw] == [
        None, f"image too large: big.JPG has {len(big):,} bytes, more than 1,000 (an uncompressed RGB image at the "
              "default pixel limit); re-encode it (JPEG, PNG or WebP) or leave it out", None]
    assert max(read_sizes) < 1000  # the big member was skipped in the stream, not read
    counts = StreamCounts()
    rows = list(decoded_rows(stream_webdataset([str(tmp_path / "00000.tar")]), counts))
    assert [(row["image_name"], row["caption"]) for row in rows] == [("a", "before"), ("z", "after")]
    assert counts.reasons == {"image too large": 1} and counts.used == 2

def test_a_shard_given_twice_is_part_of_the_stream_a_position_is_taken_in():
    """`a.tar,a.tar` reads `a.tar` twice per pass: a position taken there, resumed on `a.tar` alone, would skip or
    repeat samples, and was accepted (the shard list was compared as a set of names)."""
    from modeling_vitgpt2.training.checkpoints import stream_change

    def stream(*names):
        return {"source": "--train_shards", "shards": [[name, 10] for name in names], "shuffle_buffer": 0,
                "seed": None, "pipeline": "images"}

    assert stream_change(stream("/d/a.tar", "/d/a.tar"), stream("/d/a.tar")) == \
        "the list names 1 shard(s) counting repeats, was 2"
    assert stream_change(stream("/d/a.tar", "/d/b.tar"), stream("/d/b.tar", "/d/a.tar")) == \
        "the shards are in another order"
    assert stream_change(stream("/d/a.tar", "/d/a.tar"), stream("/d/a.tar", "/d/a.tar")) is None


def test_a_shard_is_the_same_shard_whether_named_through_a_symbolic_link_or_directly():
    """A position saved with `/project/data/a.tar` (a link into `/scratch`) indexes the file `/scratch/a.tar`: named
    either way now, it is that shard. Another file is not, even of the same name and size; the same file resized is
    a changed shard; an older checkpoint's shards (path and size only) are compared by path as before."""
    from modeling_vitgpt2.training.checkpoints import stream_change

    def stream(*shards):
        return {"source": "--train_shards", "shards": [list(shard) for shard in shards], "shuffle_buffer": 0,
                "seed": None, "pipeline": "images"}

    linked, direct = ("/project/data/a.tar", 10, "/scratch/a.tar"), ("/scratch/a.tar", 10, "/scratch/a.tar")
    linked_b, direct_b = ("/project/data/b.tar", 20, "/scratch/b.tar"), ("/scratch/b.tar", 20, "/scratch/b.tar")
    assert stream_change(stream(linked, linked_b), stream(direct, direct_b)) is None
    assert stream_change(stream(direct, direct_b), stream(linked, direct_b)) is None
    assert stream_change(stream(linked, linked_b), stream(direct_b, direct)) == "the shards are in another order"
    assert stream_change(stream(linked), stream(("/scratch/a.tar", 12, "/scratch/a.tar"))) == \
        "1 shard(s) changed size (/scratch/a.tar)"
    assert stream_change(stream(linked), stream(("/copy/a.tar", 10, "/copy/a.tar"))) == \
        "1 shard(s) no longer given (/project/data/a.tar); 1 shard(s) new (/copy/a.tar)"
    assert stream_change(stream(("/project/data/a.tar", 10)), stream(direct)) == \
        "1 shard(s) no longer given (/project/data/a.tar); 1 shard(s) new (/scratch/a.tar)"
    assert stream_change(stream(("/project/data/a.tar", 10)), stream(linked)) is None
    # One file given twice, once through the link: read twice per pass, as the list given now reads it.
    assert stream_change(stream(linked, direct), stream(direct, direct)) is None
    assert stream_change(stream(linked, direct), stream(direct)) == "the list names 1 shard(s) counting repeats, was 2"


def test_a_shard_cut_at_a_header_or_with_a_damaged_header_is_counted_as_cut_short(tmp_path):
    """tarfile ends an archive silently at a missing, cut or damaged header past the first; a shard cut at any
    512-byte boundary (where an interrupted copy stops) or with one bad header must still be counted as cut short,
    with the samples before it kept, and an intact shard must not be."""
    import tarfile

    from modeling_vitgpt2.data.streaming import SHARD_PROBLEM_KEY, tar_samples

    write_shards(tmp_path, num_shards=1, per_shard=5)
    whole = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as archive:
        members = archive.getmembers()
    damaged = bytearray(whole)
    damaged[members[6].offset + 140] ^= 0x55  # inside the checksummed header of the seventh member
    shards = {f"cut at byte {cut}": whole[:cut] for cut in range(512, members[-1].offset_data, 512)}
    shards["cut inside a header"] = whole[:members[4].offset + 100]
    shards["a damaged header"] = bytes(damaged)
    for name, payload in shards.items():
        (tmp_path / "shard.tar").write_bytes(payload)
        rows = list(tar_samples([str(tmp_path / "shard.tar")]))
        assert rows[-1]["image_name"] == SHARD_PROBLEM_KEY, name
        assert "the rest of it is skipped" in rows[-1]["problem"], name
        assert all(row["problem"] is None for row in rows[:-1]), name
    assert [row["problem"] for row in tar_samples([str(tmp_path / "00000.tar")])] == [None] * 5


def tar_payload(members: list[tuple[str, bytes | str]]) -> bytes:
    """A tar file's bytes holding `members` in order; a `str` payload makes the member a hard link to that name."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if isinstance(payload, str):
                info.type, info.linkname = tarfile.LNKTYPE, payload
                archive.addfile(info)
            else:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def without_shard(rows: list[dict]) -> list[dict]:
    return [{**row, "shard": None} for row in rows]


CUT_LAYOUTS = {
    # webdataset's TarWriter writes a key's fields in sorted order: the `.txt` after the `.json` gives the caption.
    "sorted fields": [("a.jpg", 1), ("a.json", b'{"caption": "alt text of a"}'), ("a.txt", b"the caption of a"),
                      ("b.jpg", 2), ("b.json", b"{not json"), ("b.txt", b"the caption of b"),
                      ("c.jpg", 3), ("c.json", b'{"caption": "alt text of c"}')],
    "a link after the caption": [("a.jpg", 1), ("a.txt", b"cap a"), ("a.png", "a.jpg"), ("b.jpg", 2),
                                 ("b.txt", b"cap b")],
    "an oversized caption after the .json": [("a.jpg", 1), ("a.json", b'{"caption": "alt"}'), ("a.txt", b"x" * 101),
                                             ("b.jpg", 2), ("b.txt", b"cap b")],
    "bad samples and unused members": [("a.jpg", 1), ("a.txt", b"\xff not UTF-8"), ("a.cls", b"7" * 700),
                                       ("b.txt", b"zero-filled\0\0"), ("b.jpg", 2), ("c.jpg", 3), ("c.txt", b"cap c"),
                                       ("c.cls", b"")],
}


@pytest.mark.parametrize("layout", list(CUT_LAYOUTS))
def test_no_row_of_a_cut_shard_differs_from_the_intact_shards(tmp_path, monkeypatch, layout):
    """The reader yields a sample when a member of the next key starts it, so at a cut it holds one whose members may
    go on behind the cut. Keeping it where the cut came after its last byte (a9118f8) gave the `.json` caption where
    the intact shard gives the `.txt` one, and trained on samples the intact shard refuses (a hard-linked image after
    the caption, an oversized `.txt` after the `.json`). At every offset near a member boundary, each row a cut shard
    yields is the intact shard's, and the cut is counted after as many rows as it yielded."""
    import tarfile

    from helpers import image_bytes
    from modeling_vitgpt2.data import streaming
    from modeling_vitgpt2.data.streaming import SHARD_PROBLEM_KEY, tar_samples

    monkeypatch.setattr(streaming, "MAX_TEXT_FIELD_BYTES", 100)
    payload = tar_payload([(name, image_bytes(seed=value) if isinstance(value, int) else value)
                           for name, value in CUT_LAYOUTS[layout]])
    shard = tmp_path / "shard.tar"
    shard.write_bytes(payload)
    intact = list(tar_samples([str(shard)]))
    assert SHARD_PROBLEM_KEY not in [row["image_name"] for row in intact]
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    end = -(-(members[-1].offset_data + members[-1].size) // 512) * 512  # the end-of-archive marker
    boundaries = [end, end + 512] + [at for member in members
                                     for at in (member.offset, member.offset + 100, member.offset_data,
                                                member.offset_data + member.size)]
    cuts = sorted({at + step for at in boundaries for step in (-1, 0, 1)} & set(range(len(payload) + 1)))
    for cut in cuts:
        shard.write_bytes(payload[:cut])
        rows = list(tar_samples([str(shard)]))
        if cut >= end + 512:  # tarfile stops at the marker's first block
            assert without_shard(rows) == without_shard(intact), cut
            continue
        *rows, problem = rows
        assert problem["image_name"] == SHARD_PROBLEM_KEY, cut
        assert f"cut short after {len(rows)} sample(s)" in problem["problem"] or \
            not rows and "cannot be read as a tar file" in problem["problem"], cut
        assert without_shard(rows) == without_shard(intact[:len(rows)]), cut


def test_a_bad_sample_before_a_cut_is_counted_by_its_own_reason(tmp_path):
    """A sample held at a cut whose own member, read whole, already made it bad (a caption that is not UTF-8, one
    holding NUL bytes, an oversized member) is bad whatever followed: it was counted as part of the cut shard, which
    lost its reason from the counts. A sample that may be bad only for the cut (no caption yet) is not counted so."""
    import tarfile

    from helpers import image_bytes, write_tar

    whole = write_tar(tmp_path / "whole.tar", [("a.jpg", image_bytes(seed=1)), ("a.txt", b"cap a"),
                                               ("b.jpg", image_bytes(seed=2)), ("b.txt", b"\xff\xfe bad"),
                                               ("b.cls", b"7" * 700), ("c.jpg", image_bytes(seed=3)),
                                               ("c.txt", b"cap c"), ("d.jpg", image_bytes(seed=4)),
                                               ("d.txt", b"cap d")])
    with tarfile.open(whole) as archive:
        members = {member.name: member for member in archive.getmembers()}

    def counted(cut: int) -> tuple[list[str], dict]:
        (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut])
        counts = StreamCounts()
        rows = decoded_rows(stream_webdataset([str(tmp_path / "cut.tar")]), counts)
        return [row["image_name"] for row in rows], dict(counts.reasons)

    assert counted(members["c.jpg"].offset) == (["a"], {"unreadable caption": 1, "unreadable shard": 1})
    # Also where a member of b after the bad one is cut: the intact shard names the first bad member's reason.
    assert counted(members["b.cls"].offset_data + 100) == (["a"], {"unreadable caption": 1, "unreadable shard": 1})
    # d, held at the cut with its image and no caption yet, is the cut's, not "no caption".
    assert counted(members["d.txt"].offset) == (["a", "c"], {"unreadable caption": 1, "unreadable shard": 1})


def test_a_shard_tarfile_fails_on_is_counted_and_its_own_bugs_still_raise(tmp_path, monkeypatch):
    """tarfile's gzip header parser raises TypeError on a `.tar.gz` cut inside its first bytes (or inside a FEXTRA
    field, as bgzip writes), and its GNU sparse (PAX 1.0) parser ValueError on a sparse map cut short: both escaped
    `tar_samples` and stopped training. They count the shard as unreadable or cut short; only tarfile's calls are
    guarded, so the same errors raised by the reader's own code still surface."""
    import gzip
    import io
    import struct
    import tarfile
    import zlib

    from helpers import image_bytes
    from modeling_vitgpt2.data import streaming
    from modeling_vitgpt2.data.streaming import SHARD_PROBLEM_KEY, tar_samples

    raw = tar_payload([("a.jpg", image_bytes(seed=1)), ("a.txt", b"cap a")])
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    with_extra = (b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + struct.pack("<H", 6) + b"BC\2\0xy"
                  + compressor.compress(raw) + compressor.flush())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, payload in (("a.jpg", image_bytes(seed=1)), ("a.txt", b"cap a")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        sparse = b"1\n0\n10\n".ljust(512, b"\0") + b"x" * 10  # GNU sparse 1.0: the map, then the data
        info = tarfile.TarInfo("b.cls")
        info.size = len(sparse)
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "b.cls",
                            "GNU.sparse.realsize": "10"}
        archive.addfile(info, io.BytesIO(sparse))
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as archive:
        sparse_map = archive.getmember("b.cls").offset_data - 512
    shards = {"gzip header": (gzip.compress(raw)[:3], "TypeError"), "gzip FEXTRA": (with_extra[:11], "TypeError"),
              "sparse map": (buffer.getvalue()[:sparse_map], "ValueError")}
    for name, (payload, error) in shards.items():
        (tmp_path / "shard").write_bytes(payload)
        rows = list(streaming.stream_webdataset([str(tmp_path / "shard")]))
        assert [row["image_name"] for row in rows] == [SHARD_PROBLEM_KEY], name
        assert f"(ReadError: tarfile fails on it: {error}: " in rows[0]["problem"], name

    def broken_row(*args):
        raise ValueError("a bug in the reader")

    (tmp_path / "whole.tar").write_bytes(raw)
    monkeypatch.setattr(streaming, "_caption_row", broken_row)
    with pytest.raises(ValueError, match="a bug in the reader"):
        list(tar_samples([str(tmp_path / "whole.tar")]))


def test_a_zero_filled_shard_is_counted_and_its_nul_captions_skipped(tmp_path):
    """A download that preallocated the whole file and stopped (aria2, torrent clients) leaves zeros where it did not
    write. Zeros from inside a caption gave the caption 'a long\\x00\\x00...' as a good sample; zeros from a header
    on read as tar's end-of-archive marker, and the rest of the shard was lost uncounted. A caption holding NUL bytes
    is now a bad sample, and a marker followed by data (the zeros are a hole) counts the shard as cut short. Zeros
    after the marker, however many, are record padding (`tar -b` records of any size), so zeros from a header on to
    the end still go unseen; and zeros after a compressed stream's end (bsdtar pads .tar.bz2/.tar.xz to a record),
    which bzip2 and xz refuse to read, are not a cut."""
    import bz2
    import lzma
    import tarfile

    from helpers import image_bytes, write_tar

    whole = write_tar(tmp_path / "whole.tar", [
        ("a.jpg", image_bytes(seed=1)), ("a.txt", b"cap a"), ("b.jpg", image_bytes(seed=2)),
        ("b.txt", b"a long caption for b"), ("c.jpg", image_bytes(seed=3)), ("c.txt", b"cap c"),
        ("d.jpg", image_bytes(seed=4)), ("d.json", b'{"caption": "cap\\u0000 d"}')])
    payload = whole.read_bytes()
    with tarfile.open(whole) as archive:
        members = {member.name: member for member in archive.getmembers()}
    zeros = b"\0" * (1 << 20)

    def read(name: str, data: bytes) -> tuple[list, dict]:
        (tmp_path / name).write_bytes(data)
        counts = StreamCounts()
        rows = decoded_rows(stream_webdataset([str(tmp_path / name)]), counts)
        return [(row["image_name"], row["caption"]) for row in rows], dict(counts.reasons)

    good = [("a", "cap a"), ("b", "a long caption for b"), ("c", "cap c")]
    assert read("whole.tar", payload) == (good, {"caption holds NUL bytes": 1})
    in_caption = members["b.txt"].offset_data + 6
    assert read("in-caption.tar", payload[:in_caption] + bytes(len(payload) - in_caption)) == \
        ([("a", "cap a")], {"caption holds NUL bytes": 1})
    at_header = members["c.jpg"].offset
    assert read("at-header.tar", payload[:at_header] + zeros + bytes(1024)) == (good[:2], {})  # unseen, see above
    assert read("hole.tar", payload[:at_header] + bytes(2048) + payload[at_header + 2048:]) == \
        (good[:1], {"unreadable shard": 1})
    marker = -(-(members["d.json"].offset_data + members["d.json"].size) // 512) * 512
    assert read("padded.tar", payload[:marker] + bytes(512) + zeros) == (good, {"caption holds NUL bytes": 1})
    assert read("large-record.tar", payload[:marker] + bytes(512) + zeros * 3) == (good, {"caption holds NUL bytes": 1})
    for suffix, compress in ((".tar.bz2", bz2.compress), (".tar.xz", lzma.compress)):
        assert read(f"padded{suffix}", compress(payload) + bytes(20000)) == (good, {"caption holds NUL bytes": 1})
