"""Assemble the paper's pre-training corpus from LOCAL copies and binarize it for fairseq.

The sMLP paper (and Artetxe et al. 2021 before it) trains on the RoBERTa corpora plus English
CC100: BookCorpus, English Wikipedia, CC-News, OpenWebText, CC-Stories and CC100-en, encoded
with GPT-2 byte-level BPE. This script never downloads anything; fetch the corpora yourself:

    # BookCorpus: no official release any more; a community copy is on the Hugging Face hub
    #   python -c "import datasets; datasets.load_dataset('bookcorpus', split='train')"  (one sentence per row)
    # English Wikipedia
    #   wget https://dumps.wikimedia.org/enwiki/latest/enwiki-latest-pages-articles.xml.bz2
    #   python -m wikiextractor.WikiExtractor enwiki-latest-pages-articles.xml.bz2 -o wiki/
    #   (then turn its <doc ...> ... </doc> blocks into documents separated by a blank line)
    # CC-News: crawl with news-please's commoncrawl script (github.com/fhamborg/news-please),
    #   or the Hugging Face copy:  datasets.load_dataset('cc_news', split='train')
    # OpenWebText: https://skylion007.github.io/OpenWebTextCorpus/  (or datasets 'openwebtext')
    # CC-Stories (Trinh & Le 2018): no official mirror remains; use a copy you are licensed to use
    # CC100 English (one paragraph per line, documents separated by blank lines already)
    #   wget https://data.statmt.org/cc-100/en.txt.xz && unxz en.txt.xz
    # GPT-2 BPE files as used by fairseq (RoBERTa):
    #   wget https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/encoder.json
    #   wget https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/vocab.bpe
    #   wget https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/dict.txt
    #
    # Rows of a Hugging Face dataset become this script's input format with e.g.
    #   with open('cc_news.txt', 'w') as f:
    #       for row in ds: f.write(row['text'].strip() + '\\n\\n')

Input format: each --input NAME=PATH is a text file or a folder of .txt files (searched
recursively, in sorted order); documents are separated by one or more blank lines.

Usage:
    python -m data_prep.paper_corpus --out-dir data/paper \\
        --input bookcorpus=raw/books --input wikipedia=raw/wiki --input ccnews=raw/ccnews.txt \\
        --input openwebtext=raw/owt --input ccstories=raw/stories --input cc100=raw/en.txt \\
        --valid-fraction 0.0005 --bpe gpt2 --gpt2-encoder-json encoder.json \\
        --gpt2-vocab-bpe vocab.bpe --srcdict dict.txt --workers 32

Output (OUT_DIR):
    train.txt, valid.txt  documents (lines) separated by an empty line, the format of fairseq's
                          --sample-break-mode complete_doc; valid holds round(f * n_docs) randomly
                          chosen (seeded) documents of every corpus, so each corpus is represented
                          in proportion to its size; train holds the rest, each document once
    bpe/*.txt, spm.model  the encoded text (with --bpe sentencepiece / gpt2)
    data-bin/             dict.txt, train/valid .bin/.idx
    split.stamp.json, prepare.stamp.json   let a rerun skip the steps whose inputs did not change
"""

import argparse
import random
import time
from pathlib import Path

from fairseq_smlp import text_files
from fairseq_smlp.validation import FlagError, check_args, check_value

from data_prep.common import (
    SPM_LIMIT_BYTES,
    Stamp,
    binarize,
    encode_file,
    log,
    md5_file,
    publish,
    split_outputs,
    staging,
    train_sentencepiece,
)

KNOWN_CORPORA = ("bookcorpus", "wikipedia", "ccnews", "openwebtext", "ccstories", "cc100")
BPE_CHOICES = ("none", "sentencepiece", "gpt2")


# --------------------------------------------------------------------------- inputs


def parse_inputs(specs):
    """['name=path', ...] -> [(name, [files])]; checks every path before anything is written."""
    if not specs:
        raise ValueError("give at least one --input NAME=PATH")
    corpora, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--input {spec!r}: expected NAME=PATH")
        if name in seen:
            raise ValueError(f"--input {name}: given twice")
        seen.add(name)
        path = Path(path)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise FileNotFoundError(f"--input {name}={path}: folder has no .txt files")
        else:
            raise FileNotFoundError(f"--input {name}={path}: no such file or folder")
        if name.lower().replace("-", "").replace("_", "") not in KNOWN_CORPORA:
            log(f"note: {name} is not one of the paper's corpora ({', '.join(KNOWN_CORPORA)})")
        corpora.append((name, files))
    return corpora


def iter_documents(files, name="corpus"):
    """Yield each document as a list of lines (no newline); blank lines separate documents.
    A byte that is not UTF-8 is a TextFileError naming the file, line and byte offset."""
    for path in files:
        doc = []
        for line in text_files.lines(path, flag=f"--input {name}="):
            if line.strip():
                doc.append(line)
            elif doc:
                yield doc
                doc = []
        if doc:  # a file's end also ends its last document
            yield doc


def count_documents(corpora, valid_fraction):
    """{name: documents}: reads every input once, so that a file that is not UTF-8, a corpus
    without documents, or a --valid-fraction that holds out nothing (or everything) is an
    error before anything is written."""
    counts = {}
    for name, files in corpora:
        counts[name] = sum(1 for _ in iter_documents(files, name))
        if counts[name] == 0:
            if len(files) == 1:  # the file is empty or blank: the reader's own error names it
                text_files.scan(files[0], flag=f"--input {name}=", what="documents")
            raise ValueError(f"--input {name}: no documents in its {len(files)} files (empty, or blank lines only)")
    held_out = sum(round(valid_fraction * n) for n in counts.values())
    total = sum(counts.values())
    if held_out == 0 or held_out == total:
        raise FlagError(f"--valid-fraction {valid_fraction} holds out {held_out} of {total:,} documents: the "
                        f"{'validation' if held_out == 0 else 'training'} set would be empty")
    return counts


def _fingerprint(files):
    # Size + modification time instead of a checksum: these inputs can be hundreds of GB, and
    # hashing them would cost as much as the split itself.
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


# --------------------------------------------------------------------------- train/valid split


def pick_valid(n_docs, fraction, seed, name):
    """Indices of the held-out documents: round(fraction * n_docs) of them, sampled uniformly.

    Rounding keeps every corpus within half a document of its exact share; the seed mixes in the
    corpus name so that adding a corpus does not change the choice in the others.
    """
    k = round(fraction * n_docs)
    return set(random.Random(f"{seed}:{name}").sample(range(n_docs), k))


def split_corpora(corpora, out_dir, valid_fraction, seed, counts):
    """Stream every corpus a second time (count_documents was the first): memory stays small
    for any corpus size. Writes out_dir/train.txt and valid.txt."""
    out_dir = Path(out_dir)
    stats = {}
    tmp = {s: out_dir / f"{s}.txt.tmp" for s in ("train", "valid")}
    with open(tmp["train"], "w", encoding="utf-8") as ftrain, open(
        tmp["valid"], "w", encoding="utf-8"
    ) as fvalid:
        for name, files in corpora:
            t0 = time.time()
            n_docs = counts[name]
            held_out = pick_valid(n_docs, valid_fraction, seed, name)
            for i, doc in enumerate(iter_documents(files, name)):
                f = fvalid if i in held_out else ftrain
                f.write("\n".join(doc) + "\n\n")  # the empty line marks the document's end
            stats[name] = {"train": n_docs - len(held_out), "valid": len(held_out)}
            log(
                f"{name}: {n_docs:,} documents -> {stats[name]['train']:,} train, "
                f"{stats[name]['valid']:,} valid ({time.time() - t0:.1f}s)"
            )
    for s, p in tmp.items():
        p.replace(out_dir / f"{s}.txt")
    return stats


# --------------------------------------------------------------------------- the pipeline


def _check_options(bpe, valid_fraction, vocab_size, workers, gpt2_encoder_json, gpt2_vocab_bpe, srcdict):
    if bpe not in BPE_CHOICES:
        raise ValueError(f"--bpe {bpe!r}: expected one of {', '.join(BPE_CHOICES)}")
    check_value("--valid-fraction", valid_fraction)
    check_value("--workers", workers)
    if bpe == "sentencepiece":
        check_value("--vocab-size", vocab_size)
    if bpe == "gpt2":
        for flag, path in (("--gpt2-encoder-json", gpt2_encoder_json), ("--gpt2-vocab-bpe", gpt2_vocab_bpe)):
            if path is None:
                raise ValueError(f"--bpe gpt2 needs {flag} (see the download commands in --help)")
            if not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: no such file")
    elif gpt2_encoder_json or gpt2_vocab_bpe:
        raise ValueError("--gpt2-encoder-json/--gpt2-vocab-bpe only apply with --bpe gpt2")
    if srcdict is not None and not Path(srcdict).is_file():
        raise FileNotFoundError(f"--srcdict {srcdict}: no such file")


def prepare_paper_corpus(
    out_dir,
    inputs,
    valid_fraction=0.0005,
    seed=1,
    bpe="none",
    vocab_size=32000,
    spm_max_sentences=10_000_000,
    gpt2_encoder_json=None,
    gpt2_vocab_bpe=None,
    srcdict=None,
    workers=2,
):
    """Split, encode and binarize; returns out_dir/data-bin. `inputs` is a list of 'NAME=PATH'."""
    _check_options(bpe, valid_fraction, vocab_size, workers, gpt2_encoder_json, gpt2_vocab_bpe, srcdict)
    check_value("--spm-max-sentences", spm_max_sentences)
    corpora = parse_inputs(inputs)
    out_dir = Path(out_dir)

    # step 1: train/valid split (skipped when the inputs, fraction and seed are unchanged)
    split_record = {
        "version": 1,
        "inputs": {name: _fingerprint(files) for name, files in corpora},
        "valid_fraction": valid_fraction,
        "seed": seed,
    }
    text = {s: out_dir / f"{s}.txt" for s in ("train", "valid")}
    split_stamp = Stamp(out_dir / "split.stamp.json", split_record, text.values())
    if split_stamp.is_current():
        log(f"{text['train']} and {text['valid']} are up to date: skipping the split")
    else:
        counts = count_documents(corpora, valid_fraction)  # every input checked before anything is written
        with staging(out_dir) as tmp:
            split_corpora(corpora, tmp, valid_fraction, seed, counts)
            split_stamp.invalidate()
            publish(tmp, out_dir)
        split_stamp.write()

    # step 2: BPE + binarize (skipped when the split and the options are unchanged)
    data_bin = out_dir / "data-bin"
    record = {
        "split": split_record,
        "bpe": bpe,
        "vocab_size": vocab_size if bpe == "sentencepiece" else None,
        "spm_max_sentences": spm_max_sentences if bpe == "sentencepiece" else None,
        "gpt2": [md5_file(gpt2_encoder_json), md5_file(gpt2_vocab_bpe)] if bpe == "gpt2" else None,
        "srcdict": md5_file(srcdict) if srcdict else None,
    }
    outputs = split_outputs(data_bin, ("train", "valid"))
    stamp = Stamp(out_dir / "prepare.stamp.json", record, outputs)
    if stamp.is_current():
        log(f"{data_bin} is up to date: nothing to do")
        return data_bin
    with staging(out_dir) as tmp:  # built in out_dir/.partial, moved into place when all succeeded
        if bpe != "none":
            encoded = {s: tmp / "bpe" / f"{s}.txt" for s in text}
            encoded["train"].parent.mkdir()
            if bpe == "sentencepiece":
                longest = text_files.scan(text["train"], max_line_bytes=SPM_LIMIT_BYTES - 1).longest
                log(f"training sentencepiece BPE ({vocab_size} pieces) on {text['train']}")
                train_sentencepiece(text["train"], tmp / "spm", vocab_size, workers, spm_max_sentences, longest)
                how = dict(spm_model=tmp / "spm.model")
            else:
                how = dict(gpt2_files=(gpt2_encoder_json, gpt2_vocab_bpe))
            for s in text:
                encode_file(text[s], encoded[s], workers, **how)
            text = encoded

        t0 = time.time()
        binarize(tmp / "data-bin", text["train"], text["valid"], workers=workers, srcdict=srcdict)
        log(f"binarized in {time.time() - t0:.1f}s")
        stamp.invalidate()
        publish(tmp, out_dir)
    log(f"wrote {data_bin}")
    stamp.write()
    return data_bin


def cli_main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", metavar="NAME=PATH", help="a corpus (repeat the flag)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--valid-fraction", type=float, default=0.0005, help="share of each corpus held out")
    p.add_argument("--seed", type=int, default=1, help="seed of the validation sample")
    p.add_argument("--bpe", choices=BPE_CHOICES, default="none",
                   help="none: text is already tokenized; gpt2: the paper's byte-level BPE")
    p.add_argument("--vocab-size", type=int, default=32000, help="sentencepiece vocabulary size")
    p.add_argument("--spm-max-sentences", type=int, default=10_000_000,
                   help="sentencepiece trains on a seeded sample of this many lines (0: all)")
    p.add_argument("--gpt2-encoder-json", help="GPT-2 encoder.json (with --bpe gpt2)")
    p.add_argument("--gpt2-vocab-bpe", help="GPT-2 vocab.bpe (with --bpe gpt2)")
    p.add_argument("--srcdict", help="fixed fairseq dictionary, e.g. fairseq's gpt2_bpe/dict.txt")
    p.add_argument("--workers", type=int, default=2, help="processes for encoding and binarizing")
    a = p.parse_args(argv)
    check_args(p, a)
    try:
        data_bin = prepare_paper_corpus(
            a.out_dir, a.input, a.valid_fraction, a.seed, a.bpe, a.vocab_size,
            a.spm_max_sentences, a.gpt2_encoder_json, a.gpt2_vocab_bpe, a.srcdict, a.workers,
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(data_bin)


if __name__ == "__main__":
    cli_main()
