"""Reading text inputs: one reader for corpora (data_prep) and task files (zero-shot eval).

A file that is missing, not a regular file, empty (or blank lines only) or not UTF-8 is a
TextFileError naming the file, and the line and byte offset of the first bad byte:

    --train data/train.txt:17: not UTF-8: byte b'\\xff' at byte offset 1234 (invalid start byte)

`scan` streams a file once in constant memory (corpora can be hundreds of GB) and returns
what later steps need to know (line count, the longest line); `lines` yields the decoded
lines of a checked file for streaming readers; `read_text` returns a small file whole.
Lines end at b"\\n" only, as fairseq-preprocess and sentencepiece read them.
"""
import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

BOM = codecs.BOM_UTF8


class TextFileError(ValueError):
    """An unusable text file: the message starts with '[flag ]file:line:' ('file:' when the
    problem is the whole file)."""

    def __init__(self, path, lineno: Optional[int], message: str, flag: Optional[str] = None):
        where = f"{path}:{lineno}" if lineno else f"{path}"
        super().__init__(f"{flag + ' ' if flag else ''}{where}: {message}")
        self.path, self.lineno, self.detail = Path(path), lineno, message


@dataclass
class TextStats:
    lines: int  # lines, blank ones included
    nonblank: int  # lines with something other than whitespace
    longest: int  # bytes of the longest line (without its newline)
    longest_line: int  # its line number (1-based)


def check_exists(path, flag: Optional[str] = None) -> Path:
    path = Path(path)
    if not path.exists():
        raise TextFileError(path, None, "no such file", flag)
    if not path.is_file():
        raise TextFileError(path, None, "not a file", flag)
    return path


def _decode(raw: bytes, path, lineno: int, line_start: int, flag) -> str:
    """One line's bytes -> str; a TextFileError with the byte offset in the file if not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = line_start + e.start
        raise TextFileError(path, lineno, f"not UTF-8: byte {raw[e.start:e.start + 1]!r} at byte offset "
                                          f"{offset} ({e.reason})", flag) from None


def _raw_lines(path) -> Iterator[tuple]:
    """(line number, byte offset of the line, its bytes without b'\\n'), streamed."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, offset, raw.rstrip(b"\n")
            offset += len(raw)


def lines(path, flag: Optional[str] = None) -> Iterator[str]:
    """The file's lines, decoded strictly (no newline; a leading byte-order mark dropped)."""
    path = check_exists(path, flag)
    for lineno, start, raw in _raw_lines(path):
        if lineno == 1 and raw.startswith(BOM):
            raw, start = raw[len(BOM):], start + len(BOM)
        yield _decode(raw, path, lineno, start, flag)


def scan(path, flag: Optional[str] = None, max_line_bytes: Optional[int] = None, what: str = "text") -> TextStats:
    """Check a text file without keeping it in memory: it exists, is UTF-8, has a non-blank
    line, and (with max_line_bytes) no line longer than that. `what` names the content in
    the 'empty' error (e.g. "examples")."""
    stats = TextStats(0, 0, 0, 0)
    for stats.lines, text in enumerate(lines(path, flag), start=1):
        size = len(text.encode("utf-8"))
        if size > stats.longest:
            stats.longest, stats.longest_line = size, stats.lines
        if max_line_bytes is not None and size > max_line_bytes:
            raise TextFileError(path, stats.lines, f"line of {size:,} bytes, longer than the {max_line_bytes:,} "
                                                   "bytes allowed here", flag)
        stats.nonblank += bool(text.strip())
    if stats.nonblank == 0:
        raise TextFileError(path, None, _empty(stats.lines == 0, what), flag)
    return stats


def _empty(no_bytes: bool, what: str) -> str:
    return f"empty file: no {what}" if no_bytes else f"empty file: only blank lines, no {what}"


def read_text(path, flag: Optional[str] = None, what: str = "text") -> str:
    """A small file, whole, after the checks of `scan` (a leading byte-order mark dropped)."""
    path = check_exists(path, flag)
    data = path.read_bytes()
    start = len(BOM) if data.startswith(BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        lineno = data[:offset].count(b"\n") + 1
        raise TextFileError(path, lineno, f"not UTF-8: byte {data[offset:offset + 1]!r} at byte offset "
                                          f"{offset} ({e.reason})", flag) from None
    if not text.strip():
        raise TextFileError(path, None, _empty(not text, what), flag)
    return text
