"""Errors in what the user gave (a flag, a file, a checkpoint): one line, not a traceback.

The plugin raises `UserError` (or a subclass) for a problem the user can fix from the message
alone; fairseq's commands (through fairseq_patches._patch_cli_entry) and the plugin's own
command-line tools end such an error with `prog: error: MESSAGE` on stderr and exit status 1.
SMLP_DEBUG=1 shows the full traceback instead.
"""
import os
import sys
from pathlib import Path
from typing import Optional


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


def own_cause(error: BaseException) -> Optional[BaseException]:
    """The plugin's ValueError behind fairseq's generic "Cannot load model parameters", if any."""
    cause = error.__context__
    generic = type(error) is Exception and str(error).startswith("Cannot load model parameters")
    return cause if generic and isinstance(cause, ValueError) else None


def with_own_cause(load, *args, **kwargs):
    """Run `load` (fairseq's Trainer.load_checkpoint), which turns any error while loading
    parameters into "Cannot load model parameters ... architectures match": the plugin's own
    cause (a dictionary mismatch, an expert layout) is raised instead; torch's errors stay as they are."""
    try:
        return load(*args, **kwargs)
    except Exception as e:
        cause = own_cause(e)
        if cause is not None:
            raise cause from None
        raise
