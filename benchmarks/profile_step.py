"""Where one training step of a tiny arch spends its time, by category (torch.profiler).

    python -m benchmarks.profile_step [--arch smlp_lm_tiny] [--max-tokens 4096]
        [--tokens-per-sample 128] [--vocab 8000] [--steps 3] [--warmup 3] [--threads N]
        [--dtype fp32|bf16]

One step = forward + backward + Adam, CPU, random tokens, moe_cross_entropy, as in
benchmarks/throughput_baselines.py; fp32, or --dtype bf16: the forward under bf16 autocast
(fp32 weights), as `fairseq-train --cpu --bf16`. Categories come from the modules, without touching the
model code: forward hooks open a profiler range named after the module's category around
every module call, so a forward op belongs to its innermost labelled module; a backward
op belongs to the forward op that created its autograd node (same sequence number).
Time is the ops' self CPU time, so categories add up. Results:
benchmarks/results/profile_step.{json,md} (--out to change).
"""
import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function

from benchmarks._results import run_metadata, write_results
from fairseq_smlp.models.factory import build_model, offline_task
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

CATEGORIES = [
    "spatial mixing", "channel projections", "expert FFN", "routing", "dispatch",
    "output softmax/CE", "embeddings", "norms", "optimizer", "other",
]
PREFIX = "cat::"


def module_category(module: nn.Module, name: str, output_projection) -> str:
    """The category of the ops a module runs itself (its children are labelled on their own)."""
    from fairseq.modules import MultiheadAttention
    from fairseq.modules.base_layer import BaseLayer

    from fairseq_smlp.modules.causal_mixing import CausalTokenMixing
    from fairseq_smlp.modules.spatial_gating import SpatialGatingUnit
    from fairseq_smlp.moe.experts import ExpertFFN
    from fairseq_smlp.moe.router import Router
    from fairseq_smlp.moe.feed_forward_moe import FeedForwardMoE

    if module is output_projection:
        return "output softmax/CE"
    if isinstance(module, (CausalTokenMixing, MultiheadAttention)):
        return "spatial mixing"  # attention is the Transformers' token mixing
    if isinstance(module, ExpertFFN):
        return "expert FFN"
    if isinstance(module, nn.Linear):
        return "channel projections"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, nn.LayerNorm):
        return "norms"
    if isinstance(module, Router):
        return "routing"
    if isinstance(module, (FeedForwardMoE, BaseLayer)):
        return "dispatch"  # what is left in the MoE layer once router and experts are labelled
    if isinstance(module, SpatialGatingUnit) and module.router is not None:
        return "dispatch"  # gather / scatter of the routed channels
    if isinstance(module, SpatialGatingUnit):
        return "spatial mixing"
    return "other"


def label_modules(model: nn.Module, criterion: nn.Module) -> list:
    """Forward hooks that wrap every module call in a `cat::<category>` profiler range."""
    output_projection = getattr(model.decoder, "output_projection", None)
    handles, open_ranges = [], []

    def enter(category):
        def hook(module, args):
            rf = record_function(PREFIX + category)
            rf.__enter__()
            open_ranges.append(rf)
        return hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    modules = [(n, m) for n, m in model.named_modules()] + [("criterion", criterion)]
    for name, module in modules:
        category = "output softmax/CE" if module is criterion else module_category(module, name, output_projection)
        handles.append(module.register_forward_pre_hook(enter(category)))
        handles.append(module.register_forward_hook(leave))
    return handles


def categorise(events) -> dict:
    """events: the profiler's FunctionEvents -> {category: {"ms": self time, "ops": {op: ms}}}."""
    def innermost_label(event):
        while event is not None:
            if event.name.startswith(PREFIX):
                return event.name[len(PREFIX):]
            event = event.cpu_parent
        return None

    def backward_node(event):
        while event is not None:
            if event.name.startswith("autograd::engine::evaluate_function"):
                return event
            event = event.cpu_parent
        return None

    forward_of = {}  # autograd sequence number -> category of the forward op that made the node
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and backward_node(e) is None:
            forward_of.setdefault(e.sequence_nr, innermost_label(e))

    out = {c: {"ms": 0.0, "ops": defaultdict(float)} for c in CATEGORIES}
    for e in events:
        if e.name.startswith(PREFIX):
            continue
        ms = e.self_cpu_time_total / 1e3
        node = backward_node(e)
        if node is not None:
            category = forward_of.get(node.sequence_nr) or "other"
            op = "bwd " + node.name.split(": ", 1)[-1]
        else:
            category = innermost_label(e) or "other"
            op = e.name
        out[category]["ms"] += ms
        out[category]["ops"][op] += ms
    return out


def make_step(arch: str, args):
    from fairseq_smlp.criterions.moe_cross_entropy import MoECrossEntropyCriterion

    task = offline_task(args.vocab)
    torch.manual_seed(0)
    model, seq_len = build_model(arch, args.model_args, seq_len=args.tokens_per_sample, vocab=args.vocab, device="cpu", task=task)
    model.train()
    criterion = MoECrossEntropyCriterion(task, moe_aux_loss_weight=0.01, no_fused_output_loss=args.no_fused_output_loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = max(1, args.max_tokens // seq_len)
    generator = torch.Generator().manual_seed(0)
    bf16 = args.dtype == "bf16"

    def step():
        tokens = torch.randint(4, args.vocab, (batch, seq_len + 1), generator=generator)
        sample = {
            "net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((batch,), seq_len)},
            "target": tokens[:, 1:],
            "ntokens": batch * seq_len,
        }
        with record_function(PREFIX + "optimizer"):
            optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, sample_size, _ = criterion(model, sample)
        (loss / sample_size).backward()
        with record_function(PREFIX + "optimizer"):
            optimizer.step()

    return model, criterion, step, batch * seq_len


def profile(args) -> dict:
    model, criterion, step, tokens = make_step(args.arch, args)
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()  # unprofiled reference: the profiler adds per-op overhead
    for _ in range(args.steps):
        step()
    plain = (time.perf_counter() - start) / args.steps

    handles = label_modules(model, criterion)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        profiled = (time.perf_counter() - start) / args.steps
    for h in handles:
        h.remove()

    by_category = categorise(prof.events())
    total = sum(c["ms"] for c in by_category.values())
    rows = []
    for name in CATEGORIES:
        c = by_category[name]
        top = sorted(c["ops"].items(), key=lambda kv: -kv[1])[:6]
        rows.append({
            "category": name,
            "ms_per_step": round(c["ms"] / args.steps, 2),
            "share": round(c["ms"] / total, 4) if total else 0.0,
            "top_ops": [{"op": op, "ms_per_step": round(ms / args.steps, 2)} for op, ms in top],
        })
    return {
        "arch": args.arch,
        "tokens_per_step": tokens,
        "seconds_per_step_unprofiled": round(plain, 4),
        "seconds_per_step_profiled": round(profiled, 4),
        "sum_of_op_self_times_ms_per_step": round(total / args.steps, 2),
        "categories": rows,
    }


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        f"# One training step of {result['arch']}, by category (CPU, {result.get('dtype', 'fp32')})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} threads, load average "
        f"{result['load_average']} at the start. {result['tokens_per_step']} tokens per step "
        f"({result['tokens_per_sample']} per sample), vocabulary {result['vocab']}, Adam. "
        f"Step time {1e3 * result['seconds_per_step_unprofiled']:.0f} ms unprofiled, "
        f"{1e3 * result['seconds_per_step_profiled']:.0f} ms under the profiler; "
        f"ops' self times sum to {result['sum_of_op_self_times_ms_per_step']:.0f} ms per step "
        f"(mean of {result['steps']} profiled steps).",
        "",
        "| category | ms/step | share | largest ops (ms/step) |",
        "|---|---:|---:|---|",
    ]
    for r in result["categories"]:
        ops = ", ".join(f"{o['op']} {o['ms_per_step']:.1f}" for o in r["top_ops"][:4])
        lines.append(f"| {r['category']} | {r['ms_per_step']:.1f} | {100 * r['share']:.1f}% | {ops} |")
    lines += [
        "",
        "Forward ops belong to the innermost module that ran them; backward ops to the forward op that made "
        "their autograd node. \"expert FFN\" includes the experts' own LayerNorm; \"routing\" includes the "
        "balanced assignment (under no_grad); \"dispatch\" is what the MoE layer does besides routing and "
        "experts (index_select / index_add / sort / bincount); \"other\" is elementwise work of the blocks "
        "(GELU, gating product, residual adds, dropout) and the loss bookkeeping.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="smlp_lm_tiny")
    parser.add_argument("--model-args", nargs=argparse.REMAINDER, default=[], help="extra fairseq model flags (last)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--tokens-per-sample", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (also the unprofiled reference)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-fused-output-loss", action="store_true", help="unfused output layer + log-softmax (the A/B)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: forward under CPU bf16 autocast")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_step"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    metadata = run_metadata("profile_step.py", argv)  # load average before the run
    result = profile(args)
    result.update({**metadata, "dtype": args.dtype, "vocab": args.vocab, "tokens_per_sample": args.tokens_per_sample, "steps": args.steps})
    for r in result["categories"]:
        print(f"{r['category']:22} {r['ms_per_step']:8.1f} ms  {100 * r['share']:5.1f}%")
    print(f"step {result['seconds_per_step_unprofiled']:.3f} s unprofiled")
    write_results(args.out, result, write_markdown)

if __name__ == "__main__":
    main()
