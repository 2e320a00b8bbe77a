"""Quality per compute: every model family trained for the same wall-clock, side by side.

    python -m benchmarks.compare [--minutes 5] [--threads 1] [--models smlp smlp_partial switch ...]
        [--corpus wikitext-2 | wikitext-2+books-mix | --data-bin DIR] [--precision fp32|bf16]
        [--experts E] [--max-epochs N] [--out benchmarks/results/compare] [-- fairseq-train options]

Models: sMLP (deterministic and partial-prediction routing) and every baseline family at the
tiny, FLOP-matched size (docs/baselines.md). Same data (default: WikiText-2 from
$SMLP_SHARED_DATA, default ../shared/data, with an 8k sentencepiece BPE, prepared once into
runs/compare/data), same tokens per batch, same optimizer and schedule, same seed, same
wall-clock budget each.

--corpus wikitext-2+books-mix with --max-epochs 1: the unrepeated regime (no model sees a token
twice; a model that finishes its pass stops there). --precision bf16: autocast around forward
(fairseq-train's --cpu --bf16 path: fp32 weights and optimizer state, fp32 routing), the
fastest CPU path; validation runs under the same autocast. --experts E: every sparse
family with E experts (--smoe-experts/--tmoe-experts, --moe-experts, --base-experts).

Noise: all models live in ONE process and train round-robin, one slice of their budget per
turn, so that a change in machine load hits every model alike; each model's clock counts
only its own training steps (fairseq's Trainer.train_step, data loading included). A model
is validated, untimed, when its clock first passes k x budget / `--points` (k = 1..points),
over the whole validation set (`--valid-blocks N`: the first N blocks only).

Scoring: partial-prediction sMLP reads the first P = 0.2 T tokens of a block to route, so it
is scored on positions >= P only (as fairseq-eval-lm does with our task). To compare like with
like, EVERY model is scored on exactly those positions (`ppl`); `ppl_all_positions` is the
ordinary perplexity over all positions (absent for the partial model).

Writes OUT.json (every validation point and the run's metadata), OUT.md (table) and
OUT_ppl_vs_time.png, OUT_ppl_vs_tokens.png.
"""
import argparse
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from benchmarks._results import run_metadata
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

# name -> (arch, extra fairseq args)
MODELS = {
    "smlp": ("smlp_lm_tiny", []),
    "smlp_partial": ("smlp_lm_tiny", ["--smoe-routing", "partial"]),
    # the tMoE routed like Switch: the fix the sparsity study found (benchmarks/results/sparsity.md)
    "smlp_top1": ("smlp_lm_tiny", ["--tmoe-router", "top1"]),
    # the router study's recommendation (docs/routers.md): top-1 with no training capacity
    "smlp_top1_dropless": ("smlp_lm_tiny", ["--tmoe-router", "top1", "--tmoe-train-capacity-factor", "0"]),
    "gmlp": ("gmlp_lm_tiny", []),
    "transformer": ("transformer_lm_tiny", []),
    "switch": ("switch_lm_tiny", []),
    "gshard": ("gshard_lm_tiny", []),
    "base": ("base_lm_tiny", []),
    "hash": ("hash_lm_tiny", []),
}
SMLP = ("smlp", "smlp_partial", "smlp_top1", "smlp_top1_dropless")
TRAIN_ARGS = [  # shared by every model; Adam and schedule as in the quickstart, shorter warmup
    "--task", "smlp_language_modeling", "--criterion", "moe_cross_entropy",
    "--tokens-per-sample", "128", "--sample-break-mode", "none", "--max-tokens", "2048",
    "--required-batch-size-multiple", "1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
    "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100",
    "--weight-decay", "0.01", "--clip-norm", "1.0", "--dropout", "0.1", "--cpu", "--num-workers", "0",
    "--seed", "1", "--moe-aux-loss-weight", "0.01",
]


EXPERT_FLAGS = {  # --experts E: the flags that set E for each family
    "smlp": ["--smoe-experts", "--tmoe-experts"], "smlp_partial": ["--smoe-experts", "--tmoe-experts"],
    "smlp_top1": ["--smoe-experts", "--tmoe-experts"], "smlp_top1_dropless": ["--smoe-experts", "--tmoe-experts"],
    "switch": ["--moe-experts"], "gshard": ["--moe-experts"], "hash": ["--moe-experts"], "base": ["--base-experts"],
}


def model_spec(name: str, experts: int = 0):
    """(arch, extra args) of a model, with E experts in its MoE layers when experts > 0."""
    arch, extra = MODELS[name]
    if experts:
        extra = extra + [a for flag in EXPERT_FLAGS.get(name, []) for a in (flag, str(experts))]
    return arch, extra


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def prepare_data(args) -> Path:
    if args.data_bin:
        return Path(args.data_bin)
    from data_prep.small_corpus import prepare_small_corpus

    folder = "data" if args.corpus == "wikitext-2" else args.corpus  # runs/compare/data: the committed WikiText-2 run
    return prepare_small_corpus(
        REPO / "runs" / "compare" / folder, corpus=args.corpus, bpe="sentencepiece", vocab_size=args.vocab_size
    )


class Run:
    """One model with its fairseq Trainer, data iterator and own training clock."""

    def __init__(self, name: str, data_bin: Path, user_args, spec=None, train_args=TRAIN_ARGS):
        """spec: (arch, extra fairseq args) of the model (default MODELS[name]); train_args:
        the fairseq-train options shared by every model (the sparsity study, benchmarks/sparsity, passes its own)."""
        from fairseq import options, tasks
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        from fairseq.trainer import Trainer

        arch, extra = spec or MODELS[name]
        argv = [str(data_bin), "--user-dir", str(REPO / "fairseq_smlp"), "--arch", arch, *train_args, *extra, *user_args]
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
        torch.manual_seed(cfg.common.seed)
        self.name, self.arch, self.cfg = name, arch, cfg
        self.task = tasks.setup_task(cfg.task)
        self.task.load_dataset("valid")
        self.model = self.task.build_model(cfg.model)
        criterion = self.task.build_criterion(cfg.criterion)
        self.trainer = Trainer(cfg, self.task, self.model, criterion)
        self.epoch_itr = self.trainer.get_train_iterator(epoch=1, load_dataset=True)
        self.batches = self._epoch()
        self.seconds, self.tokens, self.points = 0.0, 0, []
        self.precision, self.max_epochs, self.exhausted = "fp32", 0, False  # set by main()
        self.longest_step = 0.0  # a clock passes its target by less than this
        from fairseq_smlp.flops import count_flops, count_params

        params = count_params(self.model)
        self.params, self.params_active = params["total"], params["active"]
        self.flops_per_token = count_flops(self.model, cfg.task.tokens_per_sample)["total"]

    def _epoch(self):
        self.trainer.begin_epoch(self.epoch_itr.epoch)
        return iter(self.epoch_itr.next_epoch_itr(shuffle=True))

    def next_epoch(self) -> None:
        """Start the next pass over the training data (fairseq's own epoch bookkeeping)."""
        self.epoch_itr = self.trainer.get_train_iterator(self.epoch_itr.epoch + 1, load_dataset=False)
        self.batches = self._epoch()

    def train_until(self, stop: float) -> None:
        """Train until this model's clock reaches `stop` seconds (an absolute target, so that
        the overshoot of one slice does not carry into the next validation point)."""
        while self.seconds < stop and not self.exhausted:
            start = time.perf_counter()
            sample = next(self.batches, None)
            if sample is None:  # end of the data: next epoch (fairseq's own epoch bookkeeping)
                if self.max_epochs and self.epoch_itr.epoch >= self.max_epochs:
                    self.exhausted = True  # one pass at most: the model stops where its data ends
                    break
                self.next_epoch()
                sample = next(self.batches)
            self.trainer.train_step([sample])
            step = time.perf_counter() - start
            self.seconds += step
            self.longest_step = max(self.longest_step, step)
            self.tokens += int(sample["ntokens"])

    def valid_batches(self, max_blocks: int, spread: bool):
        """Batches of the first `max_blocks` validation blocks (0: all), or with `spread` that many
        blocks evenly spaced over the whole set (a validation set made of several corpora one
        after the other is then sampled from each)."""
        valid = self.task.dataset("valid")
        max_blocks = max_blocks or len(valid)
        per_batch = max(1, self.cfg.dataset.max_tokens // self.cfg.task.tokens_per_sample)
        if spread and max_blocks < len(valid):
            chosen = [int(i * len(valid) / max_blocks) for i in range(max_blocks)]
            return (valid.collater([valid[i] for i in chosen[k : k + per_batch]]) for k in range(0, len(chosen), per_batch))
        itr = self.task.get_batch_iterator(
            valid, max_tokens=self.cfg.dataset.max_tokens, max_positions=None, required_batch_size_multiple=1,
            seed=1, num_workers=0, ignore_invalid_inputs=False,
        ).next_epoch_itr(shuffle=False)
        return itertools.islice(itr, -(-min(max_blocks, len(valid)) // per_batch))

    @torch.no_grad()
    def validate(self, prefix: int, max_blocks: int, elapsed: float, spread: bool = False) -> dict:
        """Validation NLL on positions >= prefix (every model) and on all positions, over the
        validation blocks of valid_batches (the same blocks for every model).
        `elapsed`: wall-clock since the comparison started (all models, validation included)."""
        self.model.eval()
        itr = self.valid_batches(max_blocks, spread)
        pad = self.task.target_dictionary.pad()
        sums = {"suffix": [0.0, 0], "all": [0.0, 0]}
        for sample in itr:
            with autocast(self.precision):
                output = self.model(**sample["net_input"])
            lprobs = self.model.get_normalized_probs(output, log_probs=True).float()  # (B, T, V)
            target = sample["target"]
            nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
            real = target.ne(pad)
            suffix = real.clone()
            suffix[:, :prefix] = False
            for key, mask in (("suffix", suffix), ("all", real)):
                sums[key][0] += float(nll[mask].sum())
                sums[key][1] += int(mask.sum())
        self.model.train()
        point = {
            "updates": self.trainer.get_num_updates(), "tokens": self.tokens, "seconds": round(self.seconds, 2),
            "elapsed": round(elapsed, 1),
            "ppl": math.exp(sums["suffix"][0] / sums["suffix"][1]),
        }
        if getattr(self.model.decoder, "score_from", 0) == 0:  # a partial model's early positions are not predictions
            point["ppl_all_positions"] = math.exp(sums["all"][0] / sums["all"][1])
        self.points.append(point)
        return point


def default_prefix(data_bin: Path) -> int:
    """P of a partial-prediction smlp_lm_tiny on these blocks, when none is among the models."""
    return Run("smlp_partial", data_bin, []).model.decoder.score_from


def time_to_reach(points, target_ppl):
    """Seconds at which a validation curve first reaches target_ppl (linear interpolation
    between the two points around it), or None if it never does."""
    previous = None
    for p in points:
        if p["ppl"] <= target_ppl:
            if previous is None:
                return p["seconds"]
            frac = (previous["ppl"] - target_ppl) / (previous["ppl"] - p["ppl"])
            return previous["seconds"] + frac * (p["seconds"] - previous["seconds"])
        previous = p
    return None


def summarize(result: dict) -> dict:
    """Final ppl, tokens/s, and the time each model needs to reach the best baseline's final ppl."""
    models = result["models"]
    baselines = [m for m in models if m not in SMLP]
    best = min(baselines, key=lambda m: models[m]["points"][-1]["ppl"]) if baselines else None
    target = models[best]["points"][-1]["ppl"] if best else None
    rows = {}
    for name, m in models.items():
        last = m["points"][-1]
        reach = time_to_reach(m["points"], target) if target else None
        rows[name] = {
            "final_ppl": last["ppl"], "final_ppl_all_positions": last.get("ppl_all_positions"),
            "tokens_per_s": last["tokens"] / last["seconds"], "updates": last["updates"],
            "seconds_to_best_baseline": reach,
        }
    for name, row in rows.items():  # each sMLP's time to this model's final ppl, over this model's time
        row["time_fractions"] = {}
        for variant in [v for v in SMLP if v in models and v != name]:
            reach = time_to_reach(models[variant]["points"], row["final_ppl"])
            row["time_fractions"][variant] = reach / models[name]["points"][-1]["seconds"] if reach is not None else None
    for row in rows.values():  # each model's time to the target over sMLP's
        smlp = rows.get("smlp", {}).get("seconds_to_best_baseline")
        row["time_ratio_to_smlp"] = row["seconds_to_best_baseline"] / smlp if smlp and row["seconds_to_best_baseline"] else None
    summary = {"best_baseline": best, "target_ppl": target, "rows": rows}
    if best:
        for name in SMLP:
            if name in rows and rows[name]["seconds_to_best_baseline"] is not None:
                summary[f"{name}_time_fraction_of_best_baseline"] = (
                    rows[name]["seconds_to_best_baseline"] / models[best]["points"][-1]["seconds"]
                )
    return summary


def _fmt(value, spec, missing="not reached"):
    return missing if value is None else format(value, spec)


def _millions(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def _params(m: dict) -> str:
    active = f" / {_millions(m['params_active'])}" if "params_active" in m else ""  # absent in older results
    return f"{_millions(m['params'])}{active}"


def _blocks(valid_blocks: int, spread: bool = False) -> str:
    if not valid_blocks:
        return "the whole validation set"
    return f"{valid_blocks} validation blocks spread evenly over the set" if spread else f"the first {valid_blocks} validation blocks"


def write_markdown(path: Path, result: dict) -> None:
    s, meta = result["summary"], result["meta"]
    variants = [v for v in SMLP if v in result["models"]]  # the sMLPs whose time to each final ppl is shown
    lines = [
        "# sMLP and the baselines at equal wall-clock (CPU)", "",
        f"Command: `{meta['command']}`", "",
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s); load average "
        f"{meta['load_before']} before, {meta['load_after']} after. Data: {meta['data']}. "
        f"{meta['minutes']} min of training per model, round-robin in {meta['points']} slices, validated "
        f"after each; tokens per update {meta['tokens_per_update']}, 128-token blocks, Adam lr 2e-3 "
        f"(inverse sqrt, 100 warm-up updates), dropout 0.1"
        + (f"; then `{' '.join(meta['extra'])}`" if meta.get("extra") else "")
        + f". Precision {meta.get('precision', 'fp32')}"
        + (f"; at most {meta['max_epochs']} pass(es) over the training data" if meta.get("max_epochs") else "")
        + (f"; {meta['experts']} experts in every MoE layer" if meta.get("experts") else "") + ".", "",
        f"ppl: validation perplexity over {_blocks(meta['valid_blocks'], meta.get('valid_spread', False))}, on positions >= {meta['prefix']} of each 128-token block (what the partial-prediction "
        "model can be scored on), the same positions for every model; all-pos: over all positions.", "",
        *([f"Note: {meta['note']}", ""] if meta.get("note") else []),
        f"Best baseline: **{s['best_baseline']}**, final ppl {s['target_ppl']:.2f}.", "",
        "| model | arch | params total / active | fwd FLOPs/token | updates | tokens/s | final ppl | final ppl all-pos "
        "| s to best baseline's ppl | ratio to smlp |" + "".join(f" {v}'s time to this final ppl |" for v in variants),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(variants),
    ]
    for name, row in sorted(s["rows"].items(), key=lambda kv: kv[1]["final_ppl"]):
        m = result["models"][name]
        lines.append(
            f"| {name} | {m['arch']} | {_params(m)} | {_millions(m.get('flops_per_token'))} | "
            f"{row['updates']} | {row['tokens_per_s']:,.0f} | "
            f"{row['final_ppl']:.2f} | {_fmt(row['final_ppl_all_positions'], '.2f', '-')} | "
            f"{_fmt(row['seconds_to_best_baseline'], '.0f')} | {_fmt(row['time_ratio_to_smlp'], '.2f')} |"
            + "".join(f" {_fmt(row['time_fractions'].get(v), '.2f', '-')} |" for v in variants)
        )
    lines.append("")
    for name in SMLP:
        key = f"{name}_time_fraction_of_best_baseline"
        if key in s:
            lines.append(
                f"- {name} reaches the best baseline's final ppl in **{s[key]:.2f}x** that baseline's wall-clock "
                "(the paper's claim: <= 0.5)."
            )
        elif name in s["rows"]:
            lines.append(f"- {name} does not reach the best baseline's final ppl within the budget.")
    lines += [
        "", "Last columns: the wall-clock each sMLP needed to reach that model's final perplexity, as a fraction "
        "of that model's own training time (the paper's efficiency claim is <= 0.5 against the Transformer MoEs).",
    ]
    lines += ["", f"Plots: `{Path(meta['out']).name}_ppl_vs_time.png`, `{Path(meta['out']).name}_ppl_vs_tokens.png`.", ""]
    atomic_write_text(path, "\n".join(lines))


def write_plots(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, label, suffix in (("seconds", "training wall-clock (s)", "time"), ("tokens", "training tokens", "tokens")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, m in result["models"].items():
            ax.plot([p[x_key] for p in m["points"]], [p["ppl"] for p in m["points"]], marker="o", ms=3, label=name,
                    lw=2.5 if name in SMLP else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation ppl (positions >= {result['meta']['prefix']})")
        ax.set_title(f"{result['meta']['data']}, {result['meta']['minutes']} min per model")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{out}_ppl_vs_{suffix}.png", dpi=110)
        plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock per model")
    p.add_argument("--points", type=int, default=6, help="validation points (round-robin slices) per model")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--corpus", default="wikitext-2", choices=["wikitext-2", "ptb", "wikitext-2+books-mix"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (fp32 weights and routing)")
    p.add_argument("--experts", type=int, default=0, help="experts of every MoE layer of every sparse family (0: the archs' defaults)")
    p.add_argument("--max-epochs", type=int, default=0, help="passes over the training data at most (0: no limit)")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary of the prepared corpus")
    p.add_argument("--data-bin", help="an existing fairseq data-bin instead of --corpus")
    p.add_argument("--valid-blocks", type=int, default=1024,
                   help="validation blocks scored at each point: the first N (0: the whole validation set)")
    p.add_argument("--valid-spread", action="store_true",
                   help="the --valid-blocks blocks evenly spaced over the validation set instead of the first ones")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared 2-core machine)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compare"))
    p.add_argument("--render", action="store_true", help="only rewrite OUT.md and the plots from OUT.json")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more fairseq-train options for every model")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.points < 1:
        p.error("--minutes must be > 0 and --points >= 1")
    return args


def render(out: Path) -> None:
    """Rewrite the table and plots of an existing OUT.json (e.g. after changing the report)."""
    result = json.loads(out.with_suffix(".json").read_text())
    result["summary"] = summarize(result)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), result)
    write_plots(out, result)


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render(Path(args.out))
    torch.set_num_threads(args.threads)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import fairseq_smlp  # noqa: F401  (registers the archs, task and criterion)

    data_bin = prepare_data(args)
    load_before = round(os.getloadavg()[0], 2)
    user_args = [a for a in args.extra if a != "--"]
    if args.precision == "bf16":
        user_args = ["--bf16", *user_args]  # the plugin's CPU bf16 path: autocast in the Trainer
    runs = [Run(name, data_bin, user_args, spec=model_spec(name, args.experts)) for name in args.models]
    for run in runs:
        run.precision, run.max_epochs = args.precision, args.max_epochs
    # score every model from the partial model's prefix P (or what its default would be)
    prefix = max([getattr(r.model.decoder, "score_from", 0) for r in runs] + [0]) or default_prefix(data_bin)
    slice_seconds = args.minutes * 60 / args.points
    start = time.perf_counter()
    out = Path(args.out)
    for turn in range(args.points):
        for run in runs:
            run.train_until((turn + 1) * slice_seconds)
            point = run.validate(prefix, args.valid_blocks, time.perf_counter() - start, args.valid_spread)
            print(f"[{turn + 1}/{args.points}] {run.name:13} {point}", flush=True)
        write_results(out, args, argv, runs, data_bin, user_args, prefix, load_before)  # a long run keeps what it measured
    print(f"wrote {out}.json, {out}.md and the plots")


def write_results(out: Path, args, argv, runs, data_bin, user_args, prefix, load_before) -> None:
    result = {
        "meta": {
            **run_metadata("compare.py", argv), "load_before": load_before,
            "load_after": round(os.getloadavg()[0], 2), "data": str(data_bin) if args.data_bin else f"{args.corpus}, {args.vocab_size} sentencepiece BPE",
            "precision": args.precision, "experts": args.experts, "max_epochs": args.max_epochs, "extra": user_args,
            "minutes": args.minutes, "points": args.points, "valid_blocks": args.valid_blocks, "valid_spread": args.valid_spread, "prefix": prefix, "tokens_per_update": runs[0].cfg.dataset.max_tokens, "out": str(out),
        },
        "models": {
            r.name: {"arch": r.arch, "args": model_spec(r.name, args.experts)[1], "exhausted": r.exhausted, "params": r.params, "params_active": r.params_active, "flops_per_token": r.flops_per_token,
                     "longest_step_seconds": round(r.longest_step, 3), "points": r.points}
            for r in runs
        },
    }
    result["summary"] = summarize(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), result)
    write_plots(out, result)


if __name__ == "__main__":
    main()
