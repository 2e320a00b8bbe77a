"""The sparsity study's command line (python -m benchmarks.sparsity train|render|summary|list; what it
measures: benchmarks/sparsity/__init__.py)."""
import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks._results import run_metadata
from benchmarks.sparsity import __doc__ as STUDY
from benchmarks.sparsity.models import DEFAULT_MODELS, MODELS, REGIMES
from benchmarks.sparsity.records import drop_unfinished, finished_models, read_records, records_file
from benchmarks.sparsity.report import render
from benchmarks.sparsity.router_summary import write_summary
from benchmarks.sparsity.train import CODE_COMMIT, REPO, prepare_data, train_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparsity", description=STUDY.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["train", "render", "summary", "list"])
    p.add_argument("--regime", choices=list(REGIMES), default="single-pass")
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast around forward and backward (fp32 weights, fp32 routing)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training data (regime default: 1 / 4)")
    p.add_argument("--max-train-tokens", type=int, default=0, help="stop each model after this many tokens (pilots; 0: the whole pass)")
    p.add_argument("--tokens-per-update", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--dropout", type=float, default=None, help="regime default: 0 (single pass) / 0.1 (repeated)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--points", type=int, default=12, help="validation evaluations per model")
    p.add_argument("--valid-blocks", type=int, default=768, help="validation blocks per evaluation, spread evenly (0: all)")
    p.add_argument("--log-tokens", type=int, default=131072, help="training tokens per logged interval")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--data-bin", help="an existing fairseq data-bin instead of the regime's corpus (tests, other data)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="a line for the report")
    p.add_argument("--partial", action="store_true", help="render: also the models that did not finish, compared at the tokens they reached")
    p.add_argument("--out", default=None, help="PREFIX of the outputs (default benchmarks/results/sparsity_<regime>)")
    p.add_argument("--inputs", nargs="+", default=[], metavar="PREFIX",
                   help="summary: the router study's result prefixes (seeds, expert counts) summarised into --out; "
                        "PREFIX:MODEL,MODEL takes only those models of PREFIX")
    p.add_argument("--until-tokens", type=int, default=0,
                   help="render: every model cut at this many training tokens (runs of different lengths compared at equal tokens)")
    argv = list(sys.argv[1:] if argv is None else argv)
    fairseq = argv[argv.index("--") + 1 :] if "--" in argv else []  # after --: more fairseq-train options for every model
    args = p.parse_args(argv[: len(argv) - len(fairseq) - (1 if "--" in argv else 0)])
    args.fairseq = fairseq
    regime = REGIMES[args.regime]
    args.epochs = args.epochs or regime["epochs"]
    args.dropout = regime["dropout"] if args.dropout is None else args.dropout
    args.models = args.models or DEFAULT_MODELS
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; `python -m benchmarks.sparsity list` shows the names")
    args.out = Path(args.out or REPO / "benchmarks" / "results" / f"sparsity_{args.regime.replace('-', '_')}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.action == "list":
        for name, (arch, extra, dense, family, e) in MODELS.items():
            print(f"{name:16} {arch:20} {' '.join(extra):40} vs {dense or '-'}")
        return
    if args.action == "render":
        return render(args.out, args.partial, args.until_tokens)
    if args.action == "summary":
        if not args.inputs:
            raise SystemExit("summary: --inputs PREFIX [PREFIX ...] names the result files to summarise")
        return write_summary(args.out, args.inputs)
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("fairseq").setLevel(logging.WARNING)
    import fairseq_smlp  # noqa: F401

    data_bin = Path(args.data_bin) if args.data_bin else prepare_data(args.regime, args.vocab_size)
    path = records_file(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_unfinished(path)
    done = finished_models(read_records(path))

    def log(record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["kind"] != "train" or record["tokens"] % (4 * args.log_tokens) < args.tokens_per_update:
            print(json.dumps(record)[:300], flush=True)

    log({
        "kind": "meta", **run_metadata("sparsity", argv), "regime": args.regime,
        "data": args.data_bin or f"{REGIMES[args.regime]['corpus']}, {args.vocab_size} sentencepiece BPE", "precision": args.precision, "epochs": args.epochs, "lr": args.lr,
        "warmup": args.warmup, "dropout": args.dropout, "seed": args.seed, "tokens_per_update": args.tokens_per_update,
        "valid_blocks": args.valid_blocks, "max_train_tokens": args.max_train_tokens, "fairseq": args.fairseq,
        "commit": CODE_COMMIT, "note": args.note,
    })
    for name in args.models:
        if name in done:
            print(f"{name}: done, skipped", flush=True)
            continue
        train_model(name, data_bin, args, log)
    render(args.out)

