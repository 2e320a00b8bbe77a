"""Fused vs unfused output loss (criterions/fused_output_loss.py), A/B in one process.

    python -m benchmarks.fused_loss_ab [--archs smlp_lm_tiny transformer_lm_tiny] [--rounds 7] [--threads N]

Each round times a few training steps (forward, backward, Adam) with the fused and then the
unfused criterion on the same model and batches; the ratio of the median step times is
reported, so that machine drift cancels. Writes benchmarks/results/fused_loss_ab.{json,md}.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks._results import run_metadata, write_results
from fairseq_smlp.criterions.moe_cross_entropy import MoECrossEntropyCriterion
from fairseq_smlp.models.factory import build_model, offline_task
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

def step_seconds(model, criterion, optimizer, batches) -> float:
    start = time.perf_counter()
    for sample in batches:
        optimizer.zero_grad()
        loss, sample_size, _ = criterion(model, sample)
        (loss / sample_size).backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def ab(arch: str, args) -> dict:
    task = offline_task(args.vocab)
    torch.manual_seed(0)
    model, seq_len = build_model(arch, [], seq_len=128, vocab=args.vocab, device="cpu", task=task)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = args.max_tokens // seq_len
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        tokens = torch.randint(4, args.vocab, (batch, seq_len + 1), generator=g)
        batches.append({"net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((batch,), seq_len)},
                        "target": tokens[:, 1:], "ntokens": batch * seq_len})
    variants = {name: MoECrossEntropyCriterion(task, 0.01, no_fused_output_loss=name == "unfused") for name in ("fused", "unfused")}
    for criterion in variants.values():  # warm-up
        step_seconds(model, criterion, optimizer, batches[:1])
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, criterion in variants.items():
            times[name].append(step_seconds(model, criterion, optimizer, batches))
    fused, unfused = statistics.median(times["fused"]), statistics.median(times["unfused"])
    return {"arch": arch, "fused_s": round(fused, 4), "unfused_s": round(unfused, 4), "ratio": round(fused / unfused, 3)}


def write_markdown(path: Path, r: dict) -> None:
    lines = [
        "# Fused output projection + cross-entropy vs the unfused path (CPU, fp32)", "",
        f"Command: `{r['command']}`", "",
        f"Machine: {r['machine']}, torch {r['torch']}, {r['threads']} threads, load average {r['load_average']}. "
        f"{r['max_tokens']} tokens per step, vocabulary {r['vocab']}; median of {r['rounds']} interleaved rounds.", "",
        "| arch | fused s/step | unfused s/step | fused / unfused |", "|---|---:|---:|---:|",
        *[f"| {x['arch']} | {x['fused_s']:.3f} | {x['unfused_s']:.3f} | {x['ratio']:.2f} |" for x in r["rows"]], "",
    ]
    atomic_write_text(path, "\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_loss_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["smlp_lm_tiny", "transformer_lm_tiny"])
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; 1 on a shared machine)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fused_loss_ab"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    metadata = run_metadata("fused_loss_ab.py", argv)
    rows = [ab(arch, args) for arch in args.archs]
    for row in rows:
        print(row, flush=True)
    write_results(args.out, {**metadata, **vars(args), "rows": rows}, write_markdown)


if __name__ == "__main__":
    main()
