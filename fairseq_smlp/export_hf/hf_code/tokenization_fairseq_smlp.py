"""Text -> the ids of a fairseq dictionary, exactly as fairseq-smlp's data preparation and
fairseq-preprocess produced them for training. Standalone: transformers, plus sentencepiece
or tokenizers for the subword step.

    sentencepiece  runs of whitespace -> one space, ends stripped; the sentencepiece model's
                   pieces; each piece's id in the fairseq dictionary (<unk> when absent)
    gpt2           ends stripped; GPT-2 byte-level BPE ids, which fairseq's dictionary holds as
                   words ("464"); their id in the fairseq dictionary

A dictionary id is not the subword model's own id: fairseq puts <s>=0, <pad>=1, </s>=2,
<unk>=3 first, then the symbols in the order of its dict.txt (by training frequency).
No special token is added: fairseq ends every training line with </s> (eos_token_id);
append it yourself to score a line exactly as fairseq-eval-lm does.
"""
import json
import os
import shutil

from transformers import PreTrainedTokenizer


class FairseqDictTokenizer(PreTrainedTokenizer):
    vocab_files_names = {
        "vocab_file": "fairseq_dict.json",  # {"symbols": [id -> symbol], "indices": {symbol: id}}
        "spm_file": "spm.model",
        "gpt2_encoder_file": "gpt2_encoder.json",
        "gpt2_merges_file": "gpt2_vocab.bpe",
    }
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, spm_file=None, gpt2_encoder_file=None, gpt2_merges_file=None,
                 bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", **kwargs):
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        self.symbols, self.indices = vocab["symbols"], vocab["indices"]
        self.unk_index = self.indices[str(unk_token)]
        self.files = {
            "vocab_file": vocab_file, "spm_file": spm_file, "gpt2_encoder_file": gpt2_encoder_file,
            "gpt2_merges_file": gpt2_merges_file,
        }
        if spm_file:
            import sentencepiece

            self.kind, self.spm = "sentencepiece", sentencepiece.SentencePieceProcessor(model_file=spm_file)
        elif gpt2_encoder_file and gpt2_merges_file:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers

            self.kind = "gpt2"
            self.gpt2 = Tokenizer(models.BPE.from_file(gpt2_encoder_file, gpt2_merges_file))
            self.gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.gpt2.decoder = decoders.ByteLevel()
        else:
            raise ValueError(
                "FairseqDictTokenizer needs spm.model, or gpt2_encoder.json and gpt2_vocab.bpe, "
                "next to fairseq_dict.json"
            )
        # "<unk>" inside a text is a word to look up like any other (fairseq does not treat it specially)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def get_vocab(self):
        return dict(self.indices)

    def _tokenize(self, text, **kwargs):
        """text -> the symbols fairseq's dictionary looked up."""
        if self.kind == "sentencepiece":
            return self.spm.encode(" ".join(text.split()), out_type=str)
        return [str(i) for i in self.gpt2.encode(text.strip(), add_special_tokens=False).ids]

    def _convert_token_to_id(self, token):
        return self.indices.get(token, self.unk_index)

    def _convert_id_to_token(self, index):
        return self.symbols[index]

    def convert_tokens_to_string(self, tokens):
        if self.kind == "sentencepiece":
            return "".join(tokens).replace("\u2581", " ").strip()
        text, run = [], []  # GPT-2 ids decode as bytes; other symbols (<unk>, ...) are kept as they are
        for token in tokens + [None]:
            if token is not None and token.isdigit():
                run.append(int(token))
                continue
            if run:
                text.append(self.gpt2.decode(run))
                run = []
            if token is not None:
                text.append(token)
        return "".join(text)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        saved = []
        for key, name in self.vocab_files_names.items():
            source = self.files.get(key)
            if source:
                target = os.path.join(save_directory, prefix + name)
                if os.path.abspath(source) != os.path.abspath(target):
                    shutil.copyfile(source, target)
                saved.append(target)
        return tuple(saved)
