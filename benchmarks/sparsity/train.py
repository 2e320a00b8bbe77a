"""Training the study's models: one model at a time through fairseq's Trainer (benchmarks.compare.Run),
the same batches in the same order for every model, its training and validation curves and router
health appended to the raw records."""
import gc
import math
import os
import time
from pathlib import Path

import torch

from benchmarks.compare import autocast
from benchmarks.sparsity.models import MODELS

REPO = Path(__file__).resolve().parents[2]
# the code this process runs: read once at start (a checkout may move while a long run goes on)
CODE_COMMIT = os.popen(f"git -C {REPO} rev-parse --short HEAD").read().strip()


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
class RouterProbe:
    """Records the first-choice expert of every token at each token router during a forward;
    entropy and changed are defined as in the training log (fairseq_smlp/moe/health.py)."""

    def __init__(self, model):
        # token routers (Router.remembers_choices); not sMoE's channel router
        self.routers = {m.name: m for m in model.modules() if getattr(m, "remembers_choices", False)}
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
        from fairseq_smlp.moe.health import changed_tokens, load_entropy

        out = {}
        for name, parts in self.choices.items():
            expert = torch.cat(parts)
            kept = expert[expert >= 0]
            num_experts = self.routers[name].num_experts
            load = torch.bincount(kept, minlength=num_experts).float()
            p = load / load.sum().clamp(min=1)
            entropy = float(load_entropy(load))
            record = {"entropy": round(entropy, 4), "unused": int((load == 0).sum()), "load_max": round(float(p.max() * num_experts), 3)}
            if name in self.previous and self.previous[name].shape == expert.shape:
                changed, compared = changed_tokens(self.previous[name], expert)
                record["changed"] = round(float(changed) / max(int(compared), 1), 4)
            self.previous[name] = expert
            out[name] = record
        return out


# --------------------------------------------------------------------------- one model
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
            run.next_epoch()
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

