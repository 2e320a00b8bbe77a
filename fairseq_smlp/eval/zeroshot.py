"""Zero-shot in-context evaluation of a fairseq language-model checkpoint.

    fairseq-smlp-zeroshot --path checkpoints/checkpoint_best.pt \\
        --tasks copa,piqa,storycloze,winogrande,hellaswag,record --output results.json \\
        [--task-file mytask=my.jsonl] [--predictions predictions.jsonl]

(or ``python -m fairseq_smlp.eval.zeroshot ...``). Works with fairseq's transformer_lm and
every architecture of the fairseq_smlp plugin. Prints accuracy per task under every rule
(acc, acc_norm, acc_per_token), writes a results JSON and, with --predictions, one line
per example with every candidate's score and lengths. See zeroshot_tasks.py for the
prompt of each task, text.py for text -> tokens and scoring.py for the scoring.
"""
import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..atomic_write import atomic_output, atomic_write_text
from ..errors import UserError, debugging, one_line
from ..validation import check_args
from .scoring import CandidateBuilder, encode_examples, evaluate_task
from .text import NORMALIZATIONS, TextEncoder
from .zeroshot_tasks import TASKS, TaskFileError, find_task_file, task_from_file

logger = logging.getLogger("fairseq_smlp.eval.zeroshot")

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../fairseq_smlp, the --user-dir
REPO_ROOT = PACKAGE_DIR.parent
UNK_WARNING_RATE = 0.10  # above this share of <unk> among scored tokens the text does not fit the dictionary


class FlagError(ValueError):
    """A bad command-line value; reported as a message, not a traceback."""


def default_data_dir() -> str:
    return os.environ.get("SMLP_ZEROSHOT_DIR",
                          str(REPO_ROOT.parent / "shared" / "data" / "zeroshot"))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fairseq-smlp-zeroshot",
        description="Zero-shot in-context accuracy of a fairseq language model.")
    p.add_argument("--path", required=True, help="model checkpoint (.pt)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="folder of task files in their public formats "
                        "(default: $SMLP_ZEROSHOT_DIR or ../shared/data/zeroshot)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of {','.join(TASKS)} "
                        "(default: every task whose file is in --data-dir, unless --task-file is given)")
    p.add_argument("--task-file", action="append", default=[], metavar="NAME=PATH",
                   help="a multiple-choice set in the generic JSON-lines schema (see README: "
                        "context + choices + label, or contexts + continuation + label); repeatable")
    p.add_argument("--max-examples", type=int, default=None,
                   help="score only the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per forward (all their candidates in one batch)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--bf16", action="store_true",
                   help="score under bf16 autocast (fp32 weights; routers and log-softmax stay fp32), "
                        "as fairseq-train/fairseq-eval-lm --bf16 do")
    p.add_argument("--output", default=None, help="write results to this JSON file")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="write one line per example: task, index, line, gold, prediction under each "
                        "rule, and each candidate's log-prob, scored tokens, characters and bytes")
    p.add_argument("--user-dir", default=str(PACKAGE_DIR),
                   help="fairseq --user-dir to import before loading (default: the installed "
                        "fairseq_smlp package)")
    p.add_argument("--spm-model", default=None,
                   help="sentencepiece model applied to text before the fairseq dictionary "
                        "(default: --normalize)")
    p.add_argument("--normalize", default="auto", choices=NORMALIZATIONS,
                   help="text -> dictionary symbols without --spm-model: 'none' = words and punctuation "
                        "as written; 'ptb' = the Penn Treebank LM corpus' conventions (lower case, "
                        "numbers -> N, clitics split, punctuation dropped); 'auto' (default) = ptb for a "
                        "word-level, lower-case dictionary with an N symbol, else none")
    p.add_argument("--dict", default=None,
                   help="fairseq dictionary (default: dict.txt in the checkpoint's cfg.task.data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ----------------------------------------------------------------------------- loading


def read_checkpoint(path: str) -> dict:
    """The checkpoint state on CPU (fairseq upgrades old formats on the way)."""
    from fairseq import checkpoint_utils

    if not Path(path).is_file():
        raise FileNotFoundError(f"--path {path}: no such checkpoint file")
    return checkpoint_utils.load_checkpoint_to_cpu(path)


def checkpoint_cfg_value(state: dict, section: str, key: str, arg_name: str):
    """A config value of the checkpoint, from state['cfg'] or (old format) state['args']."""
    if state.get("args") is not None:
        return getattr(state["args"], arg_name, None)
    cfg = state.get("cfg") or {}
    return (cfg.get(section) or {}).get(key)


def resolve_dict(dict_arg, state: dict, checkpoint: str) -> Path:
    """--dict, or dict.txt of the checkpoint's training data dir; a clear error if absent.

    A relative cfg.task.data is relative to where fairseq-train ran, unknown here: try the
    current dir, the checkpoint's dir and the one above it (checkpoints/ next to data-bin/).
    """
    if dict_arg is not None:
        if not Path(dict_arg).is_file():
            raise FileNotFoundError(f"--dict {dict_arg}: no such file")
        return Path(dict_arg)
    data = checkpoint_cfg_value(state, "task", "data", "data")
    if not data:
        raise FileNotFoundError("the checkpoint records no cfg.task.data; pass --dict PATH/dict.txt")
    data = Path(str(data).split(os.pathsep)[0])
    ckpt_dir = Path(checkpoint).resolve().parent
    tried = [data / "dict.txt"] if data.is_absolute() else [
        base / data / "dict.txt" for base in (Path.cwd(), ckpt_dir, ckpt_dir.parent)]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no dict.txt for the checkpoint's cfg.task.data={str(data)!r} "
                            f"(tried {[str(t) for t in tried]}); pass --dict PATH/dict.txt")


@contextlib.contextmanager
def dict_dir(dict_path: Path):
    """A folder whose dict.txt is dict_path (fairseq tasks read <data>/dict.txt); a copy in a
    temporary folder, removed when the block ends, for a --dict of another name."""
    if dict_path.name == "dict.txt":
        yield str(dict_path.resolve().parent)
        return
    with tempfile.TemporaryDirectory(prefix="smlp_zeroshot_dict_") as tmp:
        shutil.copy(dict_path, Path(tmp) / "dict.txt")
        yield tmp


def import_user_dir(user_dir: str, arch):
    """Import the plugin so its archs are registered; tolerate a broken plugin only when
    the checkpoint's arch is one of fairseq's own."""
    from fairseq import utils
    from fairseq.models import ARCH_MODEL_REGISTRY, import_models
    from fairseq.tasks import import_tasks

    try:
        utils.import_user_module(argparse.Namespace(user_dir=user_dir))
        # Already imported as a package (python -m fairseq_smlp...): fairseq then skips
        # importing its models/ and tasks/ folders, so import them here.
        name = Path(user_dir).resolve().name
        for sub, importer in (("tasks", import_tasks), ("models", import_models)):
            if (Path(user_dir) / sub).is_dir():
                importer(str(Path(user_dir) / sub), f"{name}.{sub}")
    except Exception as e:
        if arch in ARCH_MODEL_REGISTRY:
            logger.warning(f"--user-dir {user_dir} failed to import ({e!r}); "
                           f"continuing since arch '{arch}' is built into fairseq")
            return
        raise RuntimeError(f"--user-dir {user_dir}: import failed, so the checkpoint's arch "
                           f"'{arch}' cannot be built: {e!r}") from e


def load_model(path: str, dict_arg=None, user_dir=None):
    """Load a fairseq LM checkpoint. Returns (model, dictionary, dict path)."""
    from fairseq import checkpoint_utils
    from omegaconf import open_dict

    state = read_checkpoint(path)
    dict_path = resolve_dict(dict_arg, state, path)
    arch = checkpoint_cfg_value(state, "model", "_name", "arch")
    if user_dir:
        import_user_dir(user_dir, arch)

    with dict_dir(dict_path) as data:  # read while the task is set up, then removed
        if state.get("args") is not None:
            state["args"].data = data
        if state.get("cfg") is not None:
            with open_dict(state["cfg"]):
                state["cfg"].task.data = data
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0]
    dictionary = getattr(task, "source_dictionary", None)
    if dictionary is None:
        dictionary = model.decoder.dictionary
    return model, dictionary, dict_path


def max_positions_of(model):
    """The model's window in tokens (None: unlimited)."""
    m = model.max_positions()
    if isinstance(m, (tuple, list)):  # (source, target) limits: the tighter one
        m = min((x for x in m if x is not None), default=None)
    return int(m) if m is not None else None


# ----------------------------------------------------------------------------- running


def select_tasks(tasks_arg, data_dir, task_files=()):
    """[(TaskSpec, file)] for --tasks and --task-file, or for every task whose file is in
    data_dir when neither is given."""
    extra = []
    for argument in task_files:
        try:
            extra.append(task_from_file(argument))
        except ValueError as e:
            raise FlagError(str(e)) from None
    names = [spec.name for spec, _ in extra]
    clash = sorted({n for n in names if names.count(n) > 1 or n in TASKS})
    if clash:
        raise FlagError(f"--task-file: name(s) {clash} used twice or by a built-in task")
    if tasks_arg is None and extra:
        return extra
    return select_builtin_tasks(tasks_arg, data_dir) + extra


def select_builtin_tasks(tasks_arg, data_dir):
    if tasks_arg is None:
        found = []
        for spec in TASKS.values():
            try:
                found.append((spec, find_task_file(spec, data_dir)))
            except FileNotFoundError:
                logger.info(f"skipping {spec.name}: no file in {data_dir}")
        if not found:
            raise FileNotFoundError(f"--data-dir {data_dir}: no task file found")
        return found
    names = [n.strip().lower() for n in tasks_arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise FlagError(f"--tasks: unknown task(s) {unknown}; choose from {list(TASKS)}")
    return [(TASKS[n], find_task_file(TASKS[n], data_dir)) for n in names]


SHORT = {"acc": "acc", "acc_per_token": "acc_tok"}


def format_table(results) -> str:
    def cell(value, width=9):
        return f"{value:{width}.4f}" if value is not None else f"{'-':>{width}}"

    rows = [f"{'task':<12}{'examples':>9}{'truncated':>10}{'acc':>9}{'acc_norm':>9}{'acc_tok':>9}"
            f"{'accuracy':>10} {'(rule)':<10}{'EM':>8}{'F1':>8}{'s/1k ex':>9}"]
    for r in results:
        per_k = 1000 * r.seconds / max(r.examples, 1)
        rows.append(f"{r.task:<12}{r.examples:>9}{r.truncated:>10}{cell(r.rule_accuracy['acc'])}"
                    f"{cell(r.rule_accuracy['acc_norm'])}{cell(r.rule_accuracy.get('acc_per_token'))}"
                    f"{r.accuracy:>10.4f} {'(' + SHORT[r.metric] + ')':<10}{cell(r.exact_match, 8)}"
                    f"{cell(r.f1, 8)}{per_k:>9.2f}")
    rows.append("acc: sum of log-probs; acc_norm: per character of the continuation "
                "(lm-evaluation-harness); acc_tok: mean per token; accuracy: the task's paper-style rule")
    return "\n".join(rows)


def check_output_paths(args):
    """Fail on an unwritable --output / --predictions before minutes of scoring."""
    for flag, value in (("--output", args.output), ("--predictions", args.predictions)):
        if value is not None and not Path(value).resolve().parent.is_dir():
            raise FlagError(f"{flag} {value}: folder {Path(value).resolve().parent} does not exist")
        if value is not None and Path(value).is_dir():
            raise FlagError(f"{flag} {value}: is a folder")


def warn_unknown_tokens(name, encoded, unk: int) -> float:
    """Share of scored tokens that are <unk>; a warning above UNK_WARNING_RATE."""
    scored = [t for cands in encoded for c in cands for t in c.tokens[len(c.tokens) - c.n_cont:]]
    rate = sum(t == unk for t in scored) / max(len(scored), 1)
    if rate > UNK_WARNING_RATE:
        logger.warning(f"{name}: {rate:.1%} of scored tokens are <unk> (above {UNK_WARNING_RATE:.0%}): the "
                       "dictionary does not cover this text; check that --normalize / --spm-model match how the "
                       "training data was written (a 10k-word vocabulary like PTB's leaves 10-19% of these tasks' "
                       "words unknown even then)")
    return rate


def main(args) -> dict:
    import torch

    # Read and encode every task file first: a bad flag or file fails before minutes of
    # scoring, and nothing is written.
    check_output_paths(args)
    selected = [(spec, file, spec.load(file)[:args.max_examples])
                for spec, file in select_tasks(args.tasks, args.data_dir, args.task_file)]
    if args.spm_model is not None and not Path(args.spm_model).is_file():
        raise FileNotFoundError(f"--spm-model {args.spm_model}: no such file")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, dictionary, dict_path = load_model(args.path, args.dict, args.user_dir)
    model.to(device).eval()
    max_positions = max_positions_of(model)
    # Partial-prediction sMLP routes from the first score_from positions (see make_candidate).
    routing_prefix = int(getattr(getattr(model, "decoder", None), "score_from", 0) or 0)
    encoder = TextEncoder(dictionary, args.spm_model, args.normalize)
    tokenizer = "sentencepiece " + args.spm_model if args.spm_model else "normalize " + encoder.normalize
    logger.info(f"text -> tokens: {tokenizer}")
    build = CandidateBuilder(encoder, dictionary.eos(), max_positions, routing_prefix)
    encoded = [encode_examples(examples, build, file) for _, file, examples in selected]
    for (spec, _, _), enc in zip(selected, encoded):
        warn_unknown_tokens(spec.name, enc, dictionary.unk())

    results = []
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
        for (spec, _, examples), enc in zip(selected, encoded):
            results.append(evaluate_task(
                model, spec, examples, build, dictionary.pad(), args.batch_size, device,
                show_progress=not args.no_progress, encoded=enc, unk=dictionary.unk()))

    print(format_table(results))
    report = {
        "checkpoint": str(Path(args.path).resolve()),
        "dict": str(dict_path.resolve()),
        "spm_model": args.spm_model,
        "normalize": encoder.normalize,
        "data_dir": str(args.data_dir),
        "max_positions": max_positions,
        "routing_prefix": routing_prefix,
        "device": device,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "batch_size": args.batch_size,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tasks": {r.task: {**r.to_json(), "file": str(file)}
                  for r, (_, file, _) in zip(results, selected)},
    }
    write_report(args, report, results)
    return report


def write_report(args, report: dict, results) -> None:
    """--output and --predictions, each written whole or not at all (an interrupted run
    leaves the previous file, never a truncated one)."""
    if args.output:
        atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    if args.predictions:
        with atomic_output(args.predictions) as tmp, open(tmp, "w") as f:
            for r in results:
                for record in r.prediction_records():
                    f.write(json.dumps(record) + "\n")


def cli_main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)  # the plugin's table of ranges (validation.py)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.max_examples is not None and args.max_examples < 1:
        parser.error("--max-examples must be >= 1")
    try:
        main(args)
    except (FileNotFoundError, TaskFileError, FlagError, UserError) as e:  # bad flag or file: a message, no traceback
        if debugging():
            raise
        parser.exit(2, f"{parser.prog}: error: {one_line(e)}\n")


if __name__ == "__main__":
    cli_main()
