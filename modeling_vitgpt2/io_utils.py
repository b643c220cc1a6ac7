"""Small file helpers: atomic writes (no half-written outputs after a crash) and JSON reads with useful errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["InvalidJSONError", "preview_names", "read_json", "write_json_atomic", "write_text_atomic"]

PathLike = str | os.PathLike


class InvalidJSONError(ValueError):
    """A JSON file that cannot be parsed or does not have the expected shape; the message names the file."""


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Writes `text` to `path` so that readers see either the old file or the complete new one, never a part.

    The text goes to a temporary file in the same folder (so the final rename stays on one file system), is
    flushed and fsynced, and then replaces `path` with `os.replace`. Missing parent folders are created.
    Returns the path written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file name inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding=encoding, newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        # never leave the temporary file behind, whatever interrupted the write
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)
    return path


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


def preview_names(names, limit: int = 10) -> str:
    """The first `limit` names for an error message, and how many more there are ("none" when empty)."""
    names = list(names)
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
