"""fp32 against --bf16 training of one arch through fairseq's Trainer, in ONE run.

    python -m benchmarks.precision_ab [--model smlp] [--updates 600] [--slice 25]
        [--threads 1] [--corpus wikitext-2 | --data-bin DIR] [-- more fairseq-train options]

Two copies of the arch are built as fairseq-train builds them (same seed: same initial
weights, same batches), one with `--cpu` (fp32) and one with `--cpu --bf16` (bf16 autocast,
fp32 weights and optimizer state: fairseq_smlp/fairseq_patches.py), and trained round-robin in
slices of --slice updates in this process, so that machine load hits both alike. Each copy's
clock counts only its own Trainer.train_step calls (what fairseq-train runs per update, data
loading included). After --updates updates each (equal tokens) both are validated the same
way (fp32 forward, the first --valid-blocks validation blocks). The fp32 and bf16 matmul
peaks are measured in the same run, before and after training.

Data and training options are benchmarks/compare.py's (WikiText-2, 8k sentencepiece BPE,
2,048 tokens per update, Adam, dropout 0.1). Results: benchmarks/results/precision_ab.{json,md}.
"""
import argparse
import os
from pathlib import Path

import torch

from benchmarks._results import run_metadata, write_results
from benchmarks.compare import MODELS, Run, prepare_data
from benchmarks.throughput_baselines import matmul_peak_gflops
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

PRECISIONS = {"fp32": [], "bf16": ["--bf16"]}


class CountedRun(Run):
    """compare.Run trained by a number of updates instead of a clock target."""

    timed_tokens_start = 0  # tokens seen before the clock was reset (warm-up)

    def timed_tokens(self) -> int:
        return self.tokens - self.timed_tokens_start

    def train_updates(self, updates: int) -> None:
        target = self.trainer.get_num_updates() + updates
        while self.trainer.get_num_updates() < target:
            self.train_until(self.seconds + 1e-9)  # exactly one train_step (its clock target is passed at once)


def peaks() -> dict:
    return {dtype: round(matmul_peak_gflops(dtype=dtype), 1) for dtype in PRECISIONS}


def write_markdown(path: Path, result: dict) -> None:
    fp32, bf16 = result["runs"]["fp32"], result["runs"]["bf16"]
    lines = [
        f"# fp32 against bf16 training of {result['arch']} through fairseq's Trainer (CPU, one run)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} thread(s), load average "
        f"{result['load_average']} at the start and {result['load_after']} at the end. Data: {result['data']}; "
        f"{result['tokens_per_update']} tokens per update, {result['warmup']} untimed + {result['updates']} timed updates each (equal tokens), "
        f"round-robin in slices of {result['slice']} updates; validation over the first {result['valid_blocks']} blocks.",
        "",
        "Matmul peaks measured in this run (GFLOP/s, best of 10 products n=1024, before / after training): "
        f"fp32 {result['peaks_before']['fp32']:,.0f} / {result['peaks_after']['fp32']:,.0f}, "
        f"bf16 {result['peaks_before']['bf16']:,.0f} / {result['peaks_after']['bf16']:,.0f}.",
        "",
        "| precision | tokens/s | s/update | validation ppl | MFU (of the same dtype's peak) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in result["runs"].items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['seconds_per_update']:.3f} | {r['ppl']:.2f} | {100 * r['mfu']:.1f}% |"
        )
    lines += [
        "",
        f"bf16 / fp32 tokens/s: **{bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x**; "
        f"validation ppl bf16 / fp32 at equal tokens: **{bf16['ppl'] / fp32['ppl']:.4f}**.",
        "",
        "MFU = 3 x forward FLOPs/token x tokens/s / matmul peak (the mean of the before and after figures). "
        "tokens/s counts each copy's own Trainer.train_step time.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smlp", choices=list(MODELS), help="a model of benchmarks/compare.py (smlp: smlp_lm_tiny)")
    p.add_argument("--updates", type=int, default=600, help="updates per precision")
    p.add_argument("--slice", type=int, default=25, help="updates per turn of the round-robin")
    p.add_argument("--warmup", type=int, default=10, help="untimed updates per precision first (counted in the tokens seen)")
    p.add_argument("--corpus", default="wikitext-2", choices=["wikitext-2", "ptb"])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--data-bin", help="an existing fairseq data-bin instead of --corpus")
    p.add_argument("--valid-blocks", type=int, default=512, help="validation blocks scored (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared 2-core machine)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision_ab"))
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more fairseq-train options for both copies")
    args = p.parse_args(argv)
    if args.updates < 1 or args.slice < 1:
        p.error("--updates and --slice must be >= 1")
    torch.set_num_threads(args.threads)
    import fairseq_smlp  # noqa: F401  (registers the archs, task and criterion)
    from fairseq_smlp.flops import count_flops

    metadata = run_metadata("precision_ab.py", argv)  # load average before the run
    data_bin = prepare_data(args)
    extra = [a for a in args.extra if a != "--"]
    runs = {name: CountedRun(args.model, data_bin, flags + extra) for name, flags in PRECISIONS.items()}
    for run in runs.values():  # warm-up: first-call costs (allocator, lazy inits) stay off the clocks
        run.train_updates(args.warmup)
        run.seconds, run.timed_tokens_start = 0.0, run.tokens
    peaks_before = peaks()
    done = 0
    while done < args.updates:
        step = min(args.slice, args.updates - done)
        for name, run in runs.items():
            run.train_updates(step)
        done += step
        print(f"{done}/{args.updates} updates: " + ", ".join(
            f"{name} {r.timed_tokens() / r.seconds:,.0f} tokens/s" for name, r in runs.items()), flush=True)
    peaks_after = peaks()

    rows = {}
    for name, run in runs.items():
        point = run.validate(0, args.valid_blocks, 0.0)
        flops = count_flops(run.model, run.cfg.task.tokens_per_sample)["total"]
        peak = (peaks_before[name] + peaks_after[name]) / 2
        rows[name] = {
            "tokens_per_s": round(run.timed_tokens() / run.seconds, 1),
            "seconds_per_update": round(run.seconds / args.updates, 4),
            "tokens": run.tokens,  # warm-up included
            "ppl": round(point["ppl"], 3),
            "forward_flops_per_token": flops,
            "mfu": round(3 * flops * run.timed_tokens() / run.seconds / (peak * 1e9), 4),
        }
        print(f"{name}: {rows[name]}", flush=True)
    result = {
        **metadata,
        "load_after": round(os.getloadavg()[0], 2),
        "arch": runs["fp32"].arch,
        "data": str(data_bin) if args.data_bin else f"{args.corpus}, {args.vocab_size} sentencepiece BPE",
        "tokens_per_update": runs["fp32"].cfg.dataset.max_tokens,
        "updates": args.updates,
        "warmup": args.warmup,
        "slice": args.slice,
        "valid_blocks": args.valid_blocks,
        "peaks_before": peaks_before,
        "peaks_after": peaks_after,
        "runs": rows,
        "bf16_speedup": round(rows["bf16"]["tokens_per_s"] / rows["fp32"]["tokens_per_s"], 3),
        "ppl_ratio": round(rows["bf16"]["ppl"] / rows["fp32"]["ppl"], 4),
    }
    write_results(args.out, result, write_markdown)


if __name__ == "__main__":
    main()
