"""Where sparsity pays: each sparse family against its dense counterpart, by expert count,
at equal FLOPs per token, on tokens the model has never trained on.

    python -m benchmarks.sparsity train [--regime single-pass|repeated] [--models NAME ...]
        [--precision fp32|bf16] [--lr 2e-3] [--max-train-tokens N] [--out PREFIX] [-- fairseq args]
    python -m benchmarks.sparsity render [--out PREFIX] [--partial]
    python -m benchmarks.sparsity list                      # the model names

Regimes (data prepared once into runs/sparsity/, data_prep.small_corpus):
  single-pass  WikiText-2 train + books-mix train (about 4.1M whitespace tokens, one 8k
               sentencepiece BPE over both), ONE pass (--epochs 1), dropout 0. Loss on unseen
               tokens two ways: the online training loss (every batch is scored by the forward
               that precedes its update: it has never been trained on) and the held-out
               validation loss (WikiText-2 valid + books-mix valid, --valid-blocks blocks spread
               evenly over it, evaluation mode).
  repeated     WikiText-2 only (the same BPE), several passes (--epochs, default 4), dropout 0.1:
               training loss and validation loss side by side, so each model's overfitting gap
               (valid - train) shows.

Models (`list`): the dense counterparts gmlp (gmlp_lm_tiny) and transformer
(transformer_lm_tiny); sMLP with E experts in the sMoE and the tMoE (smlp_eE), in the tMoE only
(smlp_tmoe_eE: one spatial matrix) and in the sMoE only (smlp_smoe_eE: one tMoE expert);
switch_eE, gshard_eE, hash_eE, base_eE; NAME_xd: the same with --expert-dropout 0.4; smlp_top1_eE
(diagnosis, not in the default set): sMLP with its tMoE routed like Switch (--tmoe-router top1). All *_tiny, FLOP-matched (docs/baselines.md): E changes
the parameters, not the FLOPs per token. Every model sees the same batches in the same order
(same data, seed, tokens per update), so curves are paired batch by batch.

Router health along the curves (at every evaluation, on the validation blocks, evaluation-mode
routing): load entropy (1.0 = every expert the same load), unused experts, and the share of
tokens whose (first) expert changed since the previous evaluation; the training log's per-batch
statistics (load max/min, dropped tokens, aux loss) averaged over each logging interval.

Output: the raw records DIR/raw/NAME.jsonl for PREFIX = DIR/NAME (records_file; the committed
studies' are in benchmarks/results/raw/), one JSON record per line, appended as the run goes (a
killed run loses at most the model in progress; a rerun skips every model already done):
  {"kind": "start", "model", "arch", "args", "params", "params_active", "flops_per_token", "meta"}
  {"kind": "train", "model", "tokens", "updates", "epoch", "nll", "seconds", "moe": {...}}   per interval
  {"kind": "eval",  "model", "tokens", "updates", "epoch", "valid_nll", "train_nll_epoch", "router": {...}}
  {"kind": "done",  "model", "seconds", "tokens"}
nll in nats per token. `render` writes PREFIX.json (summary), PREFIX.md (tables: final losses,
the token count at which each sparse model passes its dense counterpart) and PREFIX_*.png.
"""
import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks._results import run_metadata
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

# the code this process runs: read once at start (a checkout may move while a long run goes on)
CODE_COMMIT = os.popen(f"git -C {REPO} rev-parse --short HEAD").read().strip()
EXPERTS = (1, 4, 16, 64)
EXPERT_DROPOUT = 0.4
DENSE = {"gmlp": ("gmlp_lm_tiny", []), "transformer": ("transformer_lm_tiny", [])}


def sparse_models():
    """name -> (arch, extra fairseq args, dense counterpart, family, E)."""
    models = {}
    for e in EXPERTS:
        models[f"smlp_e{e}"] = ("smlp_lm_tiny", ["--smoe-experts", str(e), "--tmoe-experts", str(e)], "gmlp", "smlp", e)
        if e > 1:
            models[f"smlp_tmoe_e{e}"] = ("smlp_lm_tiny", ["--smoe-experts", "1", "--tmoe-experts", str(e)], "gmlp", "smlp_tmoe", e)
            models[f"smlp_smoe_e{e}"] = ("smlp_lm_tiny", ["--smoe-experts", str(e), "--tmoe-experts", "1"], "gmlp", "smlp_smoe", e)
            # diagnosis: the tMoE routed like Switch instead of the paper's Base-layer routing
            models[f"smlp_top1_e{e}"] = ("smlp_lm_tiny", ["--smoe-experts", str(e), "--tmoe-experts", str(e), "--tmoe-router", "top1"], "gmlp", "smlp_top1", e)
            models[f"switch_e{e}"] = ("switch_lm_tiny", ["--moe-experts", str(e)], "transformer", "switch", e)
            models[f"gshard_e{e}"] = ("gshard_lm_tiny", ["--moe-experts", str(e)], "transformer", "gshard", e)
            models[f"hash_e{e}"] = ("hash_lm_tiny", ["--moe-experts", str(e)], "transformer", "hash", e)
        models[f"base_e{e}"] = ("base_lm_tiny", ["--base-experts", str(e)], "transformer", "base", e)
    # the MoE literature's regularisation for repeated data: dropout inside the experts
    # (Switch Transformers: 0.4 in the experts, 0.1 elsewhere)
    for name in [n for n in models if models[n][4] > 1]:
        arch, extra, dense, family, e = models[name]
        models[f"{name}_xd"] = (arch, extra + ["--expert-dropout", str(EXPERT_DROPOUT)], dense, f"{family}_xd", e)
    return models


MODELS = {**{k: (*v, None, k, 0) for k, v in DENSE.items()}, **sparse_models()}
DEFAULT_MODELS = [m for m, spec in MODELS.items() if spec[4] in (0, 1, 4, 16) and not m.endswith("_xd") and spec[3] != "smlp_top1"]

REGIMES = {
    "single-pass": dict(corpus="wikitext-2+books-mix", epochs=1, dropout=0.0),
    "repeated": dict(corpus="wikitext-2", epochs=4, dropout=0.1),
}


def train_args(args):
    """fairseq-train options shared by every model of a run."""
    return [
        "--task", "smlp_language_modeling", "--criterion", "moe_cross_entropy",
        "--tokens-per-sample", "128", "--sample-break-mode", "none", "--max-tokens", str(args.tokens_per_update),
        "--required-batch-size-multiple", "1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
        "--lr", str(args.lr), "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup),
        "--weight-decay", "0.01", "--clip-norm", "1.0", "--dropout", str(args.dropout), "--cpu", "--num-workers", "0",
        "--seed", str(args.seed), "--moe-aux-loss-weight", "0.01",
    ]


# --------------------------------------------------------------------------- data
def prepare_data(regime: str, vocab_size: int) -> Path:
    """runs/sparsity/data: WikiText-2 + books-mix, one BPE. The repeated regime uses its
    WikiText-2 part only: the same BPE (spm.model), so the two regimes share a vocabulary."""
    from data_prep.common import binarize, encode_file
    from data_prep.small_corpus import prepare_small_corpus, shared_data_dir

    root = REPO / "runs" / "sparsity"
    joined = prepare_small_corpus(root / "data", corpus="wikitext-2+books-mix", bpe="sentencepiece", vocab_size=vocab_size, workers=1)
    if regime == "single-pass":
        return joined
    wiki = root / "wikitext-2"
    data_bin = wiki / "data-bin"
    if (data_bin / "train.bin").exists():
        return data_bin
    wiki.mkdir(parents=True, exist_ok=True)
    encoded = {}
    for split in ("train", "valid", "test"):
        encoded[split] = wiki / f"{split}.bpe"
        encode_file(shared_data_dir() / "wikitext-2" / f"{split}.txt", encoded[split], 1, spm_model=root / "data" / "spm.model")
    binarize(data_bin, encoded["train"], encoded["valid"], encoded["test"], workers=1, srcdict=joined / "dict.txt")
    return data_bin


# --------------------------------------------------------------------------- router health
ROUTER_TYPES = ("BaseRouter", "Top1Router", "Top2Router", "HashRouter")


class RouterProbe:
    """Records the first-choice expert of every token at each router during a forward."""

    def __init__(self, model):
        self.routers = {m.name: m for m in model.modules() if type(m).__name__ in ROUTER_TYPES}
        self.choices = {name: [] for name in self.routers}
        self.previous = {}
        self.handles = []

    def __enter__(self):
        self.choices = {name: [] for name in self.routers}
        for name, router in self.routers.items():
            self.handles.append(router.register_forward_hook(lambda m, i, out, name=name: self.choices[name].append(out[0][:, 0].clone())))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def health(self) -> dict:
        """{router: {entropy, unused, changed}} over the tokens of this forward; changed = share
        of tokens whose expert differs from the previous call's (same tokens, same order)."""
        out = {}
        for name, parts in self.choices.items():
            expert = torch.cat(parts)
            kept = expert[expert >= 0]
            num_experts = self.routers[name].num_experts
            load = torch.bincount(kept, minlength=num_experts).float()
            p = load / load.sum().clamp(min=1)
            entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(num_experts)) if num_experts > 1 else 1.0
            record = {"entropy": round(entropy, 4), "unused": int((load == 0).sum()), "load_max": round(float(p.max() * num_experts), 3)}
            if name in self.previous and self.previous[name].shape == expert.shape:
                record["changed"] = round(float((self.previous[name] != expert).float().mean()), 4)
            self.previous[name] = expert
            out[name] = record
        return out


# --------------------------------------------------------------------------- one model
def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def valid_indices(num_blocks: int, wanted: int):
    """`wanted` block indices spread evenly over the validation set (all when wanted <= 0)."""
    if wanted <= 0 or wanted >= num_blocks:
        return list(range(num_blocks))
    return [int(i * num_blocks / wanted) for i in range(wanted)]


@torch.no_grad()
def validate(run, indices, precision: str, probe: RouterProbe, batch_blocks: int = 16):
    """Mean NLL (nats/token) over the chosen validation blocks, evaluation mode; router health."""
    with probe:
        nll = validation_nll(run, indices, precision, batch_blocks)
    return nll, probe.health()


@torch.no_grad()
def validation_nll(run, indices, precision: str, batch_blocks: int = 16, training_routing: bool = False):
    """Mean NLL (nats/token) over the chosen validation blocks, evaluation mode (dropout off).
    training_routing: Base-style routers (BaseRouter) route as in training, by the balanced
    assignment of each batch of `batch_blocks` blocks, instead of greedily: a diagnostic of the
    train / evaluation routing mismatch (not a causal score: the assignment couples a batch)."""
    model, dataset = run.model, run.task.dataset("valid")
    pad = run.task.target_dictionary.pad()
    model.eval()
    if training_routing:
        for m in model.modules():
            if type(m).__name__ == "BaseRouter":
                m.train()
    total, count = 0.0, 0
    with autocast(precision):
        for start in range(0, len(indices), batch_blocks):
            sample = dataset.collater([dataset[i] for i in indices[start : start + batch_blocks]])
            output = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(output, log_probs=True).float()
            target = sample["target"]
            nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            real = target.ne(pad)
            total += float(nll[real].sum())
            count += int(real.sum())
    model.train()
    return total / count


def eval_schedule(total_tokens: int, points: int):
    """Token counts at which to evaluate: `points` evenly spaced, the first at 1/points."""
    return [round(total_tokens * (k + 1) / points) for k in range(points)]


def train_model(name: str, data_bin: Path, args, log) -> None:
    from benchmarks.compare import Run

    arch, extra, dense, family, experts = MODELS[name]
    torch.manual_seed(args.seed)
    run = Run(name, data_bin, args.fairseq, spec=(arch, extra), train_args=train_args(args))
    train_size = sum(int(s) for s in run.task.dataset("train").sizes)
    total = train_size * args.epochs
    if args.max_train_tokens:
        total = min(total, args.max_train_tokens)
    log({
        "kind": "start", "model": name, "arch": arch, "args": extra, "dense": dense, "family": family, "experts": experts,
        "params": run.params, "params_active": run.params_active, "flops_per_token": run.flops_per_token,
        "train_tokens_per_epoch": train_size, "planned_tokens": total,
        "commit": CODE_COMMIT,
    })
    indices = valid_indices(len(run.task.dataset("valid")), args.valid_blocks)
    probe = RouterProbe(run.model)
    evals = eval_schedule(total, args.points)
    sums = {"nll": 0.0, "n": 0, "moe": {}, "batches": 0, "seconds": 0.0}
    epoch_nll = [0.0, 0]  # training NLL of the current epoch so far (repeated regime: the train curve)
    tokens = updates = 0
    seconds = 0.0
    epoch = 1
    next_log = args.log_tokens
    while tokens < total:
        start = time.perf_counter()
        sample = next(run.batches, None)
        if sample is None:
            epoch += 1
            epoch_nll = [0.0, 0]
            run.epoch_itr = run.trainer.get_train_iterator(epoch, load_dataset=False)
            run.batches = run._epoch()
            continue
        with autocast(args.precision):
            out = run.trainer.train_step([sample])
        step = time.perf_counter() - start
        seconds += step
        n = float(out["sample_size"])
        nll = float(out["nll_loss"]) * math.log(2) * n  # fairseq logs bits/token, rounded to 1e-3
        tokens += int(sample["ntokens"])
        updates += 1
        sums["nll"] += nll
        sums["n"] += n
        sums["batches"] += 1
        sums["seconds"] += step
        epoch_nll[0] += nll
        epoch_nll[1] += n
        for key, value in out.items():
            if key.startswith(("moe_", "moe/")):  # the summary over layers, and per layer
                sums["moe"][key] = sums["moe"].get(key, 0.0) + float(value)
        if tokens >= next_log or tokens >= total:
            log({
                "kind": "train", "model": name, "tokens": tokens, "updates": updates, "epoch": epoch,
                "nll": sums["nll"] / sums["n"], "seconds": round(seconds, 2),
                "tokens_per_s": round(sums["n"] / max(sums["seconds"], 1e-9), 1),
                "moe": {k: round(v / sums["batches"], 4) for k, v in sums["moe"].items()},
            })
            sums = {"nll": 0.0, "n": 0, "moe": {}, "batches": 0, "seconds": 0.0}
            next_log += args.log_tokens
        if evals and tokens >= evals[0]:
            while evals and tokens >= evals[0]:
                evals.pop(0)
            valid_nll, router = validate(run, indices, args.precision, probe)
            record = {
                "kind": "eval", "model": name, "tokens": tokens, "updates": updates, "epoch": epoch,
                "valid_nll": valid_nll, "train_nll_epoch": epoch_nll[0] / max(epoch_nll[1], 1), "router": router,
            }
            if any(type(m).__name__ == "BaseRouter" for m in run.model.modules()):
                record["valid_nll_training_routing"] = validation_nll(run, indices, args.precision, training_routing=True)
            log(record)
    log({"kind": "done", "model": name, "seconds": round(seconds, 1), "tokens": tokens, "updates": updates})
    del run, probe  # the next model starts from a clean slate (a long queue runs in one process)
    gc.collect()


# --------------------------------------------------------------------------- records
def _file(prefix: Path, suffix: str) -> Path:
    """PREFIX + suffix (not Path.with_suffix: a prefix like runs/lr_0.002 has a dot of its own)."""
    return Path(f"{prefix}{suffix}")


def records_file(prefix: Path) -> Path:
    """The raw records of PREFIX = DIR/NAME: DIR/raw/NAME.jsonl, next to the rendered PREFIX.json,
    PREFIX.md and PREFIX_*.png."""
    prefix = Path(prefix)
    return prefix.parent / "raw" / f"{prefix.name}.jsonl"


def read_records(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished_models(records):
    return {r["model"] for r in records if r["kind"] == "done"}


def drop_unfinished(path: Path) -> None:
    """A model killed mid-run is trained again from the start: forget its partial records."""
    records = read_records(path)
    done = finished_models(records)
    kept = [r for r in records if r["kind"] == "meta" or r.get("model") in done]
    if len(kept) != len(records):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def by_model(records):
    """model -> {"start": {...}, "train": [...], "eval": [...], "done": {...}}."""
    models = {}
    for r in records:
        if r["kind"] == "meta":
            continue
        m = models.setdefault(r["model"], {"train": [], "eval": []})
        if r["kind"] in ("train", "eval"):
            m[r["kind"]].append(r)
        else:
            m[r["kind"]] = r
    return {k: v for k, v in models.items() if "done" in v}


def with_unfinished(records):
    """by_model, plus the models that did not finish (still training, or stopped), cut at their
    last record: marked "partial", their "done" taken from their last training interval."""
    models = by_model(records)
    unfinished = {r["model"]: {"start": r, "train": [], "eval": [], "partial": True}
                  for r in records if r["kind"] == "start" and r["model"] not in models}
    for r in records:
        if r["kind"] in ("train", "eval") and r["model"] in unfinished:
            unfinished[r["model"]][r["kind"]].append(r)
    for m in unfinished.values():
        if m["train"]:
            m["done"] = {"tokens": m["train"][-1]["tokens"], "seconds": m["train"][-1]["seconds"]}
    return {**models, **{k: v for k, v in unfinished.items() if v["train"]}}


# --------------------------------------------------------------------------- analysis
def paired_crossover(sparse, dense, key="nll"):
    """Token count from which the sparse curve stays below the dense one to the end (points
    paired by index: the same batches), or None if it is not below at the end.
    sparse, dense: lists of {"tokens", key}."""
    n = min(len(sparse), len(dense))
    if n == 0 or sparse[n - 1][key] >= dense[n - 1][key]:
        return None
    k = n - 1
    while k > 0 and sparse[k - 1][key] < dense[k - 1][key]:
        k -= 1
    return sparse[k]["tokens"]


def tail_mean(points, key, share=0.1):
    """Mean of `key` over the last `share` of the points (the end of the pass, less noisy than one interval)."""
    k = max(1, round(len(points) * share))
    return sum(p[key] for p in points[-k:]) / k


def summarize(models: dict) -> dict:
    rows = {}
    for name, m in models.items():
        start, train, evals = m["start"], m["train"], m["eval"]
        row = {
            "arch": start["arch"], "family": start["family"], "experts": start["experts"], "dense": start["dense"],
            "params": start["params"], "params_active": start["params_active"], "flops_per_token": start["flops_per_token"],
            "tokens": m["done"]["tokens"], "seconds": m["done"]["seconds"],
            "final_online_nll": tail_mean(train, "nll"), "final_valid_nll": evals[-1]["valid_nll"] if evals else None,
            "final_train_nll_epoch": evals[-1]["train_nll_epoch"] if evals else None,
            "best_valid_nll": min(e["valid_nll"] for e in evals) if evals else None,
            "partial": bool(m.get("partial")),
        }
        dense = models.get(start["dense"]) if start["dense"] else None
        if dense and m.get("partial"):  # compare at the tokens the partial run reached
            dense = {"train": dense["train"][: len(train)], "eval": dense["eval"][: len(evals)]}
        if dense and dense["train"] and dense["eval"]:
            row["online_crossover_tokens"] = paired_crossover(train, dense["train"], "nll")
            row["valid_crossover_tokens"] = paired_crossover(evals, dense["eval"], "valid_nll")
            d_online, d_valid = tail_mean(dense["train"], "nll"), dense["eval"][-1]["valid_nll"]
            row["online_ppl_gap_pct"] = 100 * (math.exp(row["final_online_nll"] - d_online) - 1)
            row["valid_ppl_gap_pct"] = 100 * (math.exp(row["final_valid_nll"] - d_valid) - 1)
        routers = evals[-1]["router"] if evals else {}
        if routers:
            row["router_entropy"] = sum(r["entropy"] for r in routers.values()) / len(routers)
            row["router_unused"] = sum(r["unused"] for r in routers.values())
            changed = [r["changed"] for r in routers.values() if "changed" in r]
            row["router_changed"] = sum(changed) / len(changed) if changed else None
        rows[name] = row
    return rows


def _ppl(nll):
    return "-" if nll is None else f"{math.exp(nll):.2f}"


def _tok(t):
    return "does not pass" if t is None else f"{t / 1e6:.2f}M"


def _pct(x):
    return "-" if x is None else f"{x:+.1f}%"


def write_markdown(path: Path, meta: dict, rows: dict) -> None:
    regime = meta["regime"]
    lines = [
        f"# Where sparsity pays: {regime}", "",
        *(["Commands (each appended its models' records to this file):", "",
           *[f"    {c}" for c in meta["commands"]], ""] if len(meta.get("commands", [])) > 1 else [f"Command: `{meta['command']}`", ""]),
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), precision {meta['precision']}. "
        f"Data: {meta['data']}. {meta['epochs']} pass(es), tokens per update {meta['tokens_per_update']}, 128-token blocks, "
        f"Adam lr {meta['lr']} (inverse sqrt, {meta['warmup']} warm-up updates), dropout {meta['dropout']}, seed {meta['seed']}. "
        f"Validation: {meta['valid_blocks']} blocks spread over the validation set, evaluation mode.", "",
    ]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    online = "online train ppl (end of pass)" if regime == "single-pass" else "train ppl (last epoch, training mode)"
    lines += [
        f"| model | E | params total / active | FLOPs/token | {online} | valid ppl | vs dense (online) | vs dense (valid) | "
        "passes dense at (online) | passes dense at (valid) | router entropy / unused / changed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = sorted(rows, key=lambda n: (rows[n]["dense"] or n, rows[n]["family"], rows[n]["experts"]))
    for name in order:
        r = rows[name]
        train_col = r["final_online_nll"] if regime == "single-pass" else r["final_train_nll_epoch"]
        router = "-"
        if "router_entropy" in r:
            changed = "-" if r.get("router_changed") is None else f"{r['router_changed']:.3f}"
            router = f"{r['router_entropy']:.3f} / {r['router_unused']} / {changed}"
        label = f"{name} (stopped at {r['tokens'] / 1e6:.2f}M tokens)" if r.get("partial") else name
        lines.append(
            f"| {label} | {r['experts'] or '-'} | {r['params'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.2f}M | "
            f"{_ppl(train_col)} | {_ppl(r['final_valid_nll'])} | {_pct(r.get('online_ppl_gap_pct'))} | {_pct(r.get('valid_ppl_gap_pct'))} | "
            + (f"{_tok(r.get('online_crossover_tokens'))} | {_tok(r.get('valid_crossover_tokens'))} | " if r["dense"] else "- | - | ")
            + f"{router} |"
        )
    lines += [
        "",
        "vs dense: perplexity of the sparse model over its dense counterpart's (gmlp for sMLP, transformer for the "
        "Transformer MoEs), minus 1; negative = the sparse model is better. Online: mean over the last 10% of the "
        "training intervals (each batch scored before its update). Passes dense at: the token count from which the "
        "sparse curve stays below the dense one to the end (paired intervals / evaluations). A model marked "
        "'stopped at' did not finish the pass (render --partial): it is compared with its dense counterpart at the "
        "same tokens.",
        "Router health at the last evaluation, averaged over the MoE layers: load entropy (1 = balanced), unused "
        "experts (summed over layers), share of tokens whose first expert changed since the previous evaluation.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def write_plots(prefix: Path, meta: dict, models: dict) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = {"smlp": "gmlp", "transformer_moe": "transformer"}
    for group, dense in groups.items():
        names = [n for n, m in models.items() if m["start"]["dense"] == dense or n == dense]
        if len(names) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for name in sorted(names):
            m = models[name]
            style = dict(lw=2.5, color="black") if name == dense else dict(lw=1.2)
            ls = {1: ":", 4: "--", 16: "-", 64: "-."}.get(m["start"]["experts"], "-")
            if meta["regime"] == "single-pass":
                axes[0].plot([p["tokens"] for p in m["train"]], [math.exp(p["nll"]) for p in m["train"]], ls=ls, label=name, **style)
            else:
                axes[0].plot([p["tokens"] for p in m["eval"]], [math.exp(p["train_nll_epoch"]) for p in m["eval"]], ls=ls, label=name, **style)
            axes[1].plot([p["tokens"] for p in m["eval"]], [math.exp(p["valid_nll"]) for p in m["eval"]], ls=ls, marker="o", ms=3, label=name, **style)
        axes[0].set_title("online training ppl (each batch before its update)" if meta["regime"] == "single-pass" else "training ppl (epoch so far, training mode)")
        axes[1].set_title("validation ppl (held out)")
        for ax in axes:
            ax.set_xlabel("training tokens")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        all_final = [math.exp(p["valid_nll"]) for n in names for p in models[n]["eval"][-3:]]
        if all_final:
            lo, hi = min(all_final), max(all_final)
            for ax in axes:
                ax.set_ylim(lo * 0.9, hi * 2.5)
        axes[1].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{meta['regime']}: {group} vs {dense} ({meta['data']})")
        fig.tight_layout()
        out = f"{prefix}_{group}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    written += write_router_plot(prefix, meta, models, plt)
    return written


def write_router_plot(prefix: Path, meta: dict, models: dict, plt) -> list:
    """Router health along the curves: load entropy and the share of tokens whose expert changed
    since the previous evaluation, each averaged over the model's routers."""
    routed = {n: m for n, m in models.items() if any(e["router"] for e in m["eval"])}
    if not routed:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in sorted(routed):
        evals = [e for e in routed[name]["eval"] if e["router"]]
        tokens = [e["tokens"] for e in evals]
        ls = {4: "--", 16: "-", 64: "-."}.get(routed[name]["start"]["experts"], ":")
        mean = lambda e, k: sum(r.get(k, float("nan")) for r in e["router"].values()) / len(e["router"])  # noqa: E731
        axes[0].plot(tokens, [mean(e, "entropy") for e in evals], ls=ls, label=name)
        axes[1].plot(tokens, [sum(r["unused"] for r in e["router"].values()) for e in evals], ls=ls, label=name)
        axes[2].plot(tokens[1:], [mean(e, "changed") for e in evals[1:]], ls=ls, label=name)
    titles = ("load entropy (1 = balanced), evaluation routing", "unused experts (all layers)", "tokens whose expert changed since the previous evaluation")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens")
        ax.grid(True, alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{meta['regime']}: router health on the validation blocks")
    fig.tight_layout()
    out = f"{prefix}_router.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [out]


def cut_at(models: dict, until_tokens: int, tokens_per_update: int) -> dict:
    """Every model as it was after `until_tokens` training tokens (one update of slack: two runs
    with different evaluation schedules cross a threshold one update apart)."""
    limit = until_tokens + tokens_per_update
    cut = {}
    for name, m in models.items():
        train = [r for r in m["train"] if r["tokens"] <= limit]
        evals = [r for r in m["eval"] if r["tokens"] <= limit]
        if train:
            cut[name] = {**m, "train": train, "eval": evals,
                         "done": {"tokens": train[-1]["tokens"], "seconds": train[-1]["seconds"]}}
    return cut


def render(prefix: Path, partial: bool = False, until_tokens: int = 0) -> None:
    records = read_records(records_file(prefix))
    metas = [r for r in records if r["kind"] == "meta"]
    if not metas:
        raise SystemExit(f"{records_file(prefix)}: no records")
    meta = {**metas[-1], "commands": list(dict.fromkeys(m["command"] for m in metas))}
    models = with_unfinished(records) if partial else by_model(records)
    if until_tokens:
        models = cut_at(models, until_tokens, meta["tokens_per_update"])
        meta = {**meta, "note": f"{meta.get('note') or ''} Every model as it was at {until_tokens:,} training tokens (render --until-tokens).".strip()}
    rows = summarize(models)
    atomic_write_text(_file(prefix, ".json"), json.dumps({"meta": meta, "invocations": metas, "rows": rows}, indent=2) + "\n")
    write_markdown(_file(prefix, ".md"), meta, rows)
    plots = write_plots(prefix, meta, models)
    print(f"wrote {prefix}.json, {prefix}.md, {', '.join(plots)}")


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparsity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["train", "render", "list"])
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


if __name__ == "__main__":
    main()
