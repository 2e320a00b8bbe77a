"""python -m fairseq_smlp.export_hf CKPT --out DIR  (see fairseq_smlp/export_hf/__init__.py)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_smlp.export_hf",
        description=(
            "Export a fairseq-smlp checkpoint (any family, any world size) to a Hugging Face transformers folder."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint file, or the common name of rank files (checkpoint_last.pt)")
    parser.add_argument("--out", required=True, help="output folder (written complete or not at all)")
    parser.add_argument("--dict", help="the training dict.txt (default: DATA/dict.txt of the checkpoint's data path)")
    parser.add_argument(
        "--spm-model", help="sentencepiece model of the training text (default: DATA/../spm.model when present)"
    )
    parser.add_argument("--gpt2-encoder-json", help="GPT-2 encoder.json the training text was encoded with")
    parser.add_argument("--gpt2-vocab-bpe", help="GPT-2 vocab.bpe the training text was encoded with")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip loading the export back and comparing its logits with fairseq's"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    args = parser.parse_args(argv)
    if bool(args.gpt2_encoder_json) != bool(args.gpt2_vocab_bpe):
        parser.error("--gpt2-encoder-json and --gpt2-vocab-bpe go together")
    gpt2 = (args.gpt2_encoder_json, args.gpt2_vocab_bpe) if args.gpt2_encoder_json else None

    from ..errors import UserError, debugging, one_line
    from .export import export

    try:
        report = export(
            args.checkpoint, args.out, args.dict, args.spm_model, gpt2, verify=not args.no_verify,
            overwrite=args.overwrite,
        )
    except (UserError, FileNotFoundError, ValueError) as e:  # ExportError, a refused or corrupt checkpoint
        if debugging():
            raise
        print(f"export_hf: {one_line(e)}", file=sys.stderr)
        return 1
    blocks = report["blocks"]
    layout = f" ({len(blocks)} blocks: {', '.join(sorted(set(blocks)))})" if blocks else ""
    print(
        f"export_hf: wrote {args.out}: {report['family']}{layout}, {report['parameters']:,} parameters, "
        f"{report['tokenizer']} tokenizer"
    )
    if report["max_logit_difference"] is not None:
        print(f"export_hf: max |logit difference| vs fairseq on random tokens: {report['max_logit_difference']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
