"""Runs `train.py` many times quickly, and kills it at exact points, for the fault-injection tests.

`python tests/fault_runner.py` imports the package (and torch, transformers, ...) once, then reads one JSON job per
line on stdin: `{"argv": [...], "log": path, "fault": {"at": point, "nth": n} | null}`. For each job it forks a child
that runs `train.main()` with that argv (so a run costs no interpreter start or imports) and answers two lines on
stdout: `{"pid": ...}` at once, so that the caller can SIGKILL the child whenever it likes, and
`{"pid": ..., "status": ...}` when the child has ended (a negative status is the signal that ended it). With
`"progress": path` in a job, the child appends one line to that file as it starts each optimizer step, so that the
caller can time a kill from the run's own pace.

A fault makes the child SIGKILL itself, the way `kill -9` would, at the `nth` time (1-based) it reaches `at`:

- `save_start`: entering Trainer's checkpoint save;
- `after_weights`, `after_optimizer`, `after_rng`, `after_trainer_state`: right after Trainer wrote that part of a
  checkpoint;
- `after_trainer_rotation`: right after Trainer's own rotation call returned (where the stock Trainer has already
  deleted older checkpoints while the new one is not yet marked complete);
- `mid_manifest`: the manifest's temporary file is written and fsynced, not yet renamed into place;
- `before_rotation`: the checkpoint is complete, older ones not yet deleted;
- `mid_rotation`: an older checkpoint is being deleted: its manifest and one file are gone, the rest is not;
- `final_save`: the end-of-training save of the model.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402  (the script users run; importing it imports the whole package)
from modeling_vitgpt2.training import checkpoints  # noqa: E402
from modeling_vitgpt2.training import run as training_run  # noqa: E402
from modeling_vitgpt2.training import trainer as caption_trainer  # noqa: E402
from modeling_vitgpt2.utils import io as io_utils


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_fault(at: str, nth: int) -> None:
    import shutil

    import transformers.trainer as trainer_module
    from transformers import Trainer, TrainerState

    calls = {"count": 0}

    def reached() -> None:
        calls["count"] += 1
        if calls["count"] == nth:
            _die()

    def after(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            reached()
            return result

        setattr(owner, name, wrapper)

    def before(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            reached()
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    if at == "save_start":
        before(Trainer, "_save_checkpoint")
    elif at == "after_weights":
        after(Trainer, "save_model")
    elif at == "after_optimizer":
        after(Trainer, "_save_optimizer_and_scheduler")
    elif at == "after_rng":
        after(Trainer, "_save_rng_state")
    elif at == "after_trainer_state":
        after(TrainerState, "save_to_json")
    elif at == "after_trainer_rotation":
        after(trainer_module, "rotate_checkpoints")
    elif at == "mid_manifest":
        original_replace = os.replace

        def replace(source, destination, *args, **kwargs):
            if Path(destination).name == checkpoints.CHECKPOINT_COMPLETE:
                reached()
            return original_replace(source, destination, *args, **kwargs)

        io_utils.os.replace = replace  # io_utils calls os.replace through its module global
    elif at == "before_rotation":
        before(caption_trainer, "rotate_complete_checkpoints")  # called from CaptionTrainer
    elif at == "mid_rotation":
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.startswith("checkpoint-") and not (Path(path) / checkpoints.CHECKPOINT_COMPLETE).exists():
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                if files:
                    files[0].unlink()
                reached()
            return original_rmtree(path, *args, **kwargs)

        checkpoints.shutil.rmtree = rmtree
    elif at == "final_save":
        before(training_run, "save_trained_model")
    else:
        raise ValueError(f"unknown fault point {at!r}")


def _report_steps(progress: str) -> None:
    from transformers import Trainer

    training_step = Trainer.training_step

    def reporting(self, *args, **kwargs):
        with open(progress, "a") as file:
            file.write(f"{self.state.global_step + 1}\n")
        return training_step(self, *args, **kwargs)

    Trainer.training_step = reporting


def _run_child(job: dict) -> None:
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if job.get("progress"):
        _report_steps(job["progress"])
    if job.get("fault"):
        _install_fault(job["fault"]["at"], job["fault"]["nth"])
    sys.argv = ["train.py", *job["argv"]]
    status = 0
    try:
        status = train.main()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(job)
        print(json.dumps({"pid": pid}), flush=True)
        _, wait_status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(wait_status)}), flush=True)


if __name__ == "__main__":
    main()
