"""Soak: resident memory of a long fairseq-train run must stay flat.

    python -m benchmarks.soak_memory [--updates 2000] [--validate-every 200] [--threads 1]

Trains smlp_lm_tiny with the real `fairseq-train` (PTB word level, via data_prep) for
--updates updates, validating every --validate-every, and samples the training process's
resident set size (psutil if installed, else VmRSS in /proc) twice a second, tagged with the
last logged update.
Verdict: RSS rises and falls within every validation interval (batches, validation, saving),
so intervals are compared by their peaks: the largest peak after warm-up (the first
validation interval) against the peak of the interval right after it; growth <= 5% passes.
The floor (lowest RSS of each interval) is reported too.
Writes benchmarks/results/soak_memory.{json,md}.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    """Resident memory of pid and its children (fairseq may fork data workers), in MB:
    psutil when it is installed, else VmRSS from /proc (Linux)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
        except psutil.NoSuchProcess:
            return 0.0
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except FileNotFoundError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    return total / 1024


def _children(pid: int):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def train_command(data_bin: Path, save_dir: Path, args) -> list:
    return [
        "fairseq-train", str(data_bin), "--user-dir", str(REPO / "fairseq_smlp"), "--arch", "smlp_lm_tiny",
        "--task", "smlp_language_modeling", "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64",
        "--max-tokens", "1024", "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "0.002",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--dropout", "0.1", "--cpu", "--num-workers", "0",
        "--max-update", str(args.updates), "--validate-interval-updates", str(args.validate_every),
        "--save-interval-updates", str(args.validate_every), "--keep-interval-updates", "1", "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", "10", "--save-dir", str(save_dir), "--seed", "1",
    ]


def soak(args) -> dict:
    from data_prep.small_corpus import prepare_small_corpus

    data_bin = prepare_small_corpus(REPO / "runs" / "soak" / "data", corpus="ptb")
    samples, update = [], [0]
    with tempfile.TemporaryDirectory() as save_dir:
        cmd = train_command(data_bin, Path(save_dir), args)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

        def follow_log():  # the last update fairseq logged
            for line in proc.stdout:
                found = re.search(r'"num_updates": "?(\d+)', line)
                if found:
                    update[0] = int(found.group(1))

        threading.Thread(target=follow_log, daemon=True).start()
        start = time.time()
        while proc.poll() is None:
            samples.append({"seconds": round(time.time() - start, 1), "update": update[0], "rss_mb": round(rss_mb(proc.pid), 1)})
            time.sleep(0.5)
        if proc.returncode != 0:
            raise SystemExit(f"fairseq-train failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return {
        "command": shlex.join(["python", "-m", "benchmarks.soak_memory", *sys.argv[1:]]),
        "train_command": shlex.join(cmd), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "updates": args.updates, "validate_every": args.validate_every, "seconds": samples[-1]["seconds"],
        **verdict(samples, args.validate_every), "samples": samples,
    }


def intervals(samples, every: int) -> dict:
    """{first update of the interval: (lowest, highest) RSS in MB}, one per validation interval."""
    out = {}
    for s in samples:
        start = s["update"] // every * every
        low, high = out.get(start, (float("inf"), 0.0))
        out[start] = (min(low, s["rss_mb"]), max(high, s["rss_mb"]))
    return out


def verdict(samples, every: int) -> dict:
    spans = intervals(samples, every)
    after = [spans[u] for u in sorted(spans) if u >= every]  # warm-up: the first interval
    base_peak, base_floor = after[0][1], after[0][0]
    peak, floor = max(h for _, h in after), max(l for l, _ in after)
    return {
        "peak_after_warmup_mb": base_peak, "largest_peak_mb": peak, "growth": round(peak / base_peak - 1, 4),
        "floor_after_warmup_mb": base_floor, "highest_floor_mb": floor, "floor_growth": round(floor / base_floor - 1, 4),
        "passed": peak <= 1.05 * base_peak,
    }


def write_markdown(path: Path, r: dict) -> None:
    lines = [
        "# Soak: resident memory over a long run", "",
        f"Command: `{r['command']}` ({r['seconds']:.0f} s). Training command: `{r['train_command']}`", "",
        f"Peak RSS of the first interval after warm-up (updates {r['validate_every']}-{2 * r['validate_every']}): "
        f"{r['peak_after_warmup_mb']:.1f} MB; largest peak after it: {r['largest_peak_mb']:.1f} MB; growth "
        f"**{100 * r['growth']:+.1f}%** (limit +5%): **{'pass' if r['passed'] else 'FAIL'}**. Floor (lowest RSS of an "
        f"interval): {r['floor_after_warmup_mb']:.1f} MB after warm-up, highest {r['highest_floor_mb']:.1f} MB "
        f"({100 * r['floor_growth']:+.1f}%). A floor that rises and then stays flat (see the table) is the allocator "
        "settling; a leak keeps rising to the last interval.", "",
        "| updates from | lowest RSS (MB) | highest RSS (MB) |", "|---:|---:|---:|",
        *[f"| {u} | {low:.1f} | {high:.1f} |" for u, (low, high) in sorted(intervals(r["samples"], r["validate_every"]).items())],
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--validate-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak_memory"))
    p.add_argument("--reanalyze", action="store_true", help="recompute the verdict and table from OUT.json's samples")
    args = p.parse_args(argv)
    if args.updates < 2 * args.validate_every:
        p.error("--updates must be at least twice --validate-every (warm-up, then the soak)")
    out = Path(args.out)
    if args.reanalyze:
        r = json.loads(out.with_suffix(".json").read_text())
        r.update(verdict(r["samples"], r["validate_every"]))
        for stale in ("rss_after_warmup_mb", "rss_max_after_mb"):
            r.pop(stale, None)
    else:
        r = soak(args)
    atomic_write_text(out.with_suffix(".json"), json.dumps(r, indent=1) + "\n")
    write_markdown(out.with_suffix(".md"), r)
    print(f"growth {100 * r['growth']:+.1f}% ({'pass' if r['passed'] else 'FAIL'}); wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
