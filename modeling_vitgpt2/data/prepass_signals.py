"""How the processes of a multi-process feature-cache pre-pass (`EncoderFeatureCache.build_shards`) tell each other
that one of them failed or died, without a collective (a pre-pass may outlast torch.distributed's timeout) and
without needing disk space when it matters (a pre-pass usually fails for a full disk).

- `RunLock`: every process of a run holds a shared flock on `shards/.run-<run>.lock` while it is in the pre-pass, so
  the next job's cleanup (`delete_ended_runs`) deletes a run's records only once none of its processes is alive.
- `FailureSignal`: a process with shards to encode reserves its failure record before the work and holds an exclusive
  flock on it; a failure overwrites and renames it (no new blocks needed), and a process killed outright leaves it
  unlocked, which waiters read as its death (`FailureSignal.ended_silently`).

flock locks need no disk space and the kernel releases them however a process ends, SIGKILL included. Where the file
system has no working flock (some NFS mounts) the pre-pass stops at once, saying so: its per-shard locks need it too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..utils.errors import UserError
from ..utils.io import naming_a_full_disk, write_json_atomic

__all__ = ["FailureSignal", "RunLock", "delete_ended_runs"]

logger = logging.getLogger(__name__)


def _flock(descriptor: int, operation: int) -> bool | OSError:
    """Takes the flock `operation` on `descriptor`: True once taken, False where `LOCK_NB` met another's lock, the
    error where the file system has no working flock (ENOLCK, EOPNOTSUPP: some NFS mounts)."""
    try:
        fcntl.flock(descriptor, operation)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        return error


def _still_names(path: Path, descriptor: int) -> bool:
    """Whether `path` still names the file open as `descriptor` (not deleted, nor replaced by a new file)."""
    try:
        named, held = os.stat(path), os.fstat(descriptor)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _warn_uncreated(path: Path, problem: OSError) -> None:
    logger.warning(
        "Cannot create %s (%s): this run goes on without its run lock, so a job sharing the cache folder may delete "
        "its failure records while it runs.", path, problem)


def _no_working_locks(path: Path, problem: OSError) -> UserError:
    # The per-shard locks of the pre-pass need flock as well, so there is no going on without it.
    return UserError(
        f"cannot lock {path} ({problem}): the feature-cache pre-pass needs working file locks (flock) in its folder. "
        "Put --feature_cache_dir on a local disk or a mount with working locks (most NFS v4 mounts)")


class RunLock:
    """A shared flock on `shards/.run-<run>.lock`, held by every process of a pre-pass run while it is in
    `build_shards`: another job's cleanup (`delete_ended_runs`) deletes a run's records only once it can lock the
    file exclusively, so never those of a run still going. Locks need no disk space, and the kernel releases them
    when a process dies however it dies, SIGKILL included. The last process out deletes the file."""

    def __init__(self, folder: Path, run: str):
        self.path = self.path_of(folder, run)
        self.descriptor = None
        while self.descriptor is None:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as problem:  # a full disk with no room for an empty file
                _warn_uncreated(self.path, problem)
                return
            taken = _flock(descriptor, fcntl.LOCK_SH)
            if taken is not True:
                os.close(descriptor)
                raise _no_working_locks(self.path, taken)
            if _still_names(self.path, descriptor):
                self.descriptor = descriptor
            else:  # a cleanup deleted the file between the open and the lock: the lock holds nothing, so again
                os.close(descriptor)

    @staticmethod
    def path_of(folder: Path, run: str) -> Path:
        return folder / f".run-{run}.lock"

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None
            with _unless_running(self.path):
                pass


@contextmanager
def _unless_running(lock: Path) -> Iterator[bool]:
    """Yields whether the run whose `RunLock` is `lock` has ended: none of its processes holds it, or it has no lock
    file (a run of an older version). Where the file system cannot tell (no working flock) it counts as ended, as
    before these locks. An ended run's lock file is deleted after the body, under the exclusive lock, so that a
    process that opened it meanwhile finds it gone once it has its lock, and makes another (see `RunLock`)."""
    try:
        descriptor = os.open(lock, os.O_RDWR)  # for writing too: NFS emulates an exclusive flock by a write lock
    except FileNotFoundError:
        yield True
        return
    try:
        taken = _flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield taken is not False
        if taken is not False and _still_names(lock, descriptor):
            lock.unlink(missing_ok=True)
    finally:
        os.close(descriptor)


def delete_ended_runs(folder: Path, run: str) -> None:
    """Deletes the failure records and reservations of other runs that have ended (failed, or killed outright), and
    their lock files; those of a run still going, such as another job sharing this folder, are kept: its processes
    may still be waiting on them."""
    runs: dict[str, list[Path]] = {}
    for kind in FailureSignal.KINDS:
        for marker in folder.glob(f".{kind}-*.json"):
            name = marker.name.removeprefix(f".{kind}-").removesuffix(".json")
            runs.setdefault(name.rsplit("-", 1)[0], []).append(marker)
    for lock in folder.glob(".run-*.lock"):
        runs.setdefault(lock.name.removeprefix(".run-").removesuffix(".lock"), [])
    runs.pop(run, None)
    for other, markers in runs.items():
        with _unless_running(RunLock.path_of(folder, other)) as ended:
            if ended:
                for marker in markers:
                    marker.unlink(missing_ok=True)


class FailureSignal:
    """How one process of a multi-process pre-pass tells the others, waiting for its shards, that it failed, without
    needing disk space then: its failure usually is a full disk. Its record is written before the work, as a
    placeholder of `BYTES` bytes (`.prepass-<run>-<process>.json`); a failure overwrites those bytes in place (no new
    blocks) and renames the file to `.failed-<run>-<process>.json`, the name the others watch for. A rename needs no
    data blocks, so it signals even where the overwrite fails too (a copy-on-write file system needs new blocks for
    one): the others then stop naming the process but not its error. Without a reservation the record is written
    anew, which needs room.

    A process killed outright writes nothing, so the reservation is also flocked (exclusively) from its creation for
    the process's life: the kernel releases the lock however the process ends. A waiter that can lock a reservation
    still under its name knows its process has ended without renaming it (`ended_silently`); on success a process
    deletes its reservation while still holding the lock, so a finished process is never taken for a dead one. The
    lock stays with the file through the rename, and waiters look for failure records first."""

    KINDS = ("prepass", "failed")
    BYTES = 4096

    def __init__(self, folder: Path, run: str, process: int, reserve: bool):
        self.process = process
        self.reserved, self.failed = self.paths(folder, run, process)
        self.descriptor: int | None = None  # the reservation, open and locked until `release`
        self.failing = False
        if not reserve:
            self.reserved = None
            return
        with naming_a_full_disk(self.reserved, self.BYTES):
            descriptor = os.open(self.reserved, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                taken = _flock(descriptor, fcntl.LOCK_EX)
                if taken is not True:
                    raise _no_working_locks(self.reserved, taken)
                if os.write(descriptor, self._padded(self._record(None, None))) != self.BYTES:
                    raise OSError(errno.ENOSPC, "No space left on device (a short write)", str(self.reserved))
                os.fsync(descriptor)  # where a file system that allocates late finds the disk full
            except BaseException:
                os.close(descriptor)
                raise
        self.descriptor = descriptor

    @staticmethod
    def paths(folder: Path, run: str, process: int) -> tuple[Path, Path]:
        """The reservation and the failure record of `process`."""
        return folder / f".prepass-{run}-{process}.json", folder / f".failed-{run}-{process}.json"

    def _record(self, shard: str | None, error: str | None) -> dict[str, Any]:
        return {"process": self.process, "shard": shard, "error": error}

    @classmethod
    def _padded(cls, record: dict[str, Any]) -> bytes:
        """`record` as JSON padded with spaces to exactly `BYTES` bytes, its longest strings cut to fit."""
        record = dict(record)
        while len(text := json.dumps(record, ensure_ascii=False).encode()) >= cls.BYTES:
            longest = max((key for key, value in record.items() if isinstance(value, str)),
                          key=lambda key: len(record[key]))
            record[longest] = record[longest][: len(record[longest]) // 2] + " [...]"
        return text.ljust(cls.BYTES - 1) + b"\n"

    def __enter__(self) -> FailureSignal:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def fail(self, shard: str | None, error: str) -> None:
        self.failing = True
        record = self._record(shard, error)
        if self.descriptor is not None:
            try:
                # Through the locked descriptor, not a new one: where flock is emulated by POSIX locks (NFS), closing
                # any descriptor of the file drops the process's lock. No truncation: that would hand back the
                # reserved blocks the overwrite is to reuse.
                os.lseek(self.descriptor, 0, os.SEEK_SET)
                if os.write(self.descriptor, self._padded(record)) != self.BYTES:
                    raise OSError(errno.ENOSPC, "No space left on device (a short write)", str(self.reserved))
                os.fsync(self.descriptor)
            except OSError as problem:
                logger.error("Could not write this process's error into %s (%s); the other processes stop without "
                             "it, and this log is where it is.", self.reserved, problem)
            try:
                os.replace(self.reserved, self.failed)
                return
            except OSError as problem:  # the reservation deleted by hand, or no room for the new name
                logger.error("Could not rename %s to %s (%s); writing the failure record anew.", self.reserved,
                             self.failed, problem)
        try:
            write_json_atomic(self.failed, record)
        except OSError as problem:
            if self.reserved is not None and self.reserved.exists():
                logger.error("Could not tell the other processes that this one failed (%s). They stop once it "
                             "exits, finding its reservation %s unlocked, with this error if it could be written "
                             "there; else this log is where it is.", problem, self.reserved)
            else:
                logger.error("Could not tell the other processes that this one failed (%s): stop them by hand if "
                             "they wait for its shards, as they poll for them with no timeout.", problem)

    def release(self) -> None:
        """Ends the reservation: deleted while still locked after a success, so that a waiter taking the lock next
        finds the name gone (a finished process, not a dead one); kept after a failure, where a reservation still
        under its name is the only sign the others get (the failure record could be neither renamed nor written)."""
        if self.descriptor is None:
            return
        if not self.failing:
            self.reserved.unlink(missing_ok=True)
        os.close(self.descriptor)
        self.descriptor = None

    @classmethod
    def ended_silently(cls, reserved: Path) -> str | None:
        """What to say of the process whose reservation is `reserved` if it ended without a failure record: killed
        outright, or unable to write one. None while it runs (it holds the lock), once it has finished (the
        reservation gone), and where that cannot be told (no working flock, for it or for this process)."""
        try:
            descriptor = os.open(reserved, os.O_RDONLY)
        except OSError:
            return None
        try:
            if _flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB) is not True or not _still_names(reserved, descriptor):
                return None
            try:
                record = json.loads(os.pread(descriptor, cls.BYTES, 0))
            except (OSError, ValueError):
                record = None  # cut short: the reservation was never completed, so its process stopped there
        finally:
            os.close(descriptor)
        if not isinstance(record, dict):
            record = {}
        if record.get("error") is not None:  # written, but not renamed
            return cls._described(record)
        process = reserved.stem.rsplit("-", 1)[-1]
        return (f"process {process} stopped during the pre-pass without recording an error (killed? out of memory? "
                "no room for its record?): its log may say why")

    @classmethod
    def describe(cls, failed: Path) -> str:
        """What the failure record `failed` says: the process, the shard and the error, as far as it holds them."""
        try:
            record = json.loads(failed.read_bytes())
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict) or record.get("error") is None:
            process = failed.stem.rsplit("-", 1)[-1]
            return (f"process {process} failed in the pre-pass, and its error could not be recorded in {failed} "
                    "(a full disk?): the log of that process has it")
        return cls._described(record)

    @staticmethod
    def _described(record: dict[str, Any]) -> str:
        return f"process {record.get('process')} failed while encoding {record.get('shard')}: {record['error']}"
