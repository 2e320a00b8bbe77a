"""Quickstart: prepare a small corpus, train smlp_lm_tiny on the CPU, report perplexity.

    fairseq-smlp-quickstart                         # Penn Treebank, 1,000 updates
    fairseq-smlp-quickstart --updates 300 --out-dir runs/qs
    fairseq-smlp-quickstart --minutes 3             # stop after 3 minutes of training at the latest
    fairseq-smlp-quickstart --train a.txt --valid b.txt --test c.txt

Each step is the real fairseq command (printed before it runs), so the run can be
repeated by hand: data_prep.small_corpus -> fairseq-train -> fairseq-eval-lm (valid, test).
fairseq options after `--` go to fairseq-train; the task's own (--tokens-per-sample,
--sample-break-mode, ...) reach fairseq-eval-lm too. OUT_DIR/run.json records the run's
configuration: running again into the same --out-dir resumes that run (e.g. with more
--updates or --minutes), and a different configuration there is an error that names the difference.
A fixed number of updates, not of minutes, makes the result the same on a fast and a slow or
busy machine: README's expected output is a committed run of this command.
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import fairseq_smlp
from fairseq_smlp.atomic_write import atomic_write_text
from fairseq_smlp.validation import FlagError, check_args, check_config, hours_flag

USER_DIR = str(Path(fairseq_smlp.__file__).resolve().parent)

# Tuned on PTB with 2 CPU cores (see README, "Quickstart").
TRAIN_OPTIONS = [
    "--task", "smlp_language_modeling", "--criterion", "moe_cross_entropy",
    "--tokens-per-sample", "128", "--max-tokens", "4096", "--required-batch-size-multiple", "1",
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.002",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "300", "--weight-decay", "0.01",
    "--clip-norm", "1.0", "--dropout", "0.2", "--cpu", "--num-workers", "0",
    "--no-epoch-checkpoints", "--log-interval", "50",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="ptb", choices=["ptb", "wikitext-2"], help="embedded default corpus")
    p.add_argument("--train", help="your own training text (with --valid and --test)")
    p.add_argument("--valid")
    p.add_argument("--test")
    p.add_argument(
        "--bpe", default="none", choices=["none", "sentencepiece"], help="word-level, or a sentencepiece BPE"
    )
    p.add_argument(
        "--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size (with --bpe sentencepiece)"
    )
    p.add_argument("--arch", default="smlp_lm_tiny")
    p.add_argument("--updates", type=int, default=1000, help="training updates (fairseq's --max-update)")
    p.add_argument(
        "--minutes", type=float, default=None, help="also stop training after this many minutes (default: no limit)"
    )
    p.add_argument("--out-dir", default="runs/quickstart", help="corpus, checkpoints and results go here")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16: bf16 autocast with fp32 weights (fairseq's --bf16 on the CPU); auto: bf16 where the "
                        "CPU computes bf16 natively (AVX512-BF16 / AMX), else fp32")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more fairseq-train options")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def native_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AVX512-BF16 or AMX): only then does autocast pay."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def precision_flags(choice: str) -> list:
    if choice == "auto":
        choice = "bf16" if native_bf16() else "fp32"
        if choice == "bf16":
            reason = "this CPU has bf16 matrix units"
        else:
            reason = "this CPU has no bf16 matrix units (AVX512-BF16/AMX)"
        print(f"precision: {choice} ({reason}; --precision fp32|bf16 to choose)", flush=True)
    return ["--bf16"] if choice == "bf16" else []


def run(cmd, log_file=None):
    """Run a fairseq command, showing its output live; return that output. On failure the
    command's own last error line is repeated last, so the cause is what the user sees last."""
    print("\n$ " + " ".join(cmd), flush=True)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if not _is_noise(line):
                print(line, end="", flush=True)
    output = "".join(lines)
    if log_file:
        Path(log_file).write_text(output)
    if proc.returncode != 0:
        sys.exit(f"command failed with exit code {proc.returncode}: {' '.join(cmd[1:3])} (log: {log_file or 'above'})\n"
                 f"{last_error(lines)}")
    return output


def last_error(lines) -> str:
    """The line that says why a command failed: its last line that is not a warning or a
    traceback's indented code."""
    meaningful = [line.rstrip() for line in lines if line.strip() and not _is_noise(line)]
    return meaningful[-1] if meaningful else "(no output)"


def _is_noise(line):
    return "Warning" in line or "warn(" in line or line.startswith("  ")


def perplexity(eval_output):
    match = re.search(r"Perplexity: ([0-9.]+)", eval_output)
    if not match:
        sys.exit("fairseq-eval-lm printed no perplexity")
    return float(match.group(1))


def training_validations(train_log) -> list:
    """(updates, valid ppl, best valid ppl so far) of every validation fairseq-train logged, in
    order; the best counts earlier sessions of a resumed run (fairseq's best_loss, in bits)."""
    line = r"valid on 'valid' subset \|.*?\| ppl ([0-9.]+) \|.*?\| num_updates (\d+)(?: \| best_loss ([0-9.]+))?"
    found = re.findall(line, train_log)
    out, best = [], float("inf")
    for ppl, updates, best_loss in found:  # no best_loss before fairseq's first save
        best = 2 ** float(best_loss) if best_loss else min(best, float(ppl))
        out.append((int(updates), float(ppl), best))
    return out


# eval-lm's score of checkpoint_best.pt and training's best validation are one measurement of
# one model on the same blocks; they differ by batching only (< 0.1% in fp32, < 0.5% in bf16)
AGREEMENT = 0.01


def check_agreement(valid_ppl: float, best_training_valid: float) -> None:
    """A printed perplexity must be the trained model's: refuse to report one that the saved
    checkpoint does not reproduce (a forward on stale weights during training, a checkpoint
    that is not the model that was validated)."""
    if abs(valid_ppl - best_training_valid) > AGREEMENT * best_training_valid:
        sys.exit(f"fairseq-smlp-quickstart: error: fairseq-eval-lm scores checkpoint_best.pt at validation perplexity "
                 f"{valid_ppl:.2f}, but training validated it at {best_training_valid:.2f}: the numbers of this run "
                 f"cannot be trusted (please report it, with {RUN_FILE} and train.log)")


def provenance() -> dict:
    """When, from which code and on which machine a result was measured."""
    import torch

    repo = Path(fairseq_smlp.__file__).resolve().parents[1]
    git = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True)
    cpuinfo = _read("/proc/cpuinfo").splitlines()
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git.stdout.strip() if git.returncode == 0 else f"fairseq-smlp {_version()}",
        "machine": f"{cpu}, {os.cpu_count()} cores, {'with' if native_bf16() else 'no'} bf16 matrix units",
        "torch": torch.__version__,
    }


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fairseq-smlp")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------ the run's configuration
RUN_FILE = "run.json"


def run_config(args, extra) -> dict:
    """What makes a run in --out-dir this run (not --updates / --minutes: more continue it)."""
    return {"arch": args.arch, "corpus": None if args.train else args.corpus, "train": args.train, "valid": args.valid,
            "test": args.test, "bpe": args.bpe, "vocab_size": args.vocab_size if args.bpe == "sentencepiece" else None,
            "seed": args.seed, "fairseq_options": extra}


def check_out_dir(out: Path, config: dict) -> None:
    """--out-dir is new, or holds a run of the same configuration (which then resumes)."""
    if out.exists() and not out.is_dir():
        sys.exit(f"fairseq-smlp-quickstart: error: --out-dir {out} is a file, not a folder")
    recorded = out / RUN_FILE
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            sys.exit(f"fairseq-smlp-quickstart: error: {recorded} is not a readable run record ({e}): "
                     f"delete {out} or pass a new --out-dir")
        diff = [f"{k}: {before.get(k)!r} there, {v!r} now" for k, v in config.items() if before.get(k) != v]
        if diff:
            sys.exit(f"fairseq-smlp-quickstart: error: --out-dir {out} holds a run of another configuration "
                     f"({'; '.join(diff)}): pass a new --out-dir, or delete {out}")
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        sys.exit(f"fairseq-smlp-quickstart: error: --out-dir {out} holds checkpoints of a run with no {RUN_FILE} "
                 "(another configuration, or an older version): pass a new --out-dir, or delete it")


def task_options(extra) -> list:
    """The options among `extra` that belong to the language-modeling task (with their
    values): fairseq-eval-lm must read the data as training did (--tokens-per-sample ...)."""
    from fairseq.tasks.language_modeling import LanguageModelingConfig

    flags = {"--" + name.replace("_", "-") for name, f in LanguageModelingConfig.__dataclass_fields__.items()
             if not (isinstance(f.default, str) and f.default.startswith("${")) and name != "data"}
    out, keep = [], False
    for token in extra:
        if token.startswith("--"):
            keep = token.split("=", 1)[0] in flags
        if keep:
            out.append(token)
    return out


def train_command(args, data_bin, save_dir, precision, extra) -> list:
    return [sys.executable, "-m", "fairseq_cli.train", str(data_bin), "--user-dir", USER_DIR, "--arch", args.arch,
            *TRAIN_OPTIONS, *precision, "--max-update", str(args.updates), *time_limit(args.minutes),
            "--save-dir", str(save_dir), "--seed", str(args.seed), *extra]


def time_limit(minutes) -> list:
    return [] if minutes is None else ["--stop-time-hours", hours_flag(minutes)]


def eval_command(data_bin, save_dir, subset, precision, extra) -> list:
    return [sys.executable, "-m", "fairseq_cli.eval_lm", str(data_bin), "--user-dir", USER_DIR,
            "--task", "smlp_language_modeling", "--path", str(save_dir / "checkpoint_best.pt"),
            "--tokens-per-sample", "128", "--gen-subset", subset, "--cpu", "--num-workers", "0", *precision,
            *task_options(extra)]  # after the defaults: the training's own values win


def check_train_options(args, extra) -> None:
    """Parse the training command as fairseq-train will and check its numbers, before the
    corpus is prepared (a bad option after -- fails in seconds, not after data preparation)."""
    from .dry_run import parse_fairseq_args

    try:
        check_config(parse_fairseq_args(train_command(args, "DATA", "SAVE", [], extra)[3:]))
    except FlagError as e:
        sys.exit(f"fairseq-smlp-quickstart: error: {e}")


def main(argv=None):
    args = parse_args(argv)
    from data_prep.small_corpus import prepare_small_corpus

    out = Path(args.out_dir)
    extra = [a for a in args.extra if a != "--"]
    check_out_dir(out, run_config(args, extra))
    check_train_options(args, extra)
    corpus = None if args.train else args.corpus
    try:
        data_bin = prepare_small_corpus(
            out / "corpus", corpus=corpus, train=args.train, valid=args.valid, test=args.test,
            bpe=args.bpe, vocab_size=args.vocab_size, workers=2,
        )
    except (ValueError, FileNotFoundError) as e:  # a bad file or option, named
        sys.exit(f"fairseq-smlp-quickstart: error: {e}")
    atomic_write_text(out / RUN_FILE, json.dumps(run_config(args, extra), indent=2) + "\n")
    save_dir = out / "checkpoints"
    precision = precision_flags(args.precision)
    started = time.time()
    train_log = run(train_command(args, data_bin, save_dir, precision, extra), out / "train.log")
    train_minutes = (time.time() - started) / 60

    validations = training_validations(train_log)
    if not validations:
        sys.exit(f"fairseq-smlp-quickstart: error: fairseq-train validated no model (log: {out / 'train.log'})")
    results = {"arch": args.arch, "corpus": args.train or args.corpus, "train_minutes": round(train_minutes, 2),
               "precision": "bf16" if precision else "fp32", "updates": validations[-1][0],
               "last_training_valid_ppl": validations[-1][1], "best_training_valid_ppl": round(validations[-1][2], 2)}
    # fairseq prints shared and expert parameters separately for models with experts
    counts = re.findall(r"num\. (?:shared |expert )?model params: ([0-9,]+)", train_log)
    results["params"] = sum(int(c.replace(",", "")) for c in counts)
    for subset in ("valid", "test"):
        eval_log = run(eval_command(data_bin, save_dir, subset, precision, extra), out / f"eval_{subset}.log")
        results[f"{subset}_ppl"] = perplexity(eval_log)
    results.update(provenance())
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    check_agreement(results["valid_ppl"], results["best_training_valid_ppl"])

    print("\n" + "=" * 60)
    print(summary(results))
    print(f"(results: {out / 'results.json'}; checkpoint: {save_dir / 'checkpoint_best.pt'})")
    return results


def summary(results: dict) -> str:
    """What the quickstart prints at the end (README shows it from the committed results)."""
    return (f"{results['arch']} on {results['corpus']}: {results['params']:,} parameters, "
            f"{results['train_minutes']:.1f} min of training ({results['updates']:,} updates, {results['precision']})\n"
            f"validation perplexity: {results['valid_ppl']:.2f} (training's own validation: "
            f"{results['best_training_valid_ppl']:.2f})\n"
            f"test perplexity:       {results['test_ppl']:.2f}")


def cli_main():
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()


if __name__ == "__main__":
    cli_main()
