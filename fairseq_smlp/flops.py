"""Forward FLOPs per token and parameter counts of any registered arch.

    python -m fairseq_smlp.flops --arch smlp_lm_base [fairseq model args] [--seq-len N] [--vocab N] [--json]
    python -m fairseq_smlp.flops --table | --breakdown SIZE    (docs/baselines.md's tables)

The model is built exactly as fairseq-train builds it (same argument parsing, arch
defaults and build_model), on the meta device: no memory, so even smlp_lm_9b counts
instantly. FLOPs are then read off the modules:

    FLOPs = 2 x multiply-adds of the matmuls run for one token (one forward pass);
            norms, activations, softmax, biases and residual adds are not counted.
    embeddings         0 (a table lookup; sinusoidal positions are added, not multiplied)
    mixing             attention: 4 * T * d (QK^T and AV over all T keys); spatial gating:
                       2 * T * C (C channels each mixed by a T x T matrix). T = --seq-len.
                       Causal models count the FULL T x T product, half of it masked:
                       that is what fairseq's attention and our spatial kernels compute,
                       and it is the same convention for every family.
    projections        every shared nn.Linear: 2 * in * out (attention q/k/v/out, FFNs,
                       gMLP's U and V)
    experts            active experts only: k * 2 * (H*F + F*H) per MoE layer (k = 1
                       for Switch, HASH, Base, sMLP's tMoE; 2 for GShard); a Base layer's
                       expert sublayers
    routing            2 * (router weights): x.W_gate or x.centroids (0 for HASH);
                       partial-prediction sMoE: 2 * P * C * E / T
    output             2 * H * V

Parameters: total (tied embeddings counted once), active (expert weights counted k/E),
embedding (token and learned position embeddings). fairseq's Base layers hold one
expert per worker: --base-workers W counts a W-worker run (default 1, as built here).
"""
import argparse
import json
import sys
from collections import OrderedDict

import torch.nn as nn

from .models.factory import DEFAULT_VOCAB, build_model  # the offline model factory
from .validation import FlagError, check_args

CATEGORIES = ["embeddings", "mixing", "projections", "experts", "routing", "output"]
def _linear_flops(linear: nn.Linear) -> int:
    return 2 * linear.in_features * linear.out_features


def _expert_flops(experts: nn.Module) -> float:
    """Forward FLOPs of one expert: its W1 and W2 of every stacked ExpertFFN (Base layers
    stack S of them)."""
    from .moe.experts import ExpertFFN

    stacks = [m for m in experts.modules() if isinstance(m, ExpertFFN)]
    return sum(2 * (m.fc1_weight.numel() + m.fc2_weight.numel()) / m.num_local_experts for m in stacks)


def count_flops(model: nn.Module, seq_len: int) -> "OrderedDict[str, float]":
    """Forward FLOPs per token by category (see the module docstring)."""
    from fairseq.modules import MultiheadAttention
    from fairseq.modules.base_layer import BaseLayer

    from .modules.spatial_gating import SpatialGatingUnit
    from .moe.base_experts import BaseExpertsLayer
    from .moe.feed_forward_moe import FeedForwardMoE

    flops = OrderedDict((c, 0.0) for c in CATEGORIES)
    output = getattr(model.decoder, "output_projection", None)
    if output is None:
        raise ValueError("flops: models with an adaptive softmax (no output_projection) are not supported")
    counted = []  # modules whose children are already accounted for
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in counted):
            continue
        if isinstance(module, MultiheadAttention):
            flops["mixing"] += 4 * seq_len * module.embed_dim  # QK^T and AV, full T x T
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                flops["projections"] += _linear_flops(proj)
        elif isinstance(module, SpatialGatingUnit):
            channels = module.norm.normalized_shape[0]
            flops["mixing"] += 2 * seq_len * channels
            if module.router is not None:  # reads P positions of every channel, once per sequence
                flops["routing"] += 2 * module.router.weight.numel() * channels / seq_len
        elif isinstance(module, (FeedForwardMoE, BaseExpertsLayer)):  # a router and its experts
            flops["experts"] += module.router.top_k * _expert_flops(module.experts)
            flops["routing"] += 2 * sum(p.numel() for p in module.router.parameters())
        elif isinstance(module, BaseLayer):
            linears = [m for m in module.expert_network.modules() if isinstance(m, nn.Linear)]
            flops["experts"] += sum(_linear_flops(m) for m in linears)
            flops["routing"] += 2 * module.expert_centroids.numel()
        elif module is output:
            flops["output"] += _linear_flops(module)
        elif isinstance(module, nn.Linear):
            flops["projections"] += _linear_flops(module)
        else:
            continue
        counted.append(name)
    flops["total"] = sum(flops[c] for c in CATEGORIES)
    flops["non_output"] = flops["total"] - flops["output"]
    return flops


def count_params(model: nn.Module, world_size: int = 1) -> "OrderedDict[str, int]":
    """total, active per token, embedding and expert parameter counts of a `world_size`-worker run,
    from the model of one of its workers (parameters marked `expert_sharded` differ from worker
    to worker: W of each; every other parameter is the same on every worker)."""
    from fairseq.modules.base_layer import BaseLayer

    from .moe.base_experts import BaseExpertsLayer
    from .moe.feed_forward_moe import FeedForwardMoE

    def workers_holding(p) -> int:  # distinct copies of p in the whole run
        return world_size if getattr(p, "expert_sharded", False) else 1

    total = sum(p.numel() * workers_holding(p) for p in model.parameters())
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, (FeedForwardMoE, BaseExpertsLayer)):  # k of E experts run for a token
            expert_params = sum(p.numel() * workers_holding(p) for p in module.experts.parameters())
            k = module.router.top_k
            inactive += expert_params * (1 - k / module.experts.num_experts)
        elif isinstance(module, BaseLayer):  # one expert per worker: one of W runs for a token
            inactive += sum(p.numel() * (workers_holding(p) - 1) for p in module.expert_network.parameters())
    decoder = model.decoder
    embedding = decoder.embed_tokens.weight.numel()
    positions = getattr(decoder, "embed_positions", None)
    if positions is not None:
        embedding += sum(p.numel() for p in positions.parameters())
    expert = sum(p.numel() * workers_holding(p) for p in model.parameters() if getattr(p, "expert", False))
    return OrderedDict(
        total=total,
        active=int(round(total - inactive)),
        embedding=embedding,
        non_embedding=total - embedding,
        expert=expert,
    )


def report(arch: str, model_args=(), seq_len: int = None, vocab: int = DEFAULT_VOCAB, base_workers: int = 1) -> dict:
    """Everything `python -m fairseq_smlp.flops` prints, as a dict."""
    model, seq_len = build_model(arch, model_args, seq_len, vocab, world_size=base_workers)
    return {
        "arch": arch,
        "model_args": list(model_args),
        "seq_len": seq_len,
        "vocab": vocab,
        "flops_per_token": count_flops(model, seq_len),
        "params": count_params(model, world_size=base_workers),
    }


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def format_report(r: dict) -> str:
    lines = [f"{r['arch']}  (sequence length {r['seq_len']}, vocabulary {r['vocab']})", "forward FLOPs per token:"]
    lines += [f"  {k:<12} {_human(v):>10}  ({v:,.0f})" for k, v in r["flops_per_token"].items()]
    lines.append("parameters:")
    lines += [f"  {k:<12} {_human(v):>10}  ({v:,})" for k, v in r["params"].items()]
    return "\n".join(lines)


FAMILIES = ["smlp_lm", "gmlp_lm", "transformer_lm", "switch_lm", "gshard_lm", "hash_lm", "base_lm"]
# one Base expert per worker, as many as smlp_lm's tMoE experts
BASE_WORKERS = {"tiny": 4, "base": 16, "large": 32, "9b": 64}


def family_reports(size: str, vocab: int = DEFAULT_VOCAB):
    """(row label, report) of every family at `size`, smlp_lm first: the rows of docs/baselines.md's tables."""
    import fairseq_smlp  # noqa: F401  (registers the plugin's archs)
    from fairseq.models import ARCH_MODEL_REGISTRY

    for family in FAMILIES:
        if f"{family}_{size}" not in ARCH_MODEL_REGISTRY:  # no gmlp_lm_9b: the paper scaled the MoEs only
            continue
        workers = BASE_WORKERS[size] if family == "base_lm" else 1
        r = report(f"{family}_{size}", vocab=vocab, base_workers=workers)
        yield f"{r['arch']}{f' (W={workers})' if workers > 1 else ''}", r


def markdown_table(vocab: int = DEFAULT_VOCAB) -> str:
    """The FLOPs / parameter table of docs/baselines.md, every family at every size."""
    lines = [
        "| arch | seq len | FLOPs/token | vs smlp_lm | w/o output | vs smlp_lm | params total | params active |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in BASE_WORKERS:
        reference = None
        for label, r in family_reports(size, vocab):
            f, p = r["flops_per_token"], r["params"]
            reference = reference or f
            lines.append(
                f"| {label} | {r['seq_len']} | {_human(f['total'])} | "
                f"{100 * (f['total'] / reference['total'] - 1):+.1f}% | {_human(f['non_output'])} | "
                f"{100 * (f['non_output'] / reference['non_output'] - 1):+.1f}% | {_human(p['total'])} | "
                f"{_human(p['active'])} |"
            )
    return "\n".join(lines)


def breakdown_table(size: str = "base", vocab: int = DEFAULT_VOCAB) -> str:
    """The FLOPs per token of every family at `size` by category (docs/baselines.md)."""
    columns = ["mixing", "projections", "experts", "routing", "output", "total"]
    lines = ["| arch | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, r in family_reports(size, vocab):
        lines.append(f"| {label} | " + " | ".join(_human(r["flops_per_token"][c]) for c in columns) + " |")
    return "\n".join(lines)


def cli_main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", help="any registered fairseq arch (smlp_lm_base, switch_lm_tiny, ...)")
    parser.add_argument(
        "--table", action="store_true", help="print the markdown table of every family and size (docs/baselines.md)"
    )
    parser.add_argument(
        "--breakdown", choices=list(BASE_WORKERS), help="print the markdown table of every family's FLOPs by category"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: 128 for *_tiny, else 1024)"
    )
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help=f"vocabulary size (default {DEFAULT_VOCAB})")
    parser.add_argument(
        "--base-workers", type=int, default=1, help="workers of a Base Layers run: one expert each (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args, model_args = parser.parse_known_args(argv)
    if args.table or args.breakdown:
        print(markdown_table(args.vocab) if args.table else breakdown_table(args.breakdown, args.vocab))
        return
    if not args.arch:
        parser.error("--arch is required (or --table, --breakdown SIZE)")
    check_args(parser, args)
    try:
        r = report(args.arch, model_args, args.seq_len, args.vocab, args.base_workers)
    except FlagError as e:  # a model flag out of range (the model's build_model checks them)
        parser.error(str(e))
    print(json.dumps(r, indent=2) if args.json else format_report(r))


if __name__ == "__main__":
    cli_main(sys.argv[1:])
