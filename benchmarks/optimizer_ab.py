"""One Adam step on the CPU: fairseq's Adam (`--use-old-adam`) against torch's fused AdamW, which
the plugin gives fp32 CPU runs (fairseq_patches._patch_cpu_adam), on the tiny models' parameters.

    python -m benchmarks.optimizer_ab [--threads 1] [--steps 30] [--rounds 5] [--out benchmarks/results/optimizer_ab]

Both optimizers are built by fairseq's `build_optimizer` from the same `--optimizer adam` flags as
the study's runs, over the real parameters of each model (random gradients). Rounds alternate the
two, so that a change in machine load hits both; the figure is each one's median round.
Results: OUT.json and OUT.md.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks._results import markdown_header, run_metadata, write_results
from fairseq_smlp.models.factory import build_model
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

MODELS = {  # the sparsity study's models (16 experts) and their dense counterparts
    "gmlp": ("gmlp_lm_tiny", []),
    "smlp_top1_e16": ("smlp_lm_tiny", ["--smoe-experts", "16", "--tmoe-experts", "16", "--tmoe-router", "top1"]),
    "transformer": ("transformer_lm_tiny", []),
    "switch_e16": ("switch_lm_tiny", ["--moe-experts", "16"]),
    "base_e16": ("base_lm_tiny", ["--base-experts", "16"]),
}


def adam(params, *flags):
    from fairseq import optim, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = ["/data", "--task", "language_modeling", "--arch", "transformer_lm", "--optimizer", "adam", "--lr", "0.008",
            "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01", "--cpu", *flags]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    return optim.build_optimizer(cfg.optimizer, params)


def step_ms(optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def measure(arch, model_args, steps: int, rounds: int) -> dict:
    model, _ = build_model(arch, model_args, vocab=8000, device="cpu")  # the study's 8k BPE
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {"fairseq": adam(params, "--use-old-adam"), "fused": adam(params)}
    assert type(optimizers["fused"].optimizer).__name__ == "CpuFusedAdamW"
    times = {name: [] for name in optimizers}
    for name, opt in optimizers.items():  # warm-up: state allocation
        step_ms(opt, 2)
    for _ in range(rounds):
        for name, opt in optimizers.items():
            times[name].append(step_ms(opt, steps))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"params": sum(p.numel() for p in params), "fairseq_ms": median["fairseq"], "fused_ms": median["fused"],
            "speedup": median["fairseq"] / median["fused"], "rounds": times}


def write_markdown(path: Path, result: dict) -> None:
    meta = result["meta"]
    lines = markdown_header(
        "One Adam step on the CPU: fairseq's Adam against torch's fused AdamW", meta,
        f"Median of {meta['rounds']} alternating rounds of {meta['steps']} steps each.",
    ) + [
        "| model | parameters | fairseq Adam (ms/step) | fused AdamW (ms/step) | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in result["models"].items():
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['fairseq_ms']:.1f} | {r['fused_ms']:.1f} | {r['speedup']:.1f}x |")
    atomic_write_text(path, "\n".join(lines + [""]))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.optimizer_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "optimizer_ab"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {**run_metadata("optimizer_ab.py", argv), "steps": args.steps, "rounds": args.rounds}
    models = {}
    for name in args.models:
        models[name] = measure(*MODELS[name], args.steps, args.rounds)
        print(f"{name}: {models[name]['fairseq_ms']:.1f} -> {models[name]['fused_ms']:.1f} ms/step", flush=True)
    write_results(args.out, {"meta": meta, "models": models}, write_markdown)


if __name__ == "__main__":
    main()
