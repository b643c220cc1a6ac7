"""The one way every command reports a mistake its user can fix: one line on stderr naming the file or field and
what to do next, and exit status 2 (argparse's status for bad arguments; a bad input file is the same kind of
mistake). A traceback would bury that line; `VITGPT2_TRACEBACK=1` shows it anyway. Anything else (a bug, an
interrupted run) propagates with its traceback as usual."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["USAGE_ERROR", "USER_ERRORS", "UserError", "run_command"]

USAGE_ERROR = 2


class UserError(Exception):
    """A failure that is the user's to fix and is not a bad file or value: a busy output folder, a refused Hub push."""


# Expected input mistakes raise these with a message that names the file or field: missing or unreadable files
# (OSError), malformed files and values (ValueError, including ImageLoadError, InvalidJSONError, StudyConfigError).
USER_ERRORS = (OSError, ValueError, UserError)


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Runs a command's work and returns its exit status: what `command` returns (None is success), or 2 after
    printing `prog: error: message` when it raised a user error."""
    try:
        status = command()
    except USER_ERRORS as error:
        if os.environ.get("VITGPT2_TRACEBACK") == "1":
            raise
        # Libraries' own messages (transformers', the Hub's) can span lines: the convention is one line.
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    return 0 if status is None else status
