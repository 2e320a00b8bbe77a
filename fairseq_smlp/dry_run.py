"""Check a training command without data or GPUs (what the recipes' DRY_RUN=1 runs).

    python -m fairseq_smlp.dry_run --world-size 64 --experts-per-worker 1 -- DATA --arch smlp_lm_9b ...

1. fairseq's own training parser takes the whole argument list (so a typo fails here, not
   after the job has waited for 64 GPUs);
2. the expert counts fit the declared world size (every MoE expert count a multiple of it,
   or exactly `--experts-per-worker` experts per worker);
3. the model is built at full size on the meta device (parameter count, no memory), and at
   reduced width and length on the CPU, where one forward/backward runs on random tokens;
4. the run's cost is estimated from its FLOPs: 3 x forward FLOPs per token (backward ~ 2x
   forward) x tokens (world size x --max-tokens x --update-freq x --max-update), over the
   world size x an assumed GPU peak x an assumed utilisation (flags; an estimate, not a
   measurement).
"""
import argparse
import copy
import sys

import torch

from .models.factory import build_from_config
from .validation import FlagError, check_args, check_config

EXPERT_FLAGS = {"tmoe_experts": "--tmoe-experts", "moe_experts": "--moe-experts"}
WIDTH_FIELDS = (
    "decoder_embed_dim", "decoder_ffn_embed_dim", "tmoe_ffn_embed_dim", "decoder_input_dim", "decoder_output_dim",
)


def parse_fairseq_args(train_args):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, train_args)
    return convert_namespace_to_omegaconf(args)


def check_experts(model_cfg, world_size, experts_per_worker):
    """Return {flag: count} of the MoE expert counts; raise if they do not fit the world size."""
    counts = {flag: getattr(model_cfg, name) for name, flag in EXPERT_FLAGS.items() if getattr(model_cfg, name, 0)}
    for flag, count in counts.items():
        if count % world_size != 0:
            raise SystemExit(f"{flag} {count} is not a multiple of the world size {world_size}")
        if experts_per_worker and count != experts_per_worker * world_size:
            raise SystemExit(
                f"{flag} {count} != {experts_per_worker} expert(s) per worker x {world_size} workers"
            )
    return counts


def reduced(cfg, width_divisor, length):
    """The same architecture, narrower and shorter, so that it fits a CPU."""
    small = copy.deepcopy(cfg)
    for name in WIDTH_FIELDS:
        value = getattr(small.model, name, None)
        if isinstance(value, int):
            setattr(small.model, name, max(8, value // width_divisor))
    small.model.max_target_positions = length
    small.model.tokens_per_sample = length
    small.task.tokens_per_sample = length
    return small


def estimate_days(cfg, forward_flops_per_token, world_size, peak_tflops, utilisation):
    """(training tokens, training FLOPs, days) of the run `cfg` describes."""
    tokens = world_size * cfg.dataset.max_tokens * cfg.optimization.update_freq[0] * cfg.optimization.max_update
    flops = 3 * forward_flops_per_token * tokens
    return tokens, flops, flops / (world_size * peak_tflops * 1e12 * utilisation) / 86400


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, required=True, help="workers the recipe declares (GPUs)")
    p.add_argument("--experts-per-worker", type=int, default=0, help="require exactly this many experts per worker")
    p.add_argument("--vocab-size", type=int, default=51200, help="vocabulary for the full-size parameter count")
    p.add_argument("--width-divisor", type=int, default=16)
    p.add_argument("--length", type=int, default=64, help="sequence length of the reduced model")
    p.add_argument("--gpu-peak-tflops", type=float, default=125.0,
                   help="per-GPU peak for the wall-clock estimate (default 125: V100 fp16 tensor cores)")
    p.add_argument("--utilisation", type=float, default=0.3, help="assumed share of the peak reached (default 0.3)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the fairseq-train arguments")
    args = p.parse_args(argv)
    check_args(p, args)
    train_args = [a for a in args.train_args if a != "--"] if args.train_args[:1] == ["--"] else args.train_args

    cfg = parse_fairseq_args(train_args)
    try:
        check_config(cfg)  # what fairseq-train would refuse at start (fairseq_patches)
    except FlagError as e:
        raise SystemExit(f"dry run: {e}")
    counts = check_experts(cfg.model, args.world_size, args.experts_per_worker)
    if cfg.model.get("max_target_positions") is None and "max_target_positions" in cfg.model:
        cfg.model.max_target_positions = cfg.task.tokens_per_sample

    try:  # rank 0's model of the W-worker run, on the meta device
        full = build_from_config(cfg, args.vocab_size, world_size=args.world_size)
    except ValueError as e:  # e.g. an expert count the world size does not divide
        raise SystemExit(f"dry run: {e}")
    from .flops import count_flops, count_params

    params = count_params(full, world_size=args.world_size)  # every worker's experts
    total, expert = params["total"], params["expert"]

    small_cfg = reduced(cfg, args.width_divisor, args.length)
    model = build_from_config(small_cfg, 1000, device="cpu")
    model.train()
    tokens = torch.randint(4, 1000, (2, args.length))
    out = model(tokens)[0]
    torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), tokens.reshape(-1)).backward()

    print(f"dry run OK: arch {cfg.model._name}, world size {args.world_size}, experts {counts or 'none'}")
    print(
        f"full size: {total / 1e6:,.1f}M parameters ({expert / 1e6:,.1f}M in experts, vocabulary {args.vocab_size:,})"
    )
    print(f"reduced model (width / {args.width_divisor}, {args.length} tokens): forward and backward ran on the CPU")
    if cfg.dataset.max_tokens and cfg.optimization.max_update:
        forward = count_flops(full, cfg.task.tokens_per_sample)["total"]
        tokens, flops, days = estimate_days(cfg, forward, args.world_size, args.gpu_peak_tflops, args.utilisation)
        print(
            f"estimate: {forward / 1e6:,.1f}M forward FLOPs/token x 3 x {tokens / 1e9:,.1f}B tokens = "
            f"{flops:.2e} FLOPs; {days:,.1f} days on {args.world_size} GPUs at {args.gpu_peak_tflops:g} TFLOP/s "
            f"x {args.utilisation:g} utilisation"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
