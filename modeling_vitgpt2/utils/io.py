"""The package's one place for files: atomic writes (no half-written output after a crash, usual permissions), JSON
reads with useful errors, checks that an output can be written before long work starts, and content digests."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = [
    "DiskFullError",
    "InvalidJSONError",
    "naming_a_full_disk",
    "atomic_path",
    "check_not_an_input",
    "check_safetensors",
    "check_writable",
    "file_digest",
    "leftover_temporaries",
    "preview_names",
    "read_json",
    "write_json_atomic",
    "write_text_atomic",
]

PathLike = str | os.PathLike


class InvalidJSONError(ValueError):
    """A JSON file that cannot be parsed or does not have the expected shape; the message names the file."""


class DiskFullError(UserError, OSError):
    """Writing a file failed for lack of room: names the file system, the file and how many bytes it needs.

    An `OSError` with errno ENOSPC (as the OS reports it), and a `UserError`: the fix is room on the disk or another
    output folder, and a rerun then resumes (checkpoints are complete before they count)."""

    def __init__(self, path: PathLike, needed_bytes: int | None = None):
        path = Path(path)
        self.path, self.needed_bytes, self.mount = path, needed_bytes, _mount_point(path)
        self.free_bytes = _free_bytes(self.mount)
        needed = "" if needed_bytes is None else f", about {needed_bytes:,} bytes needed"
        free = "" if self.free_bytes is None else f" ({self.free_bytes:,} bytes free)"
        super().__init__(
            errno.ENOSPC,
            f"no space left on {self.mount} writing {path}{needed}{free}: free some space there (or choose an output "
            "folder on another disk) and run the same command again",
        )

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # rebuilt from its fields when it crosses to another process
        return type(self), (self.path, self.needed_bytes)


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    return next((folder for folder in (path, *path.parents) if folder.exists() and os.path.ismount(folder)), Path("/"))


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


# What torch's zip writer (torch.save, hence Trainer's optimizer and scheduler files) raises when the disk fills: it
# checks how far each write got and reports a short write as an internal assertion, without the OS's errno.
_SHORT_WRITE_MARKERS = ("unexpected pos", "file write failed", "No space left on device")


def _is_disk_full(error: BaseException, path: Path, needed_bytes: int | None) -> bool:
    if isinstance(error, DiskFullError):
        return False  # already says so
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, RuntimeError) and any(marker in str(error) for marker in _SHORT_WRITE_MARKERS):
        # A short write is a full disk (or quota) unless the room is plainly there.
        free = _free_bytes(_mount_point(path))
        return free is None or free < (needed_bytes or 0) + 2**20
    return False


@contextlib.contextmanager
def naming_a_full_disk(path: PathLike, needed_bytes: int | None = None) -> Iterator[None]:
    """Turns a full disk met while writing under `path` (the OS's ENOSPC, or torch's short-write assertion
    `[enforce fail at inline_container.cc] . unexpected pos ...`) into a `DiskFullError` that names the file system,
    `path` and `needed_bytes` (an estimate of what the writes need, when the caller knows one)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not _is_disk_full(error, Path(path), needed_bytes):
            raise
        raise DiskFullError(path, needed_bytes) from error


def _current_umask() -> int:
    try:  # Linux reports it without changing it; elsewhere os.umask can only be read by setting it back
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: PathLike) -> Path:
    """Fails now, naming the path, when a file could not be written at `path` later: the path is a folder, a part of
    its parent path is a file, or the nearest existing folder is not writable. A symbolic link is checked where the
    write goes, at its target (see `atomic_path`). Creates nothing. Call it before long work, so that a mistyped
    output path costs seconds rather than the whole run. Returns `path` as given."""
    path = Path(path)
    target = _write_target(path)
    shown = path if target == path else f"{path} (a link to {target})"
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {shown}: it is a folder; give a file name inside it")
    existing = next(parent for parent in target.parents if parent.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {shown}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {shown}: the folder {existing} is not writable")
    return path


def check_not_an_input(outputs: Iterable[tuple[str, PathLike]], inputs: Iterable[tuple[str, Any]]) -> None:
    """Fails, naming both files and options, when one of a command's `outputs` is one of its `inputs` by any path (a
    relative path, a symbolic link, a hard link): writing it would replace a file the user still needs, such as the
    references a score was computed from. Both are `(option, path)` pairs, the option as the user gave it
    ("--output"); inputs that are not paths (None, predictions given as a dict) or missing are skipped. Call it with
    the other checks, before any work."""
    given = {}
    for option, path in inputs:
        identity = _file_identity(path)
        if identity is not None:
            given.setdefault(identity, (option, path))
    for option, path in outputs:
        identity = _file_identity(path)
        if identity in given:  # an output that does not exist yet is no input
            input_option, input_path = given[identity]
            raise ValueError(f"writing {path} ({option}) would overwrite the input {input_path} ({input_option}); "
                             f"choose another {option}")


def _file_identity(path: Any) -> tuple[int, int] | None:
    """What `os.path.samefile` compares (it follows links, so a link and its target are one file), or None."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # missing, or a name the OS cannot take
        return None
    return status.st_dev, status.st_ino


def _write_target(path: Path) -> Path:
    """The file a write to `path` replaces. A symbolic link is followed to its target, so that the link (say
    `latest.json -> runs/7/scores.json`) keeps pointing at the new content instead of being replaced by a copy. A
    dangling link's target is created, as `open(path, "w")` and a shell's `>` create it: the link names the file the
    user wants written (often made before the run that fills it)."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops where the links go round in a circle
        raise OSError(f"cannot write {path}: it is a loop of symbolic links ({target}); fix or remove the link")
    return target


# File names are limited to 255 bytes on the usual file systems (143 on eCryptfs), and the temporary name adds
# about 25 to the final name; a longer stem is cut, with a digest of the whole name so that it stays that file's own.
_TEMPORARY_STEM_BYTES = 100


def _temporary_stem(path: Path) -> str:
    stem = os.fsencode(path.stem)
    if len(stem) <= _TEMPORARY_STEM_BYTES:
        return path.stem
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:12]
    return stem[:_TEMPORARY_STEM_BYTES - 20].decode("utf-8", "ignore") + "~" + digest  # "ignore": a cut character


def _new_file_mode(path: Path) -> int:
    """An existing file's permission bits (a private 0600 file stays private; set-id bits are not copied onto new
    content), else the usual 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; on success it is fsynced and renamed to `path`, so readers
    see either the old file or the complete new one, never a part. On any error the temporary file is removed.

    A new file gets the usual permissions (0666 less the umask), as `open` would give it: outputs are meant to be
    shared, unlike `tempfile.mkstemp`'s 0600; a file written again keeps its permissions. A symbolic link is written
    through: its target gets the new content and the link stays (a dangling link's target is created). For libraries
    that write to a path (`savefig`, `np.savez`), keep the suffix: the temporary name ends in the final name's suffix.
    """
    check_writable(path)
    path = _write_target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{_temporary_stem(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
    try:
        with naming_a_full_disk(path):
            yield temporary
            descriptor = os.open(temporary, os.O_RDONLY)
            try:
                os.fchmod(descriptor, _new_file_mode(path))
                os.fsync(descriptor)  # where a file system that allocates late reports the disk full
            finally:
                os.close(descriptor)
            os.replace(temporary, path)
    except BaseException:
        # never leave the temporary file behind, whatever interrupted the write
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def leftover_temporaries(path: PathLike) -> list[Path]:
    """The temporary files of atomic writes to `path` that were killed before they finished (SIGKILL or a power loss
    leaves them: no handler runs). Delete them only while nothing else can be writing `path`."""
    path = _write_target(Path(path))
    stem = _temporary_stem(path)
    # The glob alone would also find another file's: ".a.*.tmp.json" matches those of a.b.json.
    name = re.compile(re.escape(f".{stem}.") + r"\d+\.[0-9a-f]{8}" + re.escape(f".tmp{path.suffix}"))
    return sorted(found for found in path.parent.glob(f".{glob.escape(stem)}.*") if name.fullmatch(found.name))


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Writes `text` to `path` atomically (see `atomic_path`); missing parent folders are created. Returns the path."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding=encoding, newline="") as file:
            file.write(text)
    return Path(path)


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable where the OS allows opening folders (POSIX); elsewhere it is skipped."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_json_atomic(path: PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Serialises `obj` as UTF-8 JSON (non-ASCII kept readable) and writes it atomically to `path`.

    The object is serialised before anything touches the disk, so an unserialisable value raises without
    creating or truncating the file.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text)


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Reads a JSON file; errors name the file and, for malformed JSON, the line and column of the problem.

    Args:
        path: the file to read.
        what: what the file is, for messages ("id2label file", "predictions file", ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark left by some editors
    except UnicodeDecodeError as error:
        raise InvalidJSONError(f"{what} {path} is not UTF-8 text ({error}); re-save it as UTF-8") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidJSONError(
            f"{what} {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}. "
            "Fix the file (a trailing comma or a missing quote is the usual cause)."
        ) from error


def file_digest(path: PathLike) -> str:
    """SHA-256 of a file's bytes, streamed (SHA-256 runs at GB/s on CPUs with SHA extensions)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_safetensors(path: PathLike) -> None:
    """Raises ValueError naming `path` unless it is a complete safetensors file: an 8-byte header length, a JSON
    header, and every tensor's bytes inside the file. Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    advice = "re-download it, or save the model again"
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little") if size >= 8 else None
        if length is None or length > min(size - 8, 100_000_000):
            raise ValueError(f"{path} is not a safetensors file (a pickle or another format?) or is cut short; {advice}")
        try:
            header = json.loads(file.read(length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path} has a damaged safetensors header ({error}); {advice}") from None
    if 8 + length + end > size:
        raise ValueError(f"{path} is truncated: {size:,} bytes where its header needs {8 + length + end:,}; {advice}")


def preview_names(names, limit: int = 10) -> str:
    """The first `limit` names for an error message, and how many more there are ("none" when empty)."""
    names = list(names)
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
