"""Errors in what the user gave (a flag, a file, a checkpoint): one line, not a traceback.

The plugin raises `UserError` (or a subclass) for a problem the user can fix from the message
alone; fairseq's commands (through fairseq_patches._patch_cli_entry) and the plugin's own
command-line tools end such an error with `prog: error: MESSAGE` on stderr and exit status 1.
SMLP_DEBUG=1 shows the full traceback instead.
"""
import os
import sys
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""


def debugging() -> bool:
    """SMLP_DEBUG=1: the user asked for the stack of every error."""
    return os.environ.get("SMLP_DEBUG") == "1"


def one_line(error: BaseException) -> str:
    """The error's message on one line (a user error's message is the whole report)."""
    return " ".join(str(error).split())


def exit_with(error: BaseException, prog: str = None) -> None:
    """End the process with `prog: error: MESSAGE` (status 1), or re-raise under SMLP_DEBUG=1."""
    if debugging():
        raise error
    prog = prog or Path(sys.argv[0]).name
    sys.exit(f"{prog}: error: {one_line(error)}")
