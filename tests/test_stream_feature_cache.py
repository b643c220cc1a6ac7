"""The feature cache on streamed webdataset shards: one feature shard per input shard, written once by one process,
atomic and keyed by the shard's bytes, and training from it gives the losses of training from the images."""

import json
import socket
import subprocess
import sys
import textwrap

import pytest
from transformers import TrainerCallback

from conftest import REPO, training_arguments
from helpers import (
    check_one_epoch_read_once,
    environment,
    image_bytes,
    streamed_training_command,
    write_shards,
    write_tar,
)
from modeling_vitgpt2.data.feature_cache import EncoderFeatureCache
from modeling_vitgpt2.data.streaming import expand_shards
from modeling_vitgpt2.model.modeling_vitgpt2 import ViTGPT2Encoder
from modeling_vitgpt2.training.arguments import DataArguments
from modeling_vitgpt2.training.run import run_training

BROKEN = {"000010001": "image", "000030004": "caption"}  # 4 shards of 5 samples: 18 good ones


class EncodedImages:
    """Counts the images every encoder forward of the process encodes."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = ViTGPT2Encoder.forward

        def counting(encoder, pixel_values, *args, **kwargs):
            self.count += len(pixel_values)
            return original(encoder, pixel_values, *args, **kwargs)

        monkeypatch.setattr(ViTGPT2Encoder, "forward", counting)


class LoggedLosses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_streamed_training_from_cached_features_matches_the_images_and_encodes_each_image_once(
    shapes, pretrained_parts, tmp_path, monkeypatch
):
    write_shards(tmp_path / "shards", broken=BROKEN)
    encoded = EncodedImages(monkeypatch)

    def train(name, cache):
        logged = LoggedLosses()
        model_args, _, peft_args, training_args = training_arguments(
            shapes, pretrained_parts, tmp_path / name, max_steps=8, per_device_train_batch_size=3)
        data_args = DataArguments(train_shards=f"{tmp_path}/shards/{{00000..00003}}.tar",
                                  val_shards=f"{tmp_path}/shards/00000.tar", max_eval_images=2, max_caption_length=24,
                                  shuffle_buffer=4, cache_encoder_features=cache,
                                  feature_cache_dir=str(tmp_path / "cache"))
        encoded.count = 0
        run_training(model_args, data_args, peft_args, training_args, callbacks=[logged])
        summary = json.loads((tmp_path / name / "training_summary.json").read_text())
        return logged.losses, summary["stream"], encoded.count

    images_losses, images_counts, images_encoded = train("images", cache=False)
    cached_losses, cached_counts, cached_encoded = train("cached", cache=True)
    assert images_encoded == 8 * 3 + 2  # every trained sample, then the 2 validation images at evaluation
    # 8 steps of 3 take 24 of the 18 good samples: two passes over the shards, yet each image encoded once, before
    # training (18), and the validation images once (2).
    assert cached_encoded == 18 + 2
    assert len(cached_losses) == 8
    assert cached_losses == pytest.approx(images_losses, abs=2e-3)  # float16 features
    assert cached_counts == images_counts  # bad samples counted alike
    # The shuffle buffer holds undecoded samples, bad ones too: those it still holds at the end are not counted.
    assert set(cached_counts["skipped_by_reason"]) == {"unreadable image", "no caption"}
    assert set(cached_counts["skipped_by_shard"]) == {f"{tmp_path}/shards/00001.tar", f"{tmp_path}/shards/00003.tar"}


@pytest.fixture()
def cache_of(frozen_model, tiny_processor):
    return lambda folder: EncoderFeatureCache(folder, frozen_model, tiny_processor)


@pytest.fixture()
def frozen_model(tiny_model):
    tiny_model.encoder.requires_grad_(False)
    return tiny_model


def test_a_killed_partial_or_changed_shard_is_encoded_again_and_only_it(cache_of, tmp_path, monkeypatch):
    write_shards(tmp_path / "shards", broken=BROKEN)
    shards = expand_shards(f"{tmp_path}/shards/{{00000..00003}}.tar")
    encoded = EncodedImages(monkeypatch)
    cache = cache_of(tmp_path / "cache")
    paths = cache.build_shards(shards)
    assert encoded.count == 18 and [path.name.split("-")[0] for path in paths] == ["00000", "00001", "00002", "00003"]
    records = [json.loads(path.with_suffix(".json").read_text()) for path in paths]
    assert [(record["samples"], record["skipped"]) for record in records] == [(5, 0), (5, 1), (5, 0), (5, 1)]

    encoded.count = 0
    assert cache_of(tmp_path / "cache").build_shards(shards) == paths and encoded.count == 0  # all complete: kept

    # Shard 1: killed while writing (a temporary file, no shard); shard 2: cut short after it was recorded;
    # shard 3: killed between writing the shard and its record.
    leftover = paths[1].parent / f".{paths[1].stem}.12345.0badf00d.tmp.tar"
    paths[1].rename(leftover)
    with open(paths[2], "r+b") as shard:
        shard.truncate(paths[2].stat().st_size // 2)
    paths[3].with_suffix(".json").unlink()
    assert cache.build_shards(shards) == paths
    assert encoded.count == 4 + 5 + 4 and not leftover.exists()
    assert [json.loads(path.with_suffix(".json").read_text()) for path in paths] == records

    # New content under the old name: a new feature shard, keyed by the new bytes; the old one is not read.
    write_shards(tmp_path / "shards", num_shards=1, seed=9)
    encoded.count = 0
    changed = cache.build_shards(shards)
    assert encoded.count == 5 and changed[0] != paths[0] and changed[1:] == paths[1:]


def test_cached_features_stream_every_row_the_images_do_whatever_the_keys_and_the_folder(cache_of, tmp_path):
    """Keys starting with `__` (and the `__shard__` row of a shard cut short), a key two consecutive samples share,
    and a cache folder whose name holds glob characters: the stream of cached features gives the rows and counts of
    the image stream, not fewer rows, an error, or nothing."""
    from modeling_vitgpt2.data.feature_cache import stream_feature_shards
    from modeling_vitgpt2.data.streaming import StreamCounts, decoded_rows, stream_webdataset

    odd_keys = write_tar(tmp_path / "odd-keys.tar", [
        ("__cat.jpg", image_bytes(seed=1)), ("__cat.txt", b"a cat"),
        ("k.jpg", image_bytes(seed=2)), ("k.txt", b"a dog"), ("k.jpg", image_bytes(seed=3)), ("k.txt", b"a fox")])
    whole = write_tar(tmp_path / "whole.tar", [("x1.jpg", image_bytes(seed=4)), ("x1.txt", b"x one"),
                                                ("x2.jpg", image_bytes(seed=5, size=200)), ("x2.txt", b"x two")])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:3100])  # inside the second sample's image
    cut_at_header = tmp_path / "cut-at-header.tar"
    cut_at_header.write_bytes(whole.read_bytes()[:2600])  # inside the second sample's first header: x1 is whole
    shards = [str(odd_keys), str(cut), str(cut_at_header)]

    image_counts, feature_counts = StreamCounts(), StreamCounts()
    from_images = [(row["image_name"], row["caption"]) for row in decoded_rows(stream_webdataset(shards), image_counts)]
    paths = cache_of(tmp_path / "runs" / "vit[lr=1e-4]" / "feature-cache").build_shards(shards)
    from_features = [(row["image_name"], row["caption"])
                     for row in stream_feature_shards(paths, feature_counts, shards)]

    assert from_images == [("__cat", "a cat"), ("k", "a dog"), ("k", "a fox"), ("x1", "x one"), ("x1", "x one")]
    assert from_features == from_images
    assert feature_counts.reasons == image_counts.reasons == {"unreadable shard": 2}
    assert feature_counts.by_shard == image_counts.by_shard == {
        str(cut): {"unreadable shard": 1}, str(cut_at_header): {"unreadable shard": 1}}


def test_a_stream_of_cached_features_resumes_at_its_position(cache_of, tmp_path):
    """The position a checkpoint saves (the stateful data loader's) puts a new stream of cached features where the
    old one stopped: the batches that were left, none read twice, the bad samples still skipped."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from modeling_vitgpt2.data.feature_cache import stream_feature_shards
    from modeling_vitgpt2.data.streaming import StreamCounts

    write_shards(tmp_path / "shards", broken=BROKEN)
    paths = cache_of(tmp_path / "cache").build_shards(expand_shards(f"{tmp_path}/shards/{{00000..00003}}.tar"))

    def loader(counts=None):
        return prepare_data_loader(
            DataLoader(stream_feature_shards(paths, counts or StreamCounts()), batch_size=3,
                       collate_fn=lambda rows: [row["image_name"] for row in rows]),
            num_processes=1, process_index=0, put_on_device=False, dispatch_batches=False, use_stateful_dataloader=True,
        )

    whole = list(loader())
    stopped = loader()
    batches = iter(stopped)
    trained = [next(batches) for _ in range(2)]
    counts = StreamCounts()
    resumed = loader(counts)
    resumed.load_state_dict(stopped.state_dict())
    assert trained + list(resumed) == whole and sum(map(len, whole)) == 18
    assert (counts.used, counts.skipped) == (18 - 6, 2)  # only the rows after the position are read again


TRAIN_RECORDING_SHARD_WRITES = textwrap.dedent("""
    import json, runpy, sys
    from accelerate import PartialState
    from modeling_vitgpt2.data import feature_cache

    report, sys.argv = sys.argv[1], ["train.py", *sys.argv[2:]]
    written, atomic_path = [], feature_cache.atomic_path

    def recording(path):
        written.append(path.name)
        return atomic_path(path)

    feature_cache.atomic_path = recording
    try:
        runpy.run_path("train.py", run_name="__main__")
    finally:
        with open(f"{report}.{PartialState().process_index}", "w") as file:
            json.dump(written, file)
""")


def test_two_processes_write_each_shard_once_and_train_on_each_sample_once(pretrained_parts, tmp_path):
    """train.py under torchrun with 2 processes over 4 shards (one bad sample in each half): process p writes
    shards p and p + 2, nothing twice, and one pass (3 steps of 3 per process) reads the 18 good samples once."""
    write_shards(tmp_path / "shards", broken=BROKEN)
    (tmp_path / "recording_train.py").write_text(TRAIN_RECORDING_SHARD_WRITES)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    output_dir = tmp_path / "out"
    command = streamed_training_command(pretrained_parts, tmp_path / "shards", output_dir, "--max_steps", "3",
                                        "--cache_encoder_features", "--feature_cache_dir", str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
         str(tmp_path / "recording_train.py"), str(tmp_path / "written"), *command[1:]],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    check_one_epoch_read_once(output_dir, result.stderr)
    shards = sorted((tmp_path / "cache").glob("encoder-features-*/shards/*.tar"))
    assert len(shards) == 4
    first, second = (json.loads((tmp_path / f"written.{rank}").read_text()) for rank in (0, 1))
    first, second = (sorted(name for name in names if name.endswith(".tar")) for names in (first, second))
    assert first == [shards[0].name, shards[2].name] and second == [shards[1].name, shards[3].name]


def test_the_cache_on_a_streamed_dataset_without_shards_is_refused(train_script, tmp_path, capsys):
    status = train_script.main(["--dataset_name", str(tmp_path), "--streaming", "--cache_encoder_features",
                                "--max_steps", "2", "--output_dir", str(tmp_path / "out"), "--use_cpu"])
    assert status == 2
    assert "needs --train_shards" in capsys.readouterr().err


def test_a_complete_feature_shard_leaves_no_lock_file(cache_of, tmp_path):
    write_shards(tmp_path / "shards", num_shards=2, per_shard=2)
    paths = cache_of(tmp_path / "cache").build_shards(expand_shards(f"{tmp_path}/shards/{{00000..00001}}.tar"))
    assert sorted(path.name for path in paths[0].parent.iterdir()) == sorted(
        name for path in paths for name in (path.name, path.with_suffix(".json").name))


def test_a_pre_pass_on_a_full_disk_reads_complete_shards_and_stops_before_encoding(cache_of, tmp_path, monkeypatch):
    """The failure record's room is reserved only by a process with shards to encode: on a full disk a rerun over
    complete feature shards goes on, and one with a shard to encode stops at once, naming the disk."""
    import errno
    import os

    from modeling_vitgpt2.utils.io import DiskFullError

    write_shards(tmp_path / "shards", num_shards=2, per_shard=1)
    shards = expand_shards(f"{tmp_path}/shards/{{00000..00001}}.tar")
    paths = cache_of(tmp_path / "cache").build_shards(shards[:1])

    def full_disk(descriptor, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    assert cache_of(tmp_path / "cache").build_shards(shards[:1]) == paths
    with pytest.raises(DiskFullError, match=r"writing .*/shards/\.prepass-.*: free some space there"):
        cache_of(tmp_path / "cache").build_shards(shards)


@pytest.mark.parametrize("disk_full", [False, True], ids=["record written", "disk full for the record"])
def test_a_failed_process_stops_the_others_waiting_in_the_pre_pass(cache_of, tmp_path, monkeypatch, caplog,
                                                                    disk_full):
    """Two processes of one job, played in turn: process 1 fails on its first shard, then process 0 encodes its own
    shards, waits (saying so at WARNING) for process 1's, finds its failure record and stops with its error. On a
    full disk, where not even the record's reserved bytes can be overwritten, process 0 still stops at once, naming
    process 1 (the record's file was made before the work, and marking it failed needs no space)."""
    import errno
    import os
    import threading
    from types import SimpleNamespace

    import modeling_vitgpt2.data.feature_cache as feature_cache
    from modeling_vitgpt2.data.feature_cache import EncoderFeatureCache, PrePassFailedError
    from modeling_vitgpt2.utils.io import file_digest

    write_shards(tmp_path / "shards", num_shards=4, per_shard=2)
    shards = expand_shards(f"{tmp_path}/shards/{{00000..00003}}.tar")
    digests = [(index, file_digest(shard)) for index, shard in enumerate(shards)]

    def as_process(rank):
        monkeypatch.setattr(feature_cache, "PartialState", lambda: SimpleNamespace(
            process_index=rank, num_processes=2, is_main_process=rank == 0))
        # Both processes learn the same run (process 0's) and every process's shard hashes.
        monkeypatch.setattr(feature_cache, "gather_object", lambda items: [
            (item[0], "run-1") for item in items] * 2 if isinstance(items[0][0], str) else digests)

    as_process(1)
    write = EncoderFeatureCache._write_shard
    full = []  # from process 1's failure on, every write of the disk fails, the failure record's included

    def refused_on_a_full_disk(write_file):
        def writing(*args, **kwargs):
            if full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write_file(*args, **kwargs)
        return writing

    monkeypatch.setattr(os, "write", refused_on_a_full_disk(os.write))
    monkeypatch.setattr(feature_cache, "write_json_atomic", refused_on_a_full_disk(feature_cache.write_json_atomic))

    def failing(self, shard, *args):
        if shard.endswith("00001.tar"):
            full.extend([True] if disk_full else [])
            raise OSError("No space left on device")
        return write(self, shard, *args)

    monkeypatch.setattr(EncoderFeatureCache, "_write_shard", failing)
    with pytest.raises(OSError, match="No space left"):
        cache_of(tmp_path / "cache").build_shards(shards)
    full.clear()  # process 0's disk has room for its shards

    as_process(0)
    # Failure records of an earlier run, which the main process deletes: not this run's, which it waits on.
    markers = next((tmp_path / "cache").glob("encoder-features-*/shards"))
    earlier = [markers / ".failed-run-0-1.json", markers / ".prepass-run-0-0.json"]
    for marker in earlier:
        marker.write_text("{}")
    outcome = []

    def process_0():
        try:
            cache_of(tmp_path / "cache").build_shards(shards, poll_seconds=0.05)
        except Exception as error:
            outcome.append(error)

    waiter = threading.Thread(target=process_0, daemon=True)
    waiter.start()
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "process 0 still waits for the failed process's shards"
    assert isinstance(outcome[0], PrePassFailedError)
    if disk_full:
        assert str(outcome[0]).startswith("process 1 failed in the pre-pass, and its error could not be recorded in ")
        assert "the log of that process has it; this process stops too (2 feature shard(s) missing" in str(outcome[0])
    else:
        assert f"process 1 failed while encoding {shards[1]}: OSError: No space left on device" in str(outcome[0])
    assert not any(marker.exists() for marker in earlier)
    assert sorted(marker.name for marker in markers.glob(".*.json")) == [".failed-run-1-1.json"]
    assert any(record.levelname == "WARNING" and "Waiting for 2 of 4 feature shards" in record.getMessage()
               for record in caplog.records)
