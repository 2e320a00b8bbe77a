"""Soak: resident memory of a long fairseq-train run must stay flat.

    python benchmarks/soak_memory.py [--updates 2000] [--validate-every 200] [--threads 1]

Trains smlp_lm_tiny with the real `fairseq-train` (PTB word level, via data_prep) for
--updates updates, validating every --validate-every, and samples the training process's
resident set size (VmRSS in /proc) twice a second, tagged with the last logged update.
Verdict: the largest RSS after warm-up (the first two validation intervals: allocator pools,
the validation iterator, the first checkpoints) against the RSS when warm-up ends; growth
<= 5% passes.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(pid: int) -> float:
    """Resident memory of pid and its children (fairseq may fork data workers), in MB."""
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
    warm = [s for s in samples if s["update"] >= 2 * args.validate_every]  # after two validations and saves
    base, peak = warm[0]["rss_mb"], max(s["rss_mb"] for s in warm)
    return {
        "command": shlex.join(["python", "benchmarks/soak_memory.py", *sys.argv[1:]]),
        "train_command": shlex.join(cmd), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "updates": args.updates, "validate_every": args.validate_every, "seconds": samples[-1]["seconds"],
        "rss_after_warmup_mb": base, "rss_max_after_mb": peak, "growth": round(peak / base - 1, 4),
        "passed": peak <= 1.05 * base, "samples": samples,
    }


def write_markdown(path: Path, r: dict) -> None:
    per_validation = {}
    for s in r["samples"]:  # the largest RSS seen in each validation interval
        bucket = s["update"] // r["validate_every"] * r["validate_every"]
        per_validation[bucket] = max(per_validation.get(bucket, 0), s["rss_mb"])
    lines = [
        "# Soak: resident memory over a long run", "",
        f"Command: `{r['command']}` ({r['seconds']:.0f} s). Training command: `{r['train_command']}`", "",
        f"RSS when warm-up ends (update {2 * r['validate_every']}): {r['rss_after_warmup_mb']:.1f} MB; "
        f"largest after it: {r['rss_max_after_mb']:.1f} MB; growth **{100 * r['growth']:+.1f}%** "
        f"(limit +5%): **{'pass' if r['passed'] else 'FAIL'}**.", "",
        "| updates from | max RSS (MB) |", "|---:|---:|",
        *[f"| {u} | {m:.1f} |" for u, m in sorted(per_validation.items())], "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--validate-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak_memory"))
    args = p.parse_args(argv)
    if args.updates < 2 * args.validate_every:
        p.error("--updates must be at least twice --validate-every (warm-up, then the soak)")
    r = soak(args)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    write_markdown(out.with_suffix(".md"), r)
    print(f"growth {100 * r['growth']:+.1f}% ({'pass' if r['passed'] else 'FAIL'}); wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
