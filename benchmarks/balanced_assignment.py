"""Time of the balanced-assignment solvers (Base routing's N/E items per expert), CPU.

    python -m benchmarks.balanced_assignment [--experts 4 8 16 32 64 128] [--items 2048 4096 8192]
        [--partial 128 512] [--repeats 5] [--threads 1]

For every E and N: the torch solver as it runs (sweeps over expert prices, warm-started from
the smoothed dual where E >= WARM_START_EXPERTS and N >= WARM_START_ITEMS), the same sweeps
from zero prices, and fairseq's libbase auction; the partial sMoE's problems too (32 sequences
of C channels each, solved together). Scores are a linear router's, x W with x ~ N(0, 1) of
width 64 and W ~ N(0, 0.3^2), seed 0; and (--model-experts E) the scores smlp_lm_tiny's tMoE
layers route in a bf16 training forward at initialisation (random tokens, 2,048 per update),
where the router favours some experts for every token. Median of --repeats, on the thread's
CPU clock; "same" says whether the warm start returned exactly the assignment of the sweeps
from zero.
Results: benchmarks/results/balanced_assignment.{json,md}.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks._results import markdown_header, run_metadata, write_results
from fairseq_smlp.moe import balanced_assignment as solver

REPO = Path(__file__).resolve().parents[1]


def router_scores(shape, seed: int = 0) -> torch.Tensor:
    """shape (..., N, E): a linear router's scores on random inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape[:-1], 64, generator=g)
    return x @ (torch.randn(64, shape[-1], generator=g) * 0.3)


def median_ms(fn, repeats: int):
    result, times = None, []
    for _ in range(repeats):
        start = time.thread_time()
        result = fn()
        times.append(time.thread_time() - start)
    return round(1e3 * statistics.median(times), 2), result


def model_step_scores(experts: int, seed: int = 0) -> list:
    """The scores each tMoE layer of smlp_lm_tiny (E experts) routes in one bf16 training forward
    at initialisation, 16 random sequences of 128 tokens: [(N, E), ...]."""
    from fairseq_smlp.models.factory import build_model
    from fairseq_smlp.moe import router

    captured, original = [], router.balanced_assignment

    def capture(scores, solver_name="torch"):
        captured.append(scores.detach().float().clone())
        return original(scores, solver_name)

    router.balanced_assignment = capture
    try:
        torch.manual_seed(seed)
        flags = ["--smoe-experts", str(experts), "--tmoe-experts", str(experts)]
        model, seq_len = build_model("smlp_lm_tiny", flags, seq_len=128, vocab=8000, device="cpu")
        tokens = torch.randint(4, 8000, (16, seq_len), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.train()(tokens)
    finally:
        router.balanced_assignment = original
    return captured


def measure(scores: torch.Tensor, source: str, repeats: int) -> dict:
    """scores (..., N, E) -> the row of one problem set."""
    shape = tuple(scores.shape)
    capacity = solver._capacities(shape[-2], shape[-1], "cpu")
    flat = scores.reshape(-1, *shape[-2:])
    warm_ms, warm = median_ms(lambda: solver.balanced_assignment(scores), repeats)
    cold_ms, cold = median_ms(lambda: solver._sweep_prices(flat, capacity, None, 50)[0].view_as(warm), repeats)
    row = {"scores": source, "shape": list(shape), "experts": shape[-1], "items": shape[-2], "problems": flat.size(0),
           "warm_started": shape[-1] >= solver.WARM_START_EXPERTS and shape[-2] >= solver.WARM_START_ITEMS,
           "torch_ms": warm_ms, "zero_prices_ms": cold_ms, "same": bool(torch.equal(warm, cold))}
    row["speedup"] = round(cold_ms / warm_ms, 2)
    try:
        row["libbase_ms"] = median_ms(lambda: solver.balanced_assignment(scores, "libbase"), repeats)[0]
    except ImportError:
        row["libbase_ms"] = None
    return row


def write_markdown(path: Path, result: dict) -> None:
    meta = result["meta"]
    lines = markdown_header(
        "Balanced assignment: solver time (CPU)", meta,
        f"Median of {result['repeats']} runs on the thread's CPU clock. "
        f"Scores: a linear router's on random inputs, or smlp_lm_tiny's tMoE layers' at initialisation (see the "
        f"script). The torch solver warm-starts its "
        f"price sweeps from the smoothed dual where E >= {result['warm_start_experts']} and N >= "
        f"{result['warm_start_items']}; 'same' = it returned exactly the assignment of the sweeps from zero prices.",
    ) + [
        "| scores | problems x N items, E experts | warm start | torch solver (ms) | sweeps from zero prices (ms) "
        "| speed-up | same | libbase (ms) |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        size = f"{r['problems']} x {r['items']}, E = {r['experts']}"
        libbase = "-" if r["libbase_ms"] is None else f"{r['libbase_ms']:.2f}"
        lines.append(
            f"| {r['scores']} | {size} | {'yes' if r['warm_started'] else 'no'} | {r['torch_ms']:.2f} | {r['zero_prices_ms']:.2f} | "
            f"{r['speedup']:.2f} | {'yes' if r['same'] else 'no'} | {libbase} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--items", type=int, nargs="+", default=[2048, 4096, 8192], help="tokens per problem (tMoE)")
    p.add_argument("--partial", type=int, nargs="*", default=[128, 512], help="channels per sequence (partial sMoE, 32 sequences)")
    p.add_argument("--model-experts", type=int, nargs="*", default=[16],
                   help="experts of the smlp_lm_tiny whose tMoE scores at initialisation are solved too")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/balanced_assignment"))
    args = p.parse_args(argv)
    if min(args.experts + args.items + args.model_experts + [args.repeats, args.threads]) < 1:
        p.error("--experts, --items, --model-experts, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    meta = run_metadata("balanced_assignment", argv)
    problems = [(router_scores((n, e)), "linear router") for e in args.experts for n in args.items]
    problems += [(router_scores((32, c, e)), "linear router") for e in args.experts for c in args.partial if c % e == 0]
    for experts in args.model_experts:
        for layer, scores in enumerate(model_step_scores(experts), start=1):
            problems.append((scores, f"smlp_lm_tiny tMoE {layer}, initialisation"))
    rows = []
    for scores, source in problems:
        rows.append(measure(scores, source, args.repeats))
        print(rows[-1], flush=True)
    result = {"meta": meta, "repeats": args.repeats, "rows": rows,
              "warm_start_experts": solver.WARM_START_EXPERTS, "warm_start_items": solver.WARM_START_ITEMS}
    write_results(args.out, result, write_markdown)


if __name__ == "__main__":
    main()
