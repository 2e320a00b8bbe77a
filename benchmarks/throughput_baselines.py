"""Training throughput (tokens/s) of every tiny baseline and smlp_lm_tiny, in one run.

    python -m benchmarks.throughput_baselines [--archs A B ...] [--vocab 8000]
        [--tokens-per-sample 128] [--max-tokens 2048] [--steps 10] [--warmup 3] [--threads N]
        [--device cpu|cuda] [--dtype fp32|bf16] [--moe-compile-rows]
        [--models smlp smlp_top1 gmlp ... --experts E]

Each arch is built as fairseq-train builds it (fairseq_smlp.models.factory.build_model), then
trained for warmup + steps updates on random tokens with the moe_cross_entropy criterion
and Adam, fp32 on CPU by default (--device cuda --dtype bf16: bf16 autocast on a GPU, fp32
weights and routers); tokens/s = tokens per batch * steps / wall time of the timed steps.
The matmul peak of the same device and dtype is measured in the same run (machine load
drifts), and the model FLOP utilisation is 3 * forward FLOPs per token * tokens/s / peak
(backward ~ 2x forward).
--moe-compile-rows adds, after each MoE arch, the same arch built with --moe-compile
(torch.compile of the MoE hot paths), measured in the same run.
--models names the models of benchmarks/compare.py (smlp = the paper's Base-routed sMLP, smlp_top1 =
its tMoE routed like Switch, gmlp, transformer, switch, ...) instead of --archs, with --experts E
experts in every MoE layer, as the equal-wall-clock comparison trains them.
Results: benchmarks/results/throughput_baselines.{json,md}.
"""
import argparse
import time
from pathlib import Path

import torch

from benchmarks._results import run_metadata, write_results
from benchmarks.layer_microbench import CLOCKS
from fairseq_smlp.flops import count_flops, count_params
from fairseq_smlp.models.factory import build_model, offline_task
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

ARCHS = ["smlp_lm_tiny", "gmlp_lm_tiny", "transformer_lm_tiny", "switch_lm_tiny", "gshard_lm_tiny", "hash_lm_tiny", "base_lm_tiny"]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(n: int = 1024, repeats: int = 10, device: str = "cpu", dtype: str = "fp32", clock=time.perf_counter) -> float:
    """Matmul GFLOP/s of this device and dtype now (best of `repeats`)."""
    n = 8192 if device == "cuda" else n  # a GPU needs a large product to reach its peak
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        a @ b
        synchronize(device)
        best = min(best, clock() - start)
    return 2 * n ** 3 / best / 1e9


def measure(arch: str, args, model_args=()) -> dict:
    from fairseq_smlp.criterions.moe_cross_entropy import MoECrossEntropyCriterion

    task = offline_task(args.vocab)
    torch.manual_seed(0)
    model, seq_len = build_model(arch, list(model_args), seq_len=args.tokens_per_sample, vocab=args.vocab, device=args.device, task=task)
    model.train()
    criterion = MoECrossEntropyCriterion(task, moe_aux_loss_weight=0.01, no_fused_output_loss=args.no_fused_output_loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = max(1, args.max_tokens // seq_len)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(args.device, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

    def step():
        tokens = torch.randint(4, args.vocab, (batch, seq_len + 1), generator=generator).to(args.device)
        sample = {
            "net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((batch,), seq_len, device=args.device)},
            "target": tokens[:, 1:],
            "ntokens": batch * seq_len,
        }
        optimizer.zero_grad()
        with autocast:
            loss, sample_size, _ = criterion(model, sample)
        (loss / sample_size).backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    synchronize(args.device)
    clock = CLOCKS[args.clock]
    start = clock()
    for _ in range(args.steps):
        step()
    synchronize(args.device)
    elapsed = clock() - start
    tokens_per_s = batch * seq_len * args.steps / elapsed
    flops = count_flops(model, seq_len)
    params = count_params(model)
    return {
        "arch": arch + "".join(f" {a}" for a in model_args),
        "tokens_per_s": round(tokens_per_s, 1),
        "seconds_per_update": round(elapsed / args.steps, 4),
        "tokens_per_update": batch * seq_len,
        "forward_flops_per_token": flops["total"],
        "params_total": params["total"],
        "params_active": params["active"],
    }


def round_ratios(dense: dict, row: dict) -> str:
    """' (rounds: a, b, ...; median m)': dense over row in each interleaved round, where there were several."""
    pairs = list(zip(dense.get("tokens_per_s_rounds", []), row.get("tokens_per_s_rounds", [])))
    if len(pairs) < 2:
        return ""
    ratios = sorted(d / r for d, r in pairs)
    return f" (rounds: {', '.join(f'{d / r:.2f}' for d, r in pairs)}; median {ratios[len(ratios) // 2]:.2f})"


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        f"# Training throughput of the baselines ({result['device']}, {result['dtype']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} threads; "
        f"{result['dtype']} matmul peak measured in the same run: {result['matmul_peak_gflops']:,.0f} GFLOP/s. "
        f"Random tokens, vocabulary {result['vocab']}, {result['tokens_per_sample']} tokens per sample, "
        f"{result['runs'][0]['tokens_per_update']} tokens per update, Adam, moe_cross_entropy; "
        f"{result['warmup']} warm-up + {result['steps']} timed updates, timed on "
        + ("the thread's CPU clock" if result.get("clock") == "cpu" else "wall-clock")
        + (f"; every row measured {result['rounds']} times, interleaved, median shown." if result.get("rounds", 1) > 1 else "."),
        "",
        "| arch | tokens/s | s/update | fwd FLOPs/token | params (total / active) | MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['arch']} | {r['tokens_per_s']:,.0f} | {r['seconds_per_update']:.3f} | "
            f"{r['forward_flops_per_token'] / 1e6:.2f}M | {r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | "
            f"{100 * r['mfu']:.1f}% |"
        )
    dense = next((r for r in result["runs"] if r["arch"].startswith("gmlp_lm")), None)
    if dense:
        lines += ["", "Dense gMLP's tokens/s over each row's (1.00 = as fast as gMLP per token):", ""]
        lines += [f"- {r['arch']}: {dense['tokens_per_s'] / r['tokens_per_s']:.2f}{round_ratios(dense, r)}" for r in result["runs"] if r is not dense]
    drift = "CPU-clock figures drift less with machine load than wall-clock ones, but a busy sibling core still slows them." \
        if result.get("clock") == "cpu" else "Wall-clock figures drift with machine load."
    lines += ["", f"MFU = 3 x forward FLOPs/token x tokens/s / {result['dtype']} matmul peak. {drift}", ""]
    atomic_write_text(path, "\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput_baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size (a small BPE vocabulary, as in CPU runs)")
    parser.add_argument("--tokens-per-sample", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens per update")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-fused-output-loss", action="store_true", help="unfused output layer + log-softmax (the A/B)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16: autocast (weights and routers stay fp32)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every variant this many times, interleaved; report the median")
    parser.add_argument("--models", nargs="+", default=None, help="models of benchmarks/compare.py instead of --archs")
    parser.add_argument("--experts", type=int, default=0, help="with --models: experts in every MoE layer (0: the arch's own)")
    parser.add_argument("--moe-compile-rows", action="store_true", help="also measure each MoE arch with --moe-compile")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: the thread's CPU time, which a busy machine disturbs far less (CPU, --threads 1 only)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "throughput_baselines"))
    args = parser.parse_args(argv)
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu times the calling thread: it needs --device cpu and --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    peak = matmul_peak_gflops(device=args.device, dtype=args.dtype, clock=CLOCKS[args.clock])
    if args.models:
        from benchmarks.compare import MODELS, model_spec

        unknown = sorted(set(args.models) - set(MODELS))
        if unknown:
            parser.error(f"--models: unknown {', '.join(unknown)}; one of {', '.join(MODELS)}")
        variants = [(arch, tuple(extra)) for arch, extra in (model_spec(m, args.experts) for m in args.models)]
    else:
        variants = [(arch, ()) for arch in args.archs]
    if args.moe_compile_rows:
        moe_archs = ("smlp_lm", "switch_lm", "gshard_lm", "hash_lm")
        variants = [v for arch, extra in variants
                    for v in [(arch, extra)] + ([(arch, (*extra, "--moe-compile"))] if arch.startswith(moe_archs) else [])]
    rounds = {variant: [] for variant in variants}
    for _ in range(args.rounds):  # interleaved: a change in machine load hits every variant alike
        for arch, model_args in variants:
            r = measure(arch, args, model_args)
            rounds[(arch, model_args)].append(r)
            print(f"{r['arch']:22} {r['tokens_per_s']:10,.0f} tokens/s  ({r['seconds_per_update']:.3f} s/update)", flush=True)
    runs = []
    for measured in rounds.values():
        r = sorted(measured, key=lambda m: m["tokens_per_s"])[len(measured) // 2]  # the median round
        r["tokens_per_s_rounds"] = [m["tokens_per_s"] for m in measured]
        r["mfu"] = round(3 * r["forward_flops_per_token"] * r["tokens_per_s"] / (peak * 1e9), 4)
        runs.append(r)
    result = {
        **run_metadata("throughput_baselines.py", argv, args.device),
        "device": args.device,
        "dtype": args.dtype,
        "clock": args.clock,
        "matmul_peak_gflops": round(peak, 1),
        "vocab": args.vocab,
        "tokens_per_sample": args.tokens_per_sample,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "runs": runs,
    }
    write_results(args.out, result, write_markdown)


if __name__ == "__main__":
    main()
