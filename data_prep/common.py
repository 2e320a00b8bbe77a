"""Shared steps of the data-preparation scripts.

    train_sentencepiece  text file -> spm.model / spm.vocab (BPE, deterministic)
    encode_file          text file -> one line of space-separated pieces (or GPT-2 ids) per line
    binarize             fairseq-preprocess --only-source -> data-bin/{dict.txt,train,valid,test}.{bin,idx}
    Stamp                a small json file that lets a rerun skip work whose inputs did not change
    staging / publish    build every output in OUT/.partial, move it into OUT only when all succeeded

The heavy lifting is done by sentencepiece and fairseq-preprocess; this module only wires them
together, adds progress output and keeps line alignment (line i of an encoded file is line i of
its input, empty lines included), so that fairseq's sentence count equals the input line count.
"""

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm


def log(msg):
    print(f"[data_prep] {msg}", flush=True)


# --------------------------------------------------------------------------- checksums / stamps


def md5_file(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def md5_text(text):
    return hashlib.md5(text.encode("utf-8")).hexdigest()


class Stamp:
    """Remembers which inputs and options produced the outputs in a directory.

    The stamp is written only after every output exists, so an interrupted run never looks done.
    """

    def __init__(self, path, record, outputs):
        self.path = Path(path)
        self.record = record  # json-serialisable: input fingerprints + options that change the output
        self.outputs = [Path(p) for p in outputs]

    def is_current(self):
        if not self.path.exists() or not all(p.exists() for p in self.outputs):
            return False
        try:
            return json.loads(self.path.read_text()) == self.record
        except (OSError, ValueError):
            return False

    def invalidate(self):
        if self.path.exists():
            self.path.unlink()

    def write(self):
        self.path.write_text(json.dumps(self.record, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- building outputs

STAGING = ".partial"


@contextmanager
def staging(out_dir):
    """A fresh OUT/.partial folder to build into (one left by a killed run is ours: removed).

    On failure it is removed, and so is OUT if this call created it: a failed run leaves the
    outputs of the previous run (or nothing), never a half-built data-bin.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    tmp = out_dir / STAGING
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp, out_dir):
    """Move everything built in `tmp` into out_dir, replacing what has the same name."""
    for src in sorted(Path(tmp).iterdir()):
        dst = Path(out_dir) / src.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        os.replace(src, dst)


# --------------------------------------------------------------------------- sentencepiece

SPM_SEED = 1234


SPM_MAX_SENTENCE_BYTES = 4192  # sentencepiece's default max_sentence_length
SPM_LIMIT_BYTES = 2 ** 31 - 1  # the largest max_sentence_length it takes (an int32)


def train_sentencepiece(train_file, model_prefix, vocab_size, workers, max_sentences=0, longest_line=0):
    """Train a sentencepiece BPE model on `train_file`; writes <model_prefix>.model/.vocab.

    identity normalisation (no NFKC) keeps the characters as they are, so decoding an encoded
    line gives back the input line up to whitespace: " ".join(line.split()), i.e. every run of
    Unicode whitespace becomes one space and the line's ends are stripped (see encode_file).
    max_sentences > 0 trains on a seeded random sample of that many lines (for huge corpora);
    0 uses every line, which is fully deterministic. sentencepiece silently leaves out lines
    longer than its max_sentence_length (4192 bytes by default), and a corpus of such lines
    then fails with a message about the vocabulary size: the limit is raised to
    `longest_line` (bytes, from text_files.scan) so that every line is used.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(SPM_SEED)
    kwargs = dict(
        input=str(train_file),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=workers,
        minloglevel=2,  # sentencepiece is very chatty at INFO
        max_sentence_length=max(SPM_MAX_SENTENCE_BYTES, longest_line + 1),
    )
    if max_sentences > 0:
        kwargs.update(input_sentence_size=max_sentences, shuffle_input_sentence=True)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        # the usual cause on a small corpus: vocab_size larger than the pieces the text allows
        raise ValueError(
            f"sentencepiece training on {train_file} failed with --vocab-size {vocab_size}: {e}"
        ) from e


# The worker state lives in module globals: each pool process loads the model once.
_encoder = None


def _init_spm(model_file):
    global _encoder
    import sentencepiece as spm

    _encoder = ("spm", spm.SentencePieceProcessor(model_file=str(model_file)))


def _init_gpt2(encoder_json, vocab_bpe):
    global _encoder
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    _encoder = ("gpt2", get_encoder(str(encoder_json), str(vocab_bpe)))


def _encode_lines(lines):
    """Encode a chunk of lines; also return its size in bytes for the progress bar."""
    kind, enc = _encoder
    out = []
    nbytes = 0
    for line in lines:
        nbytes += len(line.encode("utf-8"))
        if kind == "spm":
            # fairseq splits lines on any Unicode whitespace (re \s); normalising the same way
            # keeps every piece one fairseq token (sentencepiece alone only knows ' ').
            line = " ".join(line.split())
            out.append(" ".join(enc.encode(line, out_type=str)))
        else:
            # GPT-2 byte-level BPE keeps inner whitespace in its ids; fairseq's convention is to
            # strip the line's ends and write the ids as words (used with its gpt2 dict.txt).
            out.append(" ".join(map(str, enc.encode(line.strip()))))
    return nbytes, out


def _chunks(f, size):
    chunk = []
    for line in f:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_file(src, dst, workers, spm_model=None, gpt2_files=None, chunk_lines=2000):
    """Encode `src` line by line into `dst` with a sentencepiece model or GPT-2 BPE files.

    Runs on `workers` processes; imap keeps chunk order, so the output stays line-aligned.
    """
    if spm_model is not None:
        init, initargs = _init_spm, (spm_model,)
    else:
        init, initargs = _init_gpt2, tuple(gpt2_files)
    total = os.path.getsize(src)
    dst_tmp = Path(str(dst) + ".tmp")
    with open(src, encoding="utf-8") as fin, open(
        dst_tmp, "w", encoding="utf-8", newline="\n"
    ) as fout, tqdm(total=total, unit="B", unit_scale=True, desc=f"encode {Path(src).name}") as bar:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, init, initargs)
            results = pool.imap(_encode_lines, _chunks(fin, chunk_lines))
        else:
            init(*initargs)
            pool, results = None, map(_encode_lines, _chunks(fin, chunk_lines))
        try:
            for nbytes, encoded in results:
                for line in encoded:
                    fout.write(line + "\n")
                bar.update(nbytes)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    dst_tmp.replace(dst)  # atomic: a half-written file never carries the final name


# --------------------------------------------------------------------------- fairseq-preprocess


def binarize(destdir, train, valid, test=None, workers=1, srcdict=None, keep_all_words=True):
    """Run fairseq-preprocess --only-source on the given text files into `destdir`.

    keep_all_words: dictionary of every type seen in train (--thresholdsrc 0 --nwordssrc -1),
    which is what word-level PTB / WikiText need (their text already maps rare words to <unk>).
    """
    from fairseq import options
    from fairseq_cli import preprocess

    destdir = Path(destdir)
    # fairseq-preprocess refuses to overwrite dict.txt; a stale data-bin is ours to replace.
    if destdir.exists():
        shutil.rmtree(destdir)
    argv = [
        "--only-source",
        "--trainpref", str(train),
        "--validpref", str(valid),
        "--destdir", str(destdir),
        "--workers", str(workers),
        "--dataset-impl", "mmap",
    ]
    if test is not None:
        argv += ["--testpref", str(test)]
    if srcdict is not None:
        argv += ["--srcdict", str(srcdict)]
    elif keep_all_words:
        argv += ["--thresholdsrc", "0", "--nwordssrc", "-1"]
    log("fairseq-preprocess " + " ".join(argv))
    args = options.get_preprocessing_parser().parse_args(argv)

    # preprocess.main adds a FileHandler to its logger on every call and never removes it;
    # drop it afterwards so a second call in the same process does not log into the old folder.
    plog = logging.getLogger("fairseq_cli.preprocess")
    before = list(plog.handlers)
    try:
        preprocess.main(args)
    finally:
        for h in plog.handlers[:]:
            if h not in before:
                plog.removeHandler(h)
                h.close()
    return destdir


def split_outputs(destdir, splits):
    destdir = Path(destdir)
    files = [destdir / "dict.txt"]
    for s in splits:
        files += [destdir / f"{s}.bin", destdir / f"{s}.idx"]
    return files
