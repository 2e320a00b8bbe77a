"""Text -> token ids of a fairseq dictionary, in the conventions of the training corpus.

Three ways to cut text into dictionary symbols (``--normalize``):

    none   words and single punctuation marks, case kept ("It's 5." -> It ' s 5 .)
    ptb    Penn Treebank (Mikolov's language-modelling version): one sentence per line, so
           a sentence's end (. ? !) is the line end </s>; lower case, numbers -> N, clitics
           split off ('s 're 've 'll 'd 'm n't), other punctuation dropped except $ & # '
           ("It's 5. Go" -> it 's N </s> go)
    auto   ptb when the dictionary looks like that corpus (see detect_normalization), else none

With a sentencepiece model the text is cut into pieces instead (the way subword training
data was preprocessed). Unknown symbols map to the dictionary's <unk>.
"""
import re
from typing import Callable, List, Optional

NORMALIZATIONS = ("auto", "none", "ptb")


def light_tokenize(text: str) -> List[str]:
    """Words and single punctuation marks: "It's done." -> ["It", "'", "s", "done", "."]."""
    return re.findall(r"\w+|[^\w\s]", text)


# ----------------------------------------------------------------------------- PTB

PTB_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
PTB_PUNCTUATION_KEPT = {"$", "&", "#", "'"}  # the only punctuation tokens of Mikolov's PTB
# A token is: the literal <unk>; a clitic written apart ('s, n't); a number with thousands
# commas (1,000.5) not glued to a word; a word with inner . - ' & / (u.s, 30-day, o'brien,
# 1/2) and an optional final period; or any other single character.
PTB_TOKEN = re.compile(r"<unk>|'(?:s|re|ve|ll|d|m)(?![\w'])|n't(?!\w)|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w-])"
                       r"|\w+(?:[-.'&/]\w+)*\.?|\S")
PTB_NUMBER = re.compile(r"[+-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?")
PTB_SENTENCE_END = "</s>"  # fairseq's eos: the corpus has one sentence per line and no . ? !


def split_clitic(word: str) -> List[str]:
    """don't -> do n't, it's -> it 's, o'brien -> o'brien."""
    for clitic in PTB_CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            return [word[:-len(clitic)], clitic]
    return [word]


def ptb_tokens(text: str, known: Optional[Callable[[str], bool]] = None) -> List[str]:
    """Text in the conventions of the PTB language-modelling corpus.

    ``known(word)`` says whether a word is in the dictionary: a final period stays on a
    word with an inner period (u.s.), and on a known abbreviation (``known("mr.")``)
    unless it is the text's last word (there the period ends the sentence). A sentence's
    end (. ? ! , once for a run of them) becomes </s>, the line end of the corpus.
    """
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    raw = PTB_TOKEN.findall(text)
    out: List[str] = []
    for i, tok in enumerate(raw):
        if tok in ("<unk>", "N"):  # already in the corpus' conventions (N: a number)
            out.append(tok)
            continue
        tok = tok.lower()
        period = False
        if len(tok) > 1 and tok.endswith(".") and not PTB_NUMBER.fullmatch(tok):
            stem = tok[:-1]
            last = i == len(raw) - 1
            if not ("." in stem or (known is not None and known(tok) and not last)):
                tok, period = stem, True  # the word, then the sentence's end
        if tok in (".", "?", "!"):
            period = True
        elif PTB_NUMBER.fullmatch(tok):
            out.append("N")
        elif tok == "%" and out and out[-1] == "N":
            out.append("N")  # PTB writes "8.5 %" as "N N"
        elif not re.search(r"\w", tok):
            if tok in PTB_PUNCTUATION_KEPT:
                out.append(tok)
        else:
            out.extend(split_clitic(tok))
        if period and out[-1:] != [PTB_SENTENCE_END]:
            out.append(PTB_SENTENCE_END)
    return out


def is_subword_dictionary(symbols) -> bool:
    return any("\u2581" in s or s.endswith("@@") for s in symbols)


def detect_normalization(dictionary) -> str:
    """'ptb' for a word-level dictionary in the PTB conventions, else 'none'.

    The rule: not a subword dictionary (no sentencepiece '\u2581' or '@@' pieces), contains
    the number symbol 'N', and no symbol has an upper-case letter. Mikolov's PTB and data
    prepared like it pass; WikiText, books and every BPE / sentencepiece vocabulary fail
    (they keep case or have subword pieces).
    """
    symbols = dictionary.symbols[dictionary.nspecial:]
    if is_subword_dictionary(symbols) or "N" not in dictionary.indices:
        return "none"
    if any(ch.isupper() for s in symbols if s != "N" for ch in s):
        return "none"
    return "ptb"


class TextEncoder:
    """Text -> token ids of a fairseq dictionary (no eos appended).

    ``normalize``: 'none', 'ptb' or 'auto' (see the module docstring); ignored with a
    sentencepiece model. ``self.normalize`` holds the resolved choice.
    """

    def __init__(self, dictionary, spm_model: Optional[str] = None, normalize: str = "none"):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"--normalize {normalize!r}: choose from {list(NORMALIZATIONS)}")
        self.dictionary = dictionary
        self.sp = None
        if spm_model is not None:
            import sentencepiece

            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
            normalize = "none"
        elif normalize == "auto":
            normalize = detect_normalization(dictionary)
        self.normalize = normalize

    def tokens(self, text: str) -> List[str]:
        if self.sp is not None:
            return self.sp.encode(text, out_type=str)
        if self.normalize == "ptb":
            return ptb_tokens(text, known=self.dictionary.indices.__contains__)
        return light_tokenize(text)

    def __call__(self, text: str) -> List[int]:
        return [self.dictionary.index(t) for t in self.tokens(text)]

    def lines(self, text: str, eos: int) -> List[int]:
        """Each line's tokens followed by eos, as fairseq-preprocess binarizes a text file."""
        out: List[int] = []
        for line in text.splitlines():
            ids = self(line)
            out += (ids[:-1] if ids[-1:] == [eos] else ids) + [eos]  # a final '.' is this line end
        return out
