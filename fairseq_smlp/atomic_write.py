"""Writes that leave a file either as it was or complete, never half-written.

Every results file, predictions file, run.json, rehearsal table and checkpoint the project
writes goes through here: the content goes to a temporary file in the target's own folder
(a unique name from tempfile.mkstemp, so two writers never share it), is flushed and fsynced,
then `os.replace`d onto the target, and the folder is fsynced so that the rename survives a
crash. On any error the temporary file is removed and the target is untouched.

The temporary name is `<target name>.tmp-<random>`; a kill -9 between creating and renaming
it is the only way one is left behind (checkpoints/file_safety.remove_stale_temporaries
removes those of checkpoints).
"""
import contextlib
import os
import tempfile


def _current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask is racy)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: str) -> int:
    """The permissions the target would get from a plain open(): its current ones, or the umask's."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


def fsync_folder(folder: str) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    """Push the temporary file's bytes to the disk before it takes the target's name."""
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _remove_quietly(path: str) -> None:
    """Remove a temporary file that may already be gone."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to `path`; when the block ends without error the file
    written there replaces `path` in one rename, otherwise it is removed.

    The writer in the block opens the yielded path itself (torch.save, open(..., "w"), a
    copy); a block that writes nothing replaces `path` with an empty file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.tmp-", dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, _mode_for(path))
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_folder(folder)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old content or the new, never a part."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` so that a crash leaves the old content or the new, never a part."""
    atomic_write_bytes(path, text.encode(encoding))
