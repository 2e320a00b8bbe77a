"""Export fairseq-smlp checkpoints to Hugging Face transformers.

    python -m fairseq_smlp.export_hf CKPT --out DIR [--dict DICT]
        [--spm-model M | --gpt2-encoder-json J --gpt2-vocab-bpe B]

Writes a folder `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)` load: the dense Transformer as
transformers' own XGLM (it is fairseq's transformer_lm) when its options allow, sMLP, gMLP and
the MoE baselines with their modelling code copied into DIR (hf_code/, plain torch + transformers).
Rank files of an expert-parallel run are resharded to one worker first. Every tensor of the
checkpoint is accounted for (convert.map_state_dict), and the export is loaded back and its
logits compared with fairseq's before the folder appears.

    convert.py     checkpoint -> transformers config + state dict (per-family tables, the ledger)
    tokenizer.py   fairseq dictionary (+ sentencepiece / GPT-2 BPE) -> tokenizer files
    export.py      the folder, and the logit check against fairseq
    hf_code/       the code that goes into the folder
"""
from .convert import ExportError  # noqa: F401
from .export import export  # noqa: F401
