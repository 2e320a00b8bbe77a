"""The tokenizer a checkpoint was trained with -> tokenizer files transformers loads.

The model reads fairseq dictionary ids: <s>=0, <pad>=1, </s>=2, <unk>=3, then dict.txt's
symbols in their order. Three kinds of training text exist in this project:

    word           whitespace-separated words (PTB, WikiText word level): a word-level
                   tokenizer of the `tokenizers` library (tokenizer.json, no remote code)
    sentencepiece  data_prep's sentencepiece BPE (spm.model): FairseqDictTokenizer
    gpt2           GPT-2 byte-level BPE (encoder.json + vocab.bpe): FairseqDictTokenizer

FairseqDictTokenizer (hf_code/tokenization_fairseq_smlp.py, copied into the export) runs the
subword model and looks every piece up in the fairseq dictionary. A tokenizer.json cannot do
that last step exactly: pieces missing from the dictionary must become <unk> (3) while still
taking part in the BPE merges as themselves.
"""
import json
import os
import tempfile

WORD, SENTENCEPIECE, GPT2 = "word", "sentencepiece", "gpt2"


def load_dictionary(path: str):
    from fairseq.data import Dictionary

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dict {path}: no such file (the dict.txt of the data-bin the model was trained on)")
    return Dictionary.load(path)


def looks_like_gpt2(dictionary) -> bool:
    """fairseq's GPT-2 dictionaries hold BPE ids as words ("464"); word and sentencepiece ones do not."""
    words = dictionary.symbols[dictionary.nspecial:]
    return bool(words) and sum(w.isdigit() for w in words) > 0.9 * len(words)


def choose_kind(dictionary, spm_model=None, gpt2_files=None) -> str:
    if spm_model and gpt2_files:
        raise ValueError("give --spm-model or --gpt2-encoder-json/--gpt2-vocab-bpe, not both")
    if spm_model:
        return SENTENCEPIECE
    if gpt2_files:
        return GPT2
    if looks_like_gpt2(dictionary):
        raise ValueError(
            "the dictionary holds GPT-2 BPE ids: pass --gpt2-encoder-json and --gpt2-vocab-bpe (the files the "
            "training text was encoded with)"
        )
    return WORD


def special_tokens(dictionary) -> dict:
    return dict(
        bos_token=dictionary.bos_word, eos_token=dictionary.eos_word, unk_token=dictionary.unk_word,
        pad_token=dictionary.pad_word,
    )


def word_level_tokenizer(dictionary):
    """fairseq's tokenize_line: split on whitespace (Python's, which also counts \\x1c-\\x1f),
    look each word up, <unk> when absent. Specials in the text are words like any other."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=dict(dictionary.indices), unk_token=dictionary.unk_word))
    backend.normalizer = normalizers.Replace(Regex("[\x1c-\x1f]"), " ")
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, split_special_tokens=True, clean_up_tokenization_spaces=False,
        **special_tokens(dictionary),
    )


def subword_vocabulary(kind: str, spm_model=None, gpt2_files=None) -> set:
    """The symbols the subword model can put into the training text."""
    if kind == SENTENCEPIECE:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=spm_model)
        return {processor.id_to_piece(i) for i in range(processor.get_piece_size())}
    with open(gpt2_files[0], encoding="utf-8") as f:
        return {str(i) for i in json.load(f).values()}


def check_matches(dictionary, kind: str, spm_model=None, gpt2_files=None) -> None:
    """Refuse a subword model that did not make this dictionary (most symbols would become <unk>)."""
    words = [w for w in dictionary.symbols[dictionary.nspecial:] if not w.startswith("madeupword")]
    known = subword_vocabulary(kind, spm_model, gpt2_files)
    found = sum(w in known for w in words)
    if words and found < 0.9 * len(words):
        flag = "--spm-model" if kind == SENTENCEPIECE else "--gpt2-encoder-json"
        path = spm_model if kind == SENTENCEPIECE else gpt2_files[0]
        raise ValueError(
            f"{flag} {path} did not make this dictionary: only {found} of its {len(words)} symbols are among its "
            f"pieces. Pass the {kind} files the training text was encoded with"
            + (" (or none, for a word-level dictionary)" if kind == SENTENCEPIECE else "")
        )


def dict_tokenizer(dictionary, kind: str, tmp: str, spm_model=None, gpt2_files=None):
    """FairseqDictTokenizer over the subword model's files; registered so save_pretrained copies its code."""
    from .hf_code.tokenization_fairseq_smlp import FairseqDictTokenizer

    vocab_file = os.path.join(tmp, "fairseq_dict.json")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({"symbols": list(dictionary.symbols), "indices": dict(dictionary.indices)}, f, ensure_ascii=False)
    FairseqDictTokenizer.register_for_auto_class("AutoTokenizer")
    if kind == SENTENCEPIECE:
        files = dict(spm_file=spm_model)
    else:
        files = dict(gpt2_encoder_file=gpt2_files[0], gpt2_merges_file=gpt2_files[1])
    for flag, path in files.items():
        if not os.path.isfile(path):
            option = "--spm-model" if flag == "spm_file" else "--gpt2-encoder-json/--gpt2-vocab-bpe"
            raise FileNotFoundError(f"{option} {path}: no such file")
    check_matches(dictionary, kind, spm_model, gpt2_files)
    return FairseqDictTokenizer(vocab_file, **files, **special_tokens(dictionary))


def save_tokenizer(dictionary, out_dir: str, spm_model=None, gpt2_files=None) -> str:
    """Write the tokenizer files into out_dir; returns the kind written."""
    kind = choose_kind(dictionary, spm_model, gpt2_files)
    with tempfile.TemporaryDirectory(prefix="export_hf_tok_") as tmp:
        if kind == WORD:
            tokenizer = word_level_tokenizer(dictionary)
        else:
            tokenizer = dict_tokenizer(dictionary, kind, tmp, spm_model, gpt2_files)
        tokenizer.save_pretrained(out_dir)
    return kind
