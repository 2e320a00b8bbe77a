"""Bad text inputs: every class of unusable file, through every reader that takes text (the
shared reader fairseq_smlp/text_files.py, data_prep for each split, the paper corpus, the
zero-shot task files), is an error naming the file (and line / byte offset), raised before
anything is written; a failed build never leaves a half-built output."""
import pytest
from conftest import ptb_lines

from data_prep import common, paper_corpus, small_corpus
from fairseq_smlp import text_files
from fairseq_smlp.eval import zeroshot_tasks
from fairseq_smlp.text_files import TextFileError

GOOD = "the cat sat on the mat\nand the dog sat too\n"

# class -> (content, or None for a folder; expected message fragment)
BAD_FILES = {
    "empty": (b"", ": empty file"),
    "blank lines only": (b"\n  \n\t\n", ": empty file: only blank lines"),
    "not UTF-8 (Latin-1 byte)": (b"good line\nanother one\ncaf\xe9 au lait\n", ":3: not UTF-8: byte b'\\xe9' at byte offset 25"),
    "UTF-16": ("hello\n".encode("utf-16"), ":1: not UTF-8: byte b'\\xff' at byte offset 0"),
    "truncated multi-byte character": (b"ok\n\xe2\x82", ":2: not UTF-8: byte b'\\xe2' at byte offset 3"),
    "a folder": (None, ": not a file"),
}


def make(tmp_path, case, name="bad.txt"):
    content, _ = BAD_FILES[case]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


def good_splits(tmp_path):
    files = {}
    for split, lines in (("train", 200), ("valid", 40), ("test", 40)):
        files[split] = tmp_path / f"{split}.txt"
        files[split].write_text(ptb_lines(split, lines))
    return files


def read_with_scan(path, tmp_path):
    text_files.scan(path)


def read_with_read_text(path, tmp_path):
    text_files.read_text(path)


def read_as_task_file(path, tmp_path):
    zeroshot_tasks.load_multiple_choice(path)


def read_as_paper_input(path, tmp_path):
    paper_corpus.prepare_paper_corpus(tmp_path / "out", [f"books={path}"], valid_fraction=0.5, workers=1)


def reader_as_split(split):
    def read(path, tmp_path):
        files = good_splits(tmp_path)
        files[split] = path
        small_corpus.prepare_small_corpus(tmp_path / "out", workers=1, **files)

    read.__name__ = f"data_prep --{split}"
    return read


READERS = [read_with_scan, read_with_read_text, read_as_task_file, read_as_paper_input,
           *(reader_as_split(s) for s in ("train", "valid", "test"))]


# where a reader takes such a file for something else: a folder is a valid paper-corpus input
OTHER_MEANING = {("a folder", "read_as_paper_input"): (FileNotFoundError, "folder has no .txt files")}


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_unusable_text_is_named_before_anything_is_written(tmp_path, case, reader):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path = make(inputs, case)
    error, fragment = OTHER_MEANING.get((case, reader.__name__), (TextFileError, BAD_FILES[case][1]))
    with pytest.raises(error) as e:
        reader(path, inputs)
    message = str(e.value)
    assert str(path) in message and (str(path) + fragment if error is TextFileError else fragment) in message, message
    assert not (inputs / "out").exists()


def test_a_missing_file_is_named_by_every_reader(tmp_path):
    missing = tmp_path / "nope.txt"
    for reader in READERS:
        with pytest.raises((TextFileError, FileNotFoundError), match=r"nope\.txt"):
            reader(missing, tmp_path)
    assert not (tmp_path / "out").exists()


def test_the_flag_is_named_for_user_files(tmp_path):
    files = good_splits(tmp_path)
    files["valid"] = make(tmp_path, "empty")
    with pytest.raises(TextFileError, match=r"^--valid .*bad\.txt: empty file"):
        small_corpus.prepare_small_corpus(tmp_path / "out", workers=1, **files)


def test_lines_drop_a_leading_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    assert list(text_files.lines(path)) == ["hello", "world"]
    assert text_files.read_text(path) == "hello\nworld\n"
    assert text_files.scan(path).lines == 2


# ------------------------------------------------------------------ nothing half-built
def fail_in_binarize(monkeypatch, module):
    """binarize writes part of its output, then fails (a full disk, a kill)."""

    def broken(destdir, *args, **kwargs):
        destdir.mkdir(parents=True)
        (destdir / "train.bin").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(module, "binarize", broken)


def test_failed_build_keeps_the_previous_outputs(tmp_path, monkeypatch):
    files = good_splits(tmp_path)
    out = tmp_path / "out"
    data_bin = small_corpus.prepare_small_corpus(out, workers=1, **files)
    before = {p.name: p.read_bytes() for p in data_bin.iterdir() if p.suffix != ".log"}
    files["train"].write_text(ptb_lines("train", 300))  # changed input: a rebuild starts
    fail_in_binarize(monkeypatch, small_corpus)
    with pytest.raises(OSError, match="No space left"):
        small_corpus.prepare_small_corpus(out, workers=1, **files)
    assert {p.name: p.read_bytes() for p in data_bin.iterdir() if p.suffix != ".log"} == before
    assert not (out / common.STAGING).exists()
    monkeypatch.undo()  # the old outputs' stamp still names the old inputs: a rerun rebuilds
    small_corpus.prepare_small_corpus(out, workers=1, **files)
    assert (data_bin / "train.bin").read_bytes() != before["train.bin"]


def test_failed_first_build_leaves_nothing(tmp_path, monkeypatch):
    files = good_splits(tmp_path)
    fail_in_binarize(monkeypatch, small_corpus)
    with pytest.raises(OSError):
        small_corpus.prepare_small_corpus(tmp_path / "out", bpe="sentencepiece", vocab_size=100, workers=1, **files)
    assert not (tmp_path / "out").exists()
    fail_in_binarize(monkeypatch, paper_corpus)
    books = tmp_path / "books.txt"
    books.write_text(ptb_lines("train", 40).replace("\n", "\n\n"))  # 40 one-line documents
    with pytest.raises(OSError):
        paper_corpus.prepare_paper_corpus(tmp_path / "paper", [f"books={books}"], valid_fraction=0.1, workers=1)
    assert sorted(p.name for p in (tmp_path / "paper").iterdir()) == ["split.stamp.json", "train.txt", "valid.txt"]


def test_staging_left_by_a_killed_run_is_replaced(tmp_path):
    files = good_splits(tmp_path)
    stale = tmp_path / "out" / common.STAGING
    stale.mkdir(parents=True)
    (stale / "train.bin").write_bytes(b"half")
    data_bin = small_corpus.prepare_small_corpus(tmp_path / "out", workers=1, **files)
    assert not stale.exists() and (data_bin / "train.bin").stat().st_size > 4


def test_sentencepiece_takes_a_line_longer_than_its_default_limit(tmp_path):
    """sentencepiece silently skips lines over 4,192 bytes; a corpus of one such line then
    failed with a message about --vocab-size. Now every line is used."""
    import sentencepiece as spm

    words = [w for w in ptb_lines("train", 400).split() if w != "<unk>"]  # sentencepiece reads "<unk>" as its own
    long_line = " ".join(words[:3000])
    assert len(long_line.encode()) > 3 * common.SPM_MAX_SENTENCE_BYTES
    files = good_splits(tmp_path)
    files["train"].write_text(long_line + "\n")
    out = tmp_path / "out"
    small_corpus.prepare_small_corpus(out, bpe="sentencepiece", vocab_size=300, workers=1, **files)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert sp.get_piece_size() == 300 and sp.decode(sp.encode(long_line)) == long_line


def test_a_line_longer_than_sentencepiece_can_take_is_named(tmp_path, monkeypatch):
    files = good_splits(tmp_path)
    monkeypatch.setattr(small_corpus, "SPM_LIMIT_BYTES", 30)  # the real limit is 2 GiB
    with pytest.raises(TextFileError, match=r"--train .*train\.txt:\d+: line of \d+ bytes, longer than the 29 bytes"):
        small_corpus.prepare_small_corpus(tmp_path / "out", bpe="sentencepiece", vocab_size=100, workers=1, **files)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the paper corpus
def test_paper_corpus_refuses_a_split_that_leaves_a_side_empty(tmp_path):
    from fairseq_smlp.validation import FlagError

    books = tmp_path / "books.txt"
    books.write_text("doc one\n\ndoc two\n\ndoc three\n")
    with pytest.raises(FlagError, match="--valid-fraction 0.01 holds out 0 of 3 documents: the validation set would be empty"):
        paper_corpus.prepare_paper_corpus(tmp_path / "out", [f"books={books}"], valid_fraction=0.01, workers=1)
    with pytest.raises(FlagError, match="holds out 3 of 3 documents: the training set would be empty"):
        paper_corpus.prepare_paper_corpus(tmp_path / "out", [f"books={books}"], valid_fraction=0.9, workers=1)
    assert not (tmp_path / "out").exists()


def test_paper_corpus_names_a_bad_file_inside_a_folder(tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text\n\nmore text\n")
    (folder / "b.txt").write_bytes(b"fine\n\xff\n")
    (folder / "c.txt").write_text("")
    with pytest.raises(TextFileError, match=r"--input wikipedia= .*b\.txt:2: not UTF-8: byte b'\\xff' at byte offset 5"):
        paper_corpus.prepare_paper_corpus(tmp_path / "out", [f"wikipedia={folder}"], valid_fraction=0.5, workers=1)
    (folder / "b.txt").write_text("")
    (folder / "a.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="--input wikipedia: no documents in its 3 files"):
        paper_corpus.prepare_paper_corpus(tmp_path / "out", [f"wikipedia={folder}"], valid_fraction=0.5, workers=1)
    assert not (tmp_path / "out").exists()
