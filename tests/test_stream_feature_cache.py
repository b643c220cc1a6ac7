"""The feature cache on streamed webdataset shards: one feature shard per input shard, written once by one process,
atomic and keyed by the shard's bytes, and training from it gives the losses of training from the images."""

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
from transformers import TrainerCallback

import modeling_vitgpt2.data.feature_cache as feature_cache
import modeling_vitgpt2.data.prepass_signals as prepass_signals
from conftest import REPO, training_arguments
from helpers import (
    check_one_epoch_read_once,
    environment,
    image_bytes,
    streamed_training_command,
    write_shards,
    write_tar,
)
from modeling_vitgpt2.data.feature_cache import EncoderFeatureCache, PrePassFailedError
from modeling_vitgpt2.data.prepass_signals import FailureSignal
from modeling_vitgpt2.data.streaming import expand_shards
from modeling_vitgpt2.model.modeling_vitgpt2 import ViTGPT2Encoder
from modeling_vitgpt2.training.arguments import DataArguments
from modeling_vitgpt2.training.run import run_training
from modeling_vitgpt2.utils.io import file_digest

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
    # Inside the second sample's first header: x1 went out with the cut, as the reader cannot tell whether more of
    # it was to come.
    cut_at_header.write_bytes(whole.read_bytes()[:2600])
    shards = [str(odd_keys), str(cut), str(cut_at_header)]

    image_counts, feature_counts = StreamCounts(), StreamCounts()
    from_images = [(row["image_name"], row["caption"]) for row in decoded_rows(stream_webdataset(shards), image_counts)]
    paths = cache_of(tmp_path / "runs" / "vit[lr=1e-4]" / "feature-cache").build_shards(shards)
    from_features = [(row["image_name"], row["caption"])
                     for row in stream_feature_shards(paths, feature_counts, shards)]

    assert from_images == [("__cat", "a cat"), ("k", "a dog"), ("k", "a fox"), ("x1", "x one")]
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


@pytest.mark.parametrize("case", ["record written", "disk full for the record", "no record at all"])
def test_a_failed_process_stops_the_others_waiting_in_the_pre_pass(cache_of, tmp_path, monkeypatch, caplog, case):
    """Two processes of one job, played in turn: process 1 fails on its first shard, then process 0 encodes its own
    shards, waits (saying so at WARNING) for process 1's, finds its failure record and stops with its error. On a
    full disk, where not even the record's reserved bytes can be overwritten, process 0 still stops at once, naming
    process 1 (the record's file was made before the work, and marking it failed needs no space). Where even the
    rename fails, process 1 keeps its reservation, which process 0 finds unlocked once process 1 has ended."""
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
    monkeypatch.setattr(prepass_signals, "write_json_atomic",
                        refused_on_a_full_disk(prepass_signals.write_json_atomic))
    if case == "no record at all":  # a directory that needs a new block for the new name
        monkeypatch.setattr(os, "replace", refused_on_a_full_disk(os.replace))

    def failing(self, shard, *args):
        if shard.endswith("00001.tar"):
            full.extend([True] if case != "record written" else [])
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
    if case == "disk full for the record":
        assert str(outcome[0]).startswith("process 1 failed in the pre-pass, and its error could not be recorded in ")
        assert "the log of that process has it; this process stops too (2 feature shard(s) missing" in str(outcome[0])
    elif case == "no record at all":
        assert str(outcome[0]).startswith("process 1 stopped during the pre-pass without recording an error")
        assert "its log may say why; this process stops too (2 feature shard(s) missing" in str(outcome[0])
        told = [record.getMessage() for record in caplog.records if "Could not tell" in record.getMessage()]
        assert len(told) == 1 and "They stop once it exits" in told[0] and "timeout" not in told[0]
    else:
        assert f"process 1 failed while encoding {shards[1]}: OSError: No space left on device" in str(outcome[0])
    assert not any(marker.exists() for marker in earlier)
    left = ".prepass-run-1-1.json" if case == "no record at all" else ".failed-run-1-1.json"
    assert sorted(marker.name for marker in markers.glob(".*.json")) == [left]
    assert any(record.levelname == "WARNING" and "Waiting for 2 of 4 feature shards" in record.getMessage()
               for record in caplog.records)


class PlayedProcesses:
    """Plays processes of multi-process pre-pass jobs in threads of this one, each its own rank, job size and run: the
    patched `PartialState` and `gather_object` answer each thread for its process, as accelerate would."""

    def __init__(self, monkeypatch):
        self.local = threading.local()
        monkeypatch.setattr(feature_cache, "PartialState", lambda: SimpleNamespace(
            process_index=self.local.rank, num_processes=self.local.world, is_main_process=self.local.rank == 0))
        monkeypatch.setattr(feature_cache, "gather_object", lambda items: [
            (items[0][0], self.local.run)] * self.local.world if isinstance(items[0][0], str) else self.local.digests)

    def build(self, cache, shards, rank, world, run):
        self.local.rank, self.local.world, self.local.run = rank, world, run
        self.local.digests = [(index, file_digest(shard)) for index, shard in enumerate(shards)]  # every process's
        return cache.build_shards(shards, poll_seconds=0.05)

    def start(self, cache, shards, **process):
        """Runs `build` in a daemon thread (a waiter that never stops must not hold up the test run's exit)."""
        outcome = []

        def play():
            try:
                outcome.append(self.build(cache, shards, **process))
            except Exception as error:
                outcome.append(error)

        thread = threading.Thread(target=play, daemon=True)
        thread.start()
        return thread, outcome


def test_a_job_sharing_the_cache_folder_keeps_the_records_of_a_job_still_running(cache_of, tmp_path, monkeypatch):
    """Job A (2 processes) and job B (1) share a cache folder. A's process 1 fails, leaving its failure record, while
    A's process 0 still encodes its shard; job B starts then. B's cleanup deletes the records of runs that ended (one
    of an older version, with no lock file; one whose lock nobody holds) but keeps A's, so A's process 0 still finds
    process 1's record and stops with its error instead of waiting forever."""
    write_shards(tmp_path / "a", num_shards=2, per_shard=1)
    write_shards(tmp_path / "b", num_shards=1, per_shard=1, seed=7)
    shards_a, shards_b = expand_shards(f"{tmp_path}/a/{{00000..00001}}.tar"), [f"{tmp_path}/b/00000.tar"]
    played = PlayedProcesses(monkeypatch)
    write, encoding, go_on = EncoderFeatureCache._write_shard, threading.Event(), threading.Event()

    def scripted(self, shard, *args):
        if shard == shards_a[1]:
            raise OSError("No space left on device")
        if shard == shards_a[0]:
            encoding.set()
            assert go_on.wait(30)
        return write(self, shard, *args)

    monkeypatch.setattr(EncoderFeatureCache, "_write_shard", scripted)
    with pytest.raises(OSError, match="No space left"):
        played.build(cache_of(tmp_path / "cache"), shards_a, rank=1, world=2, run="job-a")
    markers = next((tmp_path / "cache").glob("encoder-features-*/shards"))
    ended = [markers / ".failed-old-1.json", markers / ".prepass-ended-0.json", markers / ".run-ended.lock"]
    for marker in ended:
        marker.write_text("{}")
    waiter, outcome = played.start(cache_of(tmp_path / "cache"), shards_a, rank=0, world=2, run="job-a")
    try:
        assert encoding.wait(30)
        played.build(cache_of(tmp_path / "cache"), shards_b, rank=0, world=1, run="job-b")
        assert sorted(marker.name for marker in markers.glob(".*")) == [
            ".failed-job-a-1.json", ".prepass-job-a-0.json", ".run-job-a.lock"]
    finally:
        go_on.set()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "job A's process 0 still waits for the failed process's shard"
    assert isinstance(outcome[0], PrePassFailedError)
    assert f"process 1 failed while encoding {shards_a[1]}: OSError: No space left on device" in str(outcome[0])


LOCKED_UNTIL_KILLED = textwrap.dedent("""
    import fcntl, os, sys, time
    descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    os.write(descriptor, sys.stdin.buffer.read())
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_process_killed_outright_stops_the_others_waiting_in_the_pre_pass(cache_of, tmp_path, monkeypatch, caplog):
    """Process 1 of 2, killed with SIGKILL (the out-of-memory killer's signal) while it encodes, writes no failure
    record. A child process plays it, holding its reservation as the pre-pass does (made, locked, its placeholder
    written): process 0 waits while it lives, and once it is killed stops within a few polls, naming it."""
    write_shards(tmp_path / "shards", num_shards=2, per_shard=1)
    shards = expand_shards(f"{tmp_path}/shards/{{00000..00001}}.tar")
    played, cache = PlayedProcesses(monkeypatch), cache_of(tmp_path / "cache")
    reserved = cache.folder / "shards" / ".prepass-job-1.json"
    reserved.parent.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", LOCKED_UNTIL_KILLED, str(reserved)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        child.stdin.write(FailureSignal._padded({"process": 1, "shard": None, "error": None}))
        child.stdin.close()
        assert child.stdout.readline() == b"locked\n"
        waiter, outcome = played.start(cache, shards, rank=0, world=2, run="job")
        deadline = time.monotonic() + 20
        while not any("Waiting for 1 of 2" in record.getMessage() for record in caplog.records):
            assert waiter.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.01)
        time.sleep(0.2)  # a few polls: a process alive, its lock held, is waited for
        assert waiter.is_alive(), outcome
    finally:
        child.kill()
        child.wait()
    killed = time.monotonic()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "process 0 still waits for the killed process's shard"
    assert time.monotonic() - killed < 2
    assert isinstance(outcome[0], PrePassFailedError)
    assert str(outcome[0]).startswith(
        "process 1 stopped during the pre-pass without recording an error (killed? out of memory?")
    assert "its log may say why; this process stops too (1 feature shard(s) missing" in str(outcome[0])


def test_a_process_finishing_while_another_looks_is_not_taken_for_a_killed_one(tmp_path, monkeypatch):
    """A finishing process deletes its reservation while it still holds the lock, then releases it: a waiter that
    opened the reservation before and takes the lock after finds the name gone, and one that looks in between finds
    it locked. Neither takes the finished process for a killed one."""
    owner = FailureSignal(tmp_path, "job", 1, reserve=True)
    assert FailureSignal.ended_silently(owner.reserved) is None  # running: locked

    unlink = type(owner.reserved).unlink
    looked = []

    def looking_first(path, *args, **kwargs):
        if path == owner.reserved:
            looked.append(FailureSignal.ended_silently(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(type(owner.reserved), "unlink", looking_first)
    owner.release()
    assert looked == [None]
    monkeypatch.undo()

    owner = FailureSignal(tmp_path, "job", 2, reserve=True)
    flock = prepass_signals._flock

    def finished_meanwhile(descriptor, operation):
        owner.release()
        return flock(descriptor, operation)

    monkeypatch.setattr(prepass_signals, "_flock", finished_meanwhile)
    assert FailureSignal.ended_silently(owner.reserved) is None
    assert not owner.reserved.exists()


def test_without_working_flock_the_pre_pass_stops_at_once_naming_the_folder(cache_of, tmp_path, monkeypatch):
    """Where the cache's file system refuses flock (ENOLCK: some NFS mounts), the pre-pass cannot tell a killed
    process from a running one, nor keep two jobs apart (its per-shard locks need flock too): it stops before any
    work, saying where to put the cache instead."""
    import errno
    import fcntl

    from modeling_vitgpt2.utils.errors import UserError

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    write_shards(tmp_path / "shards", num_shards=1, per_shard=1)
    monkeypatch.setattr(prepass_signals, "fcntl", SimpleNamespace(
        flock=no_locks, LOCK_SH=fcntl.LOCK_SH, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
    with pytest.raises(UserError, match=r"No locks available\): the feature-cache pre-pass needs working file locks"
                                        r".*--feature_cache_dir"):
        cache_of(tmp_path / "cache").build_shards([f"{tmp_path}/shards/00000.tar"])
    assert not list((tmp_path / "cache").rglob("*.tar"))
