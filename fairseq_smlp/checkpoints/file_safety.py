"""Checkpoint files that survive a crash, and clear errors on files that did not.

fairseq 0.12 writes the first checkpoint of a save atomically (a .tmp file, then a rename),
but then COPIES it onto the other names (checkpoint_last.pt, checkpoint_best.pt) in place:
a crash or `kill -9` during that copy leaves a truncated checkpoint_last.pt, the very file a
restart loads. fairseq_patches.py routes that copy through `copy_checkpoint`; every checkpoint
load goes through `load_or_explain` (via safe_load.load_checkpoint_file), which finds a
damaged file from its zip structure, never by unpickling it.

Every such write goes through a temporary file next to its target (fairseq's
`checkpoint_X.pt.tmp`, atomic_write's `checkpoint_last.pt.tmp-<random>`, reshard's `OUT.pt.tmp`);
a kill or a full disk leaves it behind, so `remove_stale_temporaries` deletes exactly those
names when the next run starts in that directory.
"""
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)
# the temporary names of the writes above, nothing else (atomic_write: 8 characters from tempfile.mkstemp)
TEMPORARY = re.compile(r".+\.pt\.tmp(-\d+|-[a-z0-9_]{8})?")


class CorruptCheckpointError(UserError, RuntimeError):
    """A truncated or damaged checkpoint file."""


def atomic_copy(src: str, dst: str) -> None:
    """Copy src to dst so that dst is at all times either its old or its new content."""
    from ..atomic_write import atomic_output

    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def copy_checkpoint(src: str, dst: str, overwrite: bool, remote_copy) -> bool:
    """fairseq's PathManager.copy for checkpoint files, atomic (`atomic_copy`): False when dst
    exists and may not be overwritten. Remote (iopath) paths keep `remote_copy`, fairseq's own."""
    if "://" in src or "://" in dst:
        return remote_copy(src, dst, overwrite=overwrite)
    if os.path.exists(dst) and not overwrite:
        return False
    atomic_copy(src, dst)
    return True


def save_creating_dir(save, filename: str, *args):
    """Run `save(filename, *args)` (fairseq's Trainer.save_checkpoint) after creating the folder:
    only rank 0 created --save-dir. A failed crash.pt save is logged and returns None: fairseq
    saves it while handling the error that stopped training, which the save's own error replaced."""
    try:
        os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)
        return save(filename, *args)
    except Exception as e:
        if os.path.basename(filename) != "crash.pt":
            raise
        logger.error(f"could not save {filename} ({type(e).__name__}: {e}); the error that stopped training follows")
        return None


def remove_stale_temporaries(directory: str) -> list:
    """Delete the temporary files an interrupted checkpoint write left in `directory` (not
    recursive; only names matching TEMPORARY); returns their paths."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if TEMPORARY.fullmatch(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
            logger.warning(
                f"removed {path}: the temporary file of a checkpoint write that was interrupted (kill, full disk)"
            )
    return removed


def _legacy_magic() -> bytes:
    """The first bytes of a checkpoint in torch's pre-1.6 (non-zip) format."""
    import pickle

    import torch

    return pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def intact(path: str) -> bool:
    """Whether the file is structurally a whole torch checkpoint, found without unpickling it:
    a zip archive whose entries pass their CRC and that holds a data.pkl, or a legacy file
    that starts with torch's magic number."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                return z.testzip() is None and any(n.endswith("data.pkl") for n in names)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError):
            return False
    try:
        with open(path, "rb") as f:
            magic = _legacy_magic()
            return f.read(len(magic)) == magic
    except OSError:
        return False


def load_or_explain(load, path, *args, **kwargs):
    """Run `load(path, ...)`; a file whose structure is broken (found without unpickling it)
    is reported by name. Other errors (fairseq upgrading the state, a plugin check, a refused
    global) are not corruption and pass through as they are."""
    try:
        return load(path, *args, **kwargs)
    except (FileNotFoundError, UserError):
        raise  # a refused global (safe_load), or a file already explained one call further in
    except Exception as e:  # torch.load raises RuntimeError, EOFError, UnpicklingError, zipfile errors...
        if intact(path) and not isinstance(e, EOFError):
            raise
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CorruptCheckpointError(
            f"checkpoint {path} ({size:,} bytes) is truncated or corrupted and cannot be loaded "
            f"({type(e).__name__}: {e}). If a run was killed while saving, the previous checkpoint "
            "(checkpoint_<epoch>_<updates>.pt / the last complete checkpoint_*.pt) is intact: "
            "pass it with --restore-file (training) or --path (evaluation)."
        ) from e


def verify_save_dir(save_dir: str) -> None:
    """fairseq creates --save-dir at start to test it, so a run that then fails on a bad flag
    leaves an empty directory: test the nearest existing parent instead (the directory is
    created at the first save)."""
    path = Path(save_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OSError(f"--save-dir {save_dir}: cannot write checkpoints there ({existing} is not a writable directory)")


def ready_save_dir(save_dir: str) -> None:
    """What fairseq's verify_checkpoint_directory does at start instead of creating --save-dir:
    test it (`verify_save_dir`) and remove the temporaries earlier kills left there."""
    verify_save_dir(save_dir)
    remove_stale_temporaries(save_dir)
