"""Fault injection: `train.py` killed with SIGKILL at many points of a run that checkpoints every two steps (inside
checkpoint saving and rotation at exact points, and at timed moments), then resumed with
`--resume_from_checkpoint true`. Every trial must resume and end exactly where the uninterrupted run ends: the same
global step, the same loss at every step (none lost, none repeated), the same `train_loss`; and no file the run
writes may contain the Hub token it was given.

Runs go through `tests/fault_runner.py`, which imports the package once and forks a child per run, so a trial costs
the training itself rather than an interpreter start.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import REPO
from helpers import environment, step_losses, streamed_training_command, train_command, write_shards

MAX_STEPS = 8
TOKEN = "hf_FaultInjectionTestTokenDoNotLeak0123"
RUN = ["--max_steps", str(MAX_STEPS), "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
       "--hub_token", TOKEN]
RESUME = ["--resume_from_checkpoint", "true"]

# (where, at which occurrence): the n-th time the run reaches that point it is killed. Checkpoints are saved at steps
# 2, 4, 6 and 8; rotation first deletes a checkpoint when step 4's is complete.
EXACT_KILLS = [
    ("save_start", 2),
    ("save_start", 3),
    ("after_weights", 2),
    ("after_optimizer", 3),
    ("after_rng", 2),
    ("after_rng", 4),
    ("after_trainer_state", 2),
    ("after_trainer_rotation", 2),
    ("after_trainer_rotation", 4),
    ("mid_manifest", 2),
    ("mid_manifest", 3),
    ("before_rotation", 2),
    ("before_rotation", 4),
    ("mid_rotation", 1),
    ("mid_rotation", 2),
    ("mid_rotation", 3),
    ("final_save", 1),
]
TIMED_KILLS = 8  # at random moments of random steps after the first complete checkpoint


class Runner:
    """Client of `fault_runner.py`: starts runs, kills them, waits for them."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "fault_runner.py")], cwd=REPO, env=environment(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.runs = 0

    def start(self, argv: list[str], fault: tuple[str, int] | None = None, progress: Path | None = None) -> int:
        self.runs += 1
        self.log = self.log_dir / f"run-{self.runs}.log"
        job = {"argv": argv, "log": str(self.log), "fault": fault and {"at": fault[0], "nth": fault[1]},
               "progress": progress and str(progress)}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["pid"]

    def wait(self) -> int:
        line = self.process.stdout.readline()
        assert line, "the fault runner died"
        return json.loads(line)["status"]

    def run(self, argv: list[str], fault: tuple[str, int] | None = None) -> int:
        self.start(argv, fault)
        return self.wait()

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    runner = Runner(tmp_path_factory.mktemp("logs"))
    yield runner
    runner.close()


def arguments(shapes, pretrained_parts, output_dir, *extra):
    return train_command(shapes, pretrained_parts, output_dir, *RUN, *extra)[1:]  # without the script name


def outcome(output_dir: Path) -> dict:
    """What a finished run must match: its last checkpoint's step and per-step losses, and `train_loss`."""
    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {
        "global_step": state["global_step"],
        "losses": {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry},
        "train_loss": json.loads((output_dir / "train_results.json").read_text())["train_loss"],
    }


def files_with(output_dir: Path, secret: str) -> list[str]:
    return [str(path) for path in output_dir.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


@pytest.fixture(scope="module")
def reference(runner, shapes, pretrained_parts, tmp_path_factory):
    """The uninterrupted run and its outcome."""
    output_dir = tmp_path_factory.mktemp("faults") / "uninterrupted"
    assert runner.run(arguments(shapes, pretrained_parts, output_dir)) == 0, runner.tail()
    expected = outcome(output_dir)
    assert expected["global_step"] == MAX_STEPS and sorted(expected["losses"]) == list(range(1, MAX_STEPS + 1))
    return output_dir, expected


def wait_until(condition, what: str) -> float:
    deadline = time.monotonic() + 300
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.005)
    return time.monotonic()


def wait_for_step(progress: Path, step: int) -> float:
    """When the run started optimizer step `step` (1-based), as `fault_runner.py` reports it."""
    return wait_until(lambda: progress.exists() and len(progress.read_text().split()) >= step, f"step {step}")


def assert_resumes_to_reference(runner, shapes, pretrained_parts, output_dir, expected):
    status = runner.run(arguments(shapes, pretrained_parts, output_dir, *RESUME))
    assert status == 0, runner.tail()
    result = outcome(output_dir)
    assert result["global_step"] == expected["global_step"]
    assert sorted(result["losses"]) == sorted(expected["losses"]), "a step was lost or repeated"
    assert result["losses"] == pytest.approx(expected["losses"], abs=1e-5)
    assert result["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)
    assert files_with(output_dir, TOKEN) == []


def test_the_token_given_to_train_py_is_in_no_file_it_writes(reference):
    output_dir, _ = reference
    assert (output_dir / f"checkpoint-{MAX_STEPS}" / "training_args.bin").is_file()
    assert files_with(output_dir, TOKEN) == []


@pytest.mark.parametrize("point, nth", EXACT_KILLS, ids=[f"{point}-{nth}" for point, nth in EXACT_KILLS])
def test_a_run_killed_at_an_exact_point_resumes_to_the_uninterrupted_result(
    runner, reference, shapes, pretrained_parts, tmp_path, point, nth
):
    _, expected = reference
    output_dir = tmp_path / "killed"
    status = runner.run(arguments(shapes, pretrained_parts, output_dir), fault=(point, nth))
    assert status == -signal.SIGKILL, f"the fault at {point} #{nth} was not reached:\n{runner.tail()}"
    assert_resumes_to_reference(runner, shapes, pretrained_parts, output_dir, expected)


def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_result(
    runner, reference, shapes, pretrained_parts, tmp_path
):
    _, expected = reference
    moments = random.Random(0)
    killed = 0
    for trial in range(TIMED_KILLS):
        output_dir = tmp_path / f"trial-{trial}"
        progress = tmp_path / f"trial-{trial}.steps"
        pid = runner.start(arguments(shapes, pretrained_parts, output_dir), progress=progress)
        # A random moment of a random step after the first checkpoint, timed by this run's own pace (a reference
        # run's wall time would not do: a later run on a quieter machine ends sooner). Step 3 starts after step 2's
        # checkpoint is complete; the step before the chosen one is at most as long as what is left of the run.
        step = moments.randint(3, MAX_STEPS)
        previous_started = wait_for_step(progress, step - 1)
        started = wait_for_step(progress, step)
        assert any(output_dir.glob("checkpoint-*/checkpoint_complete.json")), "no complete checkpoint to resume from"
        time.sleep(moments.uniform(0, 0.9 * (started - previous_started)))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # the run ended first; the trial still checks that resuming changes nothing
            pass
        status = runner.wait()
        killed += status == -signal.SIGKILL
        assert_resumes_to_reference(runner, shapes, pretrained_parts, output_dir, expected)
    assert killed >= TIMED_KILLS - 1, f"only {killed} of {TIMED_KILLS} timed kills landed before the run ended"


def test_a_resumed_run_killed_again_resumes_to_the_uninterrupted_result(
    runner, reference, shapes, pretrained_parts, tmp_path
):
    _, expected = reference
    output_dir = tmp_path / "twice"
    assert runner.run(arguments(shapes, pretrained_parts, output_dir), fault=("after_optimizer", 2)) == -signal.SIGKILL
    resumed = arguments(shapes, pretrained_parts, output_dir, *RESUME)
    assert runner.run(resumed, fault=("mid_rotation", 1)) == -signal.SIGKILL
    assert_resumes_to_reference(runner, shapes, pretrained_parts, output_dir, expected)


def test_a_streamed_run_killed_while_saving_resumes_where_its_stream_stopped(runner, pretrained_parts,
                                                                            tmp_path):
    """Killed after Trainer wrote checkpoint-4's files but before its stream position: that checkpoint is not complete,
    so the run resumes at checkpoint-2's position, to the uninterrupted run's losses, and reads only the samples after
    that position. With gradient accumulation (2 batches of 1 per step), steps 3-6 read 8 samples, and 1 is read
    ahead."""
    write_shards(tmp_path / "shards")  # 20 samples: 10 steps of 2 in one pass
    streamed = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--shuffle_buffer", "0",
                "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"]

    def argv(name, *extra):
        return streamed_training_command(pretrained_parts, tmp_path / "shards", tmp_path / name, *streamed,
                                         *extra)[1:]

    assert runner.run(argv("whole")) == 0, runner.tail()
    assert runner.run(argv("killed"), fault=("after_trainer_state", 2)) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoint-4" / "stream_position").exists()
    assert runner.run(argv("killed", *RESUME)) == 0, runner.tail()
    assert step_losses(tmp_path / "killed", "checkpoint-6") == \
        pytest.approx(step_losses(tmp_path / "whole", "checkpoint-6"), abs=1e-6)
    stream = json.loads((tmp_path / "killed" / "training_summary.json").read_text())["stream"]
    assert (stream["counted_from_step"], stream["used_samples"]) == (2, 9)


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_naming_it(
    runner, reference, shapes, pretrained_parts, tmp_path
):
    _, expected = reference
    output_dir = tmp_path / "damaged"
    # Keep two checkpoints, then stop after step 6's: its weights are damaged, step 4's are intact.
    status = runner.run(arguments(shapes, pretrained_parts, output_dir, "--save_total_limit", "2"),
                        fault=("save_start", 4))
    assert status == -signal.SIGKILL
    weights = output_dir / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    status = runner.run(arguments(shapes, pretrained_parts, output_dir, "--save_total_limit", "2", *RESUME))
    assert status == 0, runner.tail()
    assert "not resuming from checkpoint-6" in runner.tail() and "adapter_model.safetensors" in runner.tail()
    result = outcome(output_dir)
    assert result["losses"] == pytest.approx(expected["losses"], abs=1e-5)
    assert result["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)


def test_a_second_run_into_a_busy_output_folder_stops_naming_the_holder(
    runner, shapes, pretrained_parts, tmp_path
):
    from modeling_vitgpt2.training.checkpoints import hold_output_dir

    output_dir = tmp_path / "busy"
    with hold_output_dir(output_dir, 0):
        status = runner.run(arguments(shapes, pretrained_parts, output_dir))
    assert status == 2
    assert "Traceback" not in runner.tail()
    message = runner.tail().strip().splitlines()[-1]
    assert message.startswith("train.py: error: ") and str(output_dir) in message and f"pid {os.getpid()}" in message
    assert not any(output_dir.glob("checkpoint-*"))


# ----------------------------------------------------------------------------------------------------------------
# Hostile shards: a bad sample, or the rest of a bad shard, is skipped and counted with its shard; the run goes on.


def hostile_shards(folder: Path) -> dict[str, Path]:
    """A good shard of 3 samples and one shard per kind of damage, each with one good sample where it can hold one."""
    from helpers import image_bytes, write_tar

    def sample(key, **fields):
        return [(f"{key}.jpg", image_bytes(seed=len(key))), *((f"{key}.{name}", data) for name, data in fields.items())]

    good = [m for key in ("g0", "g1", "g2") for m in sample(key, txt=f"caption {key}".encode())]
    shards = {
        "good": write_tar(folder / "good.tar", good),
        "latin1": write_tar(folder / "latin1.tar", sample("a0", txt="café crème".encode("latin-1"))
                            + sample("a1", txt=b"fine")),
        "bad_json": write_tar(folder / "bad_json.tar", sample("b0", json=b"{caption: 1}") + sample("b1", txt=b"fine")),
        "list_json": write_tar(folder / "list_json.tar", sample("c0", json=b"[1, 2]") + sample("c1", txt=b"fine")),
        "empty": folder / "empty.tar",
    }
    shards["empty"].write_bytes(b"")
    whole = write_tar(folder / "whole.tar", sample("d0", txt=b"fine") + sample("d1", txt=b"lost"))
    with tarfile.open(whole) as archive:
        cut = archive.getmember("d1.jpg").offset_data + 100  # inside d1's image
    shards["truncated"] = folder / "truncated.tar"
    shards["truncated"].write_bytes(whole.read_bytes()[:cut])
    return shards


def test_hostile_shards_are_skipped_by_reason_with_the_shard_named(tmp_path, caplog):
    from modeling_vitgpt2.data.streaming import StreamCounts, decoded_rows, stream_webdataset

    shards = hostile_shards(tmp_path)
    counts = StreamCounts()
    rows = list(decoded_rows(stream_webdataset([str(path) for path in shards.values()]), counts))
    assert [row["image_name"] for row in rows] == ["g0", "g1", "g2", "a1", "b1", "c1", "d0"]
    assert counts.by_shard == {
        str(shards["latin1"]): {"unreadable caption": 1},
        str(shards["bad_json"]): {"unreadable metadata": 1},
        str(shards["list_json"]): {"unreadable metadata": 1},
        str(shards["empty"]): {"unreadable shard": 1},
        str(shards["truncated"]): {"unreadable shard": 1},
    }
    assert "Skipping sample a0: unreadable caption: not UTF-8" in caplog.text
    assert "the shard is cut short after 1 sample(s); the rest of it is skipped" in caplog.text
    assert f"(shard {shards['truncated']})" in caplog.text


def test_training_on_hostile_shards_goes_on_and_reports_them(shapes, pretrained_parts, tmp_path):
    from conftest import training_arguments
    from modeling_vitgpt2.training.run import DataArguments, run_training

    shards = hostile_shards(tmp_path / "shards")
    model_args, _, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, tmp_path / "out", max_steps=3, per_device_train_batch_size=2)
    data_args = DataArguments(train_shards=",".join(str(path) for path in shards.values()),
                              val_shards=str(shards["good"]), max_eval_images=2, max_caption_length=24,
                              shuffle_buffer=0)
    run_training(model_args, data_args, peft_args, training_args)
    stream = json.loads((tmp_path / "out" / "training_summary.json").read_text())["stream"]
    assert stream["skipped_by_shard"][str(shards["empty"])] == {"unreadable shard": 1}
    assert stream["skipped_by_reason"]["unreadable metadata"] == 2


def test_a_shard_list_with_nothing_readable_is_refused(shapes, pretrained_parts, tmp_path):
    from conftest import training_arguments
    from modeling_vitgpt2.data.captions import CaptionDataError
    from modeling_vitgpt2.training.run import DataArguments, run_training

    shards = hostile_shards(tmp_path / "shards")
    model_args, _, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, tmp_path / "out", max_steps=3, per_device_train_batch_size=2)
    data_args = DataArguments(train_shards=f"{shards['empty']},{shards['empty']}", val_shards=str(shards["good"]),
                              max_eval_images=2, max_caption_length=24, shuffle_buffer=0)
    with pytest.raises(CaptionDataError, match="no readable sample.*2 unreadable shard"):
        run_training(model_args, data_args, peft_args, training_args)


def test_the_output_folder_lock_file_is_deleted_when_the_run_ends(tmp_path):
    from modeling_vitgpt2.training.run import hold_output_dir

    with hold_output_dir(tmp_path, 0):
        assert (tmp_path / ".train.lock.0").read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".train.lock.0").exists()
    with hold_output_dir(tmp_path, 0):  # and the folder can be taken again
        pass
