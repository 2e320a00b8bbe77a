"""Forward + backward time of each MoE layer against the dense layer of the same active FLOPs.

    python -m benchmarks.layer_microbench [--experts 2 4 8 16] [--batch 32] [--seq-len 128]
        [--embed-dim 128] [--ffn-dim 256] [--extra-sizes 512x1024] [--dtypes fp32 bf16]
        [--repeats 15] [--threads N] [--clock wall|cpu] [--path auto|static|grouped] [--compare-paths]

Layers (training mode, CPU; fp32, or bf16 autocast around the forward as `--cpu --bf16`
trains), N = batch x seq-len tokens of width H:
  tMoE        sMLP's feature MoE: BaseRouter (balanced assignment, torch solver) + E experts of width F
  tMoE-libbase  the same with fairseq's libbase solver (--balanced-assignment libbase)
  Switch      Top1Router, capacity factor 1.25, E experts of width F
  GShard      Top2Router (second expert sampled), E experts of width F/2 (same FLOPs as top-1 at F)
  HASH        HashRouter (random table over a 8,000-token vocabulary), E experts of width F
  sMoE-det    spatial gating unit with E spatial experts, deterministic routing
  sMoE-partial  the same with the partial-prediction router (20% prefix, balanced assignment)
Dense references: FFN H -> F -> H (with the tMoE experts' LayerNorm for tMoE; relu and no
norm, as fairseq's transformer FFN, for Switch / GShard / HASH) and the dense spatial gating
unit (one T x T matrix) for sMoE. Also "experts only": the tMoE experts run on an already
dispatched (E, N/E, H) buffer, so ratio(tMoE) - ratio(experts only) is routing + dispatch.
fairseq's Base Layers hold one expert per worker, so in one process a Base layer is a dense
FFN; tMoE-libbase is Base Layers' routing (balanced assignment + sigmoid mix, libbase solver).

--compare-paths adds, for every token-routed layer, "<layer> [grouped]": the same module on the
previous dispatch path (moe.dispatch "grouped": rows grouped by expert, uneven loads on
grouped_mm or slots padded to the largest load) next to the default "static" path (exact
balance: one permutation + bmm; otherwise an (E, C, H) buffer filled by scatter, one bmm per
projection), interleaved in the same run.

All variants of one expert count run interleaved, repeats times; the ratio is
median(layer) / median(its dense reference). --clock cpu times with the thread's CPU clock
(with --threads 1: time the process was descheduled on a shared machine does not count). --extra-sizes repeats everything at larger H x F:
routing and dispatch cost O(N E + N H) while the FFN costs O(N H F), so their share shrinks
with width (at tiny widths per-op overhead dominates). Results:
benchmarks/results/layer_microbench.{json,md}.
"""
import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks._results import run_metadata, write_results
from fairseq_smlp.modules.spatial_gating import SpatialGateArgs, SpatialGatingUnit
from fairseq_smlp.moe.compile import CompiledOrEager
from fairseq_smlp.moe.dispatch import PATHS, dispatch_path, set_dispatch_path
from fairseq_smlp.moe.experts import ExpertFFN
from fairseq_smlp.moe.router import random_hash_table
from fairseq_smlp.moe.feed_forward_moe import FeedForwardMoE, MoEArgs
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

VOCAB = 8000


class DenseFFN(nn.Module):
    """x -> W2 act(W1 [LN(x)]): the dense layer a token-routed MoE is compared with."""

    def __init__(self, embed_dim: int, ffn_dim: int, pre_norm: bool, activation: str):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if pre_norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(embed_dim, ffn_dim), nn.Linear(ffn_dim, embed_dim)
        self.activation = getattr(torch.nn.functional, activation)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(self.norm(x))))


class ExpertsOnly(nn.Module):
    """The tMoE experts on a buffer that is already split evenly by expert (no routing)."""

    def __init__(self, experts: ExpertFFN):
        super().__init__()
        self.experts = experts

    def forward(self, x):
        flat = x.reshape(self.experts.num_experts, -1, x.size(-1))
        return self.experts(flat).view_as(x)


class OnPath(nn.Module):
    """A token-routed MoE layer run on another dispatch path (moe.dispatch.PATHS)."""

    def __init__(self, layer: nn.Module, path: str):
        super().__init__()
        self.layer, self.path = layer, path

    def forward(self, x):
        with dispatch_path(self.path):
            return self.layer(x)


TOKEN_ROUTED = ("tMoE", "tMoE-libbase", "Switch", "HASH", "GShard")


class Compiled(nn.Module):
    """A token-routed MoE layer as --moe-compile runs it (moe/compile.py: the whole layer, static
    dispatch), sharing the layer's parameters; compile time falls in the warm-up rounds."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.compiled = layer, CompiledOrEager(layer.forward, "layer")

    def forward(self, x):
        return self.compiled(x)


def build_layers(num_experts: int, args) -> dict:
    """name -> (module, input kind, dense reference name)."""
    H, F, T = args.embed_dim, args.ffn_dim, args.seq_len
    channels = F  # the gMLP gate half of a width-2F block
    torch.manual_seed(0)
    relu = dict(expert_norm=False, activation="relu")  # the Transformer baselines' experts
    shape = dict(num_experts=num_experts, embed_dim=H, ffn_dim=F)
    gate = dict(channels=channels, max_positions=T)
    hash_moe = FeedForwardMoE(MoEArgs(router="hash", **shape, hash_table=random_hash_table(VOCAB, num_experts), **relu))
    layers = {
        "dense FFN (LN, gelu)": (DenseFFN(H, F, True, "gelu"), "tokens", None),
        "dense FFN (relu)": (DenseFFN(H, F, False, "relu"), "tokens", None),
        "dense SGU": (SpatialGatingUnit(SpatialGateArgs(**gate)), "channels", None),
        "experts only": (ExpertsOnly(ExpertFFN(num_experts, H, F)), "tokens", "dense FFN (LN, gelu)"),
        "tMoE": (FeedForwardMoE(MoEArgs(router="base", **shape)), "tokens", "dense FFN (LN, gelu)"),
        "tMoE-libbase": (FeedForwardMoE(MoEArgs(router="base", **shape, solver="libbase")), "tokens", "dense FFN (LN, gelu)"),
        "Switch": (FeedForwardMoE(MoEArgs(router="top1", **shape, train_capacity_factor=1.25, **relu)), "tokens", "dense FFN (relu)"),
        "HASH": (hash_moe, "tokens", "dense FFN (relu)"),
        "sMoE-det": (SpatialGatingUnit(SpatialGateArgs(**gate, num_experts=num_experts)), "channels", "dense SGU"),
        "sMoE-partial": (SpatialGatingUnit(SpatialGateArgs(**gate, num_experts=num_experts, routing="partial")), "channels", "dense SGU"),
    }
    if num_experts >= 2:
        gshard = MoEArgs(router="top2", num_experts=num_experts, embed_dim=H, ffn_dim=F // 2, train_capacity_factor=2.0, **relu)
        layers["GShard"] = (FeedForwardMoE(gshard), "tokens", "dense FFN (relu)")
    if getattr(args, "compare_paths", False):
        for name in TOKEN_ROUTED:
            if name in layers:
                module, kind, reference = layers[name]
                layers[f"{name} [grouped]"] = (OnPath(module, "grouped"), kind, reference)
    if getattr(args, "compare_compile", False):
        for name in TOKEN_ROUTED:
            if name in layers:
                module, kind, reference = layers[name]
                layers[f"{name} [compiled]"] = (Compiled(module), kind, reference)
    if getattr(args, "layers", None):
        kept = {name for name in layers if name.split(" [")[0] in args.layers}
        kept |= {layers[name][2] for name in kept if layers[name][2]}
        layers = {name: layer for name, layer in layers.items() if name in kept}
    hash_router = hash_moe.router
    for module, _, _ in layers.values():
        module.train()
        for p in module.parameters():  # the experts' W2 starts at zero: give every weight a gradient path
            if p.dim() >= 2:
                nn.init.normal_(p, std=p.size(-1) ** -0.5)
    return layers, hash_router


def make_inputs(args):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(args.batch, args.seq_len, args.embed_dim, generator=generator) * args.input_scale
    channels = torch.randn(args.batch, args.seq_len, args.ffn_dim, generator=generator)
    token_ids = torch.randint(VOCAB, (args.batch * args.seq_len,), generator=generator)
    return {"tokens": tokens, "channels": channels}, token_ids


DTYPES = {"fp32": None, "bf16": torch.bfloat16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_once(module, x, dtype=None, clock=time.perf_counter) -> float:
    """Forward (under autocast to `dtype` if given) + backward, seconds on `clock` (a GPU is
    synchronised before both readings)."""
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = clock()
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))
    sync()
    return clock() - start


def run(num_experts: int, args, dtype: str) -> list:
    layers, hash_router = build_layers(num_experts, args)
    inputs, token_ids = make_inputs(args)
    for module, _, _ in layers.values():
        module.to(args.device)
    inputs = {kind: x.to(args.device) for kind, x in inputs.items()}
    hash_router.set_token_ids(token_ids.to(args.device))
    times = {name: [] for name in layers}
    for rep in range(args.warmup + args.repeats):
        for name, (module, kind, _) in layers.items():  # interleaved: load drifts hit all alike
            seconds = time_once(module, inputs[kind], DTYPES[dtype], CLOCKS[args.clock])
            if rep >= args.warmup:
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, (_, _, reference) in layers.items():
        rows.append({
            "dtype": dtype,
            "experts": num_experts,
            "embed_dim": args.embed_dim,
            "ffn_dim": args.ffn_dim,
            "layer": name,
            "median_ms": round(1e3 * medians[name], 3),
            "min_ms": round(1e3 * min(times[name]), 3),
            "reference": reference,
            "ratio": round(medians[name] / medians[reference], 3) if reference else 1.0,
        })
    return rows


def write_markdown(path: Path, result: dict) -> None:
    dtypes = result.get("dtypes", ["fp32"])
    clock = {"wall": "wall-clock", "cpu": "the thread's CPU clock"}[result.get("clock", "wall")]
    lines = [
        f"# MoE layers against their dense equivalents (forward + backward, CPU, {' and '.join(dtypes)})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} threads, load average "
        f"{result['load_average']} at the start{', ' + str(result['load_after']) + ' at the end' if 'load_after' in result else ''}. "
        f"{result['tokens']} tokens (batch {result['batch']} x {result['seq_len']}), "
        f"sizes H x F = {', '.join(result['sizes'])}; median of {result['repeats']} interleaved repeats "
        f"after {result['warmup']} warm-up rounds, timed on {clock}. bf16: CPU autocast around the forward "
        "(fp32 weights, routers in fp32), as `fairseq-train --cpu --bf16`.",
        "",
        "Ratio = median time of the layer / median time of its dense reference (1.10 = 10% overhead). At equal "
        "active FLOPs, 1 / ratio is the layer's FLOP/s as a share of the dense layer's.",
    ]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    if result.get("compare_paths"):
        lines += [
            "",
            f"Rows without a suffix run the \"{result.get('path', 'static')}\" dispatch path (moe/dispatch.py; static, "
            "exact balance -> one permutation and one bmm per projection; otherwise an (E, C, H) buffer "
            "filled by scatter, one bmm per projection); "
            "\"[grouped]\" rows run the same module on the previous path (rows grouped by expert, grouped_mm in fp32 "
            "or slots padded to the largest load), interleaved in the same run: the before/after pair.",
        ]
    if result.get("compare_compile"):
        lines += [
            "",
            "\"[compiled]\" rows run the same module compiled whole as --moe-compile runs it (torch.compile of the "
            "layer's forward: router, static-shape dispatch, experts, combine; data-dependent steps become graph "
            "breaks), interleaved in the same run; compile time falls in the warm-up rounds.",
        ]
    for dtype in dtypes:
        for size in result["sizes"]:
            embed_dim, ffn_dim = (int(d) for d in size.split("x"))
            rows = [
                r for r in result["rows"]
                if r.get("embed_dim", embed_dim) == embed_dim and r.get("ffn_dim", ffn_dim) == ffn_dim and r.get("dtype", "fp32") == dtype
            ]
            lines += ["", f"## {dtype}, H = {embed_dim}, F = {ffn_dim}", ""] + _size_table(rows)
    lines.append("")
    atomic_write_text(path, "\n".join(lines))


def _size_table(rows: list) -> list:
    experts = sorted({r["experts"] for r in rows})
    names = list(dict.fromkeys(r["layer"] for r in rows if r["reference"]))
    lines = [
        "| layer | reference | " + " | ".join(f"E={e}" for e in experts) + " |",
        "|---|---|" + "---:|" * len(experts),
    ]
    for name in names:
        by_e = {r["experts"]: r for r in rows if r["layer"] == name}
        reference = next(iter(by_e.values()))["reference"]
        cells = [f"{by_e[e]['ratio']:.2f}" if e in by_e else "-" for e in experts]
        lines.append(f"| {name} | {reference} | " + " | ".join(cells) + " |")
    lines += ["", "Dense reference times (ms, median):", ""]
    for name in ("dense FFN (LN, gelu)", "dense FFN (relu)", "dense SGU"):
        by_e = {r["experts"]: r for r in rows if r["layer"] == name}
        if by_e:  # (--layers may leave a reference out)
            lines.append(f"- {name}: " + ", ".join(f"E={e}: {by_e[e]['median_ms']:.2f}" for e in experts))
    return lines


def _default_path() -> str:
    from fairseq_smlp.moe import dispatch

    return dispatch._PATH["default"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layer_microbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--ffn-dim", type=int, default=256, help="expert width F (tMoE of smlp_lm_tiny: 256); also the sMoE channels")
    parser.add_argument(
        "--extra-sizes", nargs="*", default=["512x1024"], help="more H x F sizes to run after --embed-dim x --ffn-dim"
    )
    parser.add_argument("--input-scale", type=float, default=1.0, help="std of the token inputs (spreads router scores)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32"], help="precisions to run (bf16: CPU autocast)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: the thread's CPU time (use with --threads 1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--path", choices=PATHS, default=None, help="dispatch path of the unsuffixed rows (default: the code's default)")
    parser.add_argument(
        "--compare-paths", action="store_true", help='also time every token-routed layer on the previous "grouped" dispatch path'
    )
    parser.add_argument(
        "--compare-compile", action="store_true", help="also time every token-routed layer compiled whole, as --moe-compile runs it"
    )
    parser.add_argument("--layers", nargs="+", default=None, help="run only these layers (and their references and variants)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: on a GPU (bf16: autocast on it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "layer_microbench"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.path:
        set_dispatch_path(args.path)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    metadata = run_metadata("layer_microbench.py", argv, args.device)  # load average before the run
    sizes = [f"{args.embed_dim}x{args.ffn_dim}", *args.extra_sizes]
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        parser.error("--clock cpu times one thread: use it with --threads 1")
    rows = []
    for dtype in args.dtypes:
        for size in sizes:
            embed_dim, ffn_dim = (int(d) for d in size.split("x"))
            size_args = argparse.Namespace(**{**vars(args), "embed_dim": embed_dim, "ffn_dim": ffn_dim})
            for e in args.experts:
                new = run(e, size_args, dtype)
                rows += new
                summary = ", ".join(f"{r['layer']} {r['ratio']:.2f}" for r in new if r["reference"])
                print(f"{dtype} H={embed_dim} F={ffn_dim} E={e}: {summary}", flush=True)
    result = {
        **metadata,
        "load_after": round(os.getloadavg()[0], 2),
        "dtypes": args.dtypes,
        "clock": args.clock,
        "tokens": args.batch * args.seq_len,
        "sizes": sizes,
        **{k: getattr(args, k) for k in ("batch", "seq_len", "embed_dim", "ffn_dim", "input_scale", "repeats", "warmup", "compare_paths", "compare_compile")},
        "path": args.path or _default_path(),
        "rows": rows,
    }
    write_results(args.out, result, write_markdown)

if __name__ == "__main__":
    main()
