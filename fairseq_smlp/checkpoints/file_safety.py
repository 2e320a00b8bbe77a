"""Checkpoint files that survive a crash, and clear errors on files that did not.

fairseq 0.12 writes the first checkpoint of a save atomically (a .tmp file, then a rename),
but then COPIES it onto the other names (checkpoint_last.pt, checkpoint_best.pt) in place:
a crash or `kill -9` during that copy leaves a truncated checkpoint_last.pt, the very file a
restart loads. fairseq_patches.py routes that copy through `atomic_copy` and every
checkpoint load through `load_or_explain`.
"""
import os
import shutil


class CorruptCheckpointError(RuntimeError):
    pass


def atomic_copy(src: str, dst: str) -> None:
    """Copy src to dst so that dst is at all times either its old or its new content."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_or_explain(load, path, *args, **kwargs):
    """Run `load(path, ...)`; a file that cannot be unpickled is reported by name."""
    try:
        return load(path, *args, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load raises RuntimeError, EOFError, UnpicklingError, zipfile errors...
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CorruptCheckpointError(
            f"checkpoint {path} ({size:,} bytes) is truncated or corrupted and cannot be loaded "
            f"({type(e).__name__}: {e}). If a run was killed while saving, the previous checkpoint "
            "(checkpoint_<epoch>_<updates>.pt / the last complete checkpoint_*.pt) is intact: "
            "pass it with --restore-file (training) or --path (evaluation)."
        ) from e
