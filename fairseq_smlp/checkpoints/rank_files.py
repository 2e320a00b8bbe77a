"""Checkpoints of expert-parallel training: one complete file per rank.

Layout (W workers, experts sharded): every rank r writes its own complete checkpoint
    checkpoint_X-rank-r.pt  (checkpoint_last-rank-r.pt, checkpoint_best-rank-r.pt, ...)
holding the shared parameters (identical on all ranks), rank r's experts (the stacked
(E_local, ...) tensors of every sharded module), its optimizer state, and
    state["expert_parallel"] = {"world_size": W, "rank": r,
                                "expert_params": [names of expert tensors],
                                "param_names": [names in optimizer order]}.
The shared parameters are stored W times: the price of each rank resuming from one file
with fairseq's own loader, no gather at save time (a consolidating save would need a
collective inside fairseq's rank-0-only save path). Resume: each rank loads its own file
(--load-checkpoint-on-all-dp-ranks is switched on). Other world sizes, and fairseq-eval-lm
(one process), need `python -m fairseq_smlp.checkpoints reshard` first; loading a
mismatched file fails with that hint (ExpertFFN._load_from_state_dict).

fairseq 0.12 saves on rank 0 only and has no hook for this: fairseq_patches.py wraps the
Trainer members that decide who saves, under which name and what; they change behaviour
only when the model holds sharded experts.
"""
SUPPORTED_DDP = ("legacy_ddp", "no_c10d")


def has_sharded_experts(model) -> bool:
    return any(getattr(p, "expert_sharded", False) for p in model.parameters())


def check_config(cfg) -> None:
    """Refuse, at start, the combinations that would silently train wrong."""
    backend = cfg.distributed_training.ddp_backend
    if backend not in SUPPORTED_DDP:
        raise ValueError(
            f"--ddp-backend {backend} does not support sharded experts (--tmoe-experts / --moe-experts "
            f"over {cfg.distributed_training.distributed_world_size} workers): c10d/pytorch_ddp average "
            "every gradient and broadcast rank 0's parameters (and need a GPU), fully_sharded re-shards "
            f"them; use --ddp-backend legacy_ddp (or no_c10d)"
        )
    common = cfg.common
    if (common.fp16 or common.bf16) and not (common.memory_efficient_fp16 or common.memory_efficient_bf16 or common.fp16_no_flatten_grads):
        raise ValueError(
            "--fp16/--bf16 with sharded experts needs --fp16-no-flatten-grads (or --memory-efficient-fp16): "
            "flattened fp32 master weights lose the `expert` mark, and the grad norm would mix ranks' experts"
        )


def rank_suffix(suffix: str, rank: int) -> str:
    return f"{suffix}-rank-{rank}"


def metadata(model, world_size: int, rank: int) -> dict:
    """state["expert_parallel"] of rank `rank`'s checkpoint (see the layout above)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "world_size": world_size,
        "rank": rank,
        "expert_params": [n for n, p in named if getattr(p, "expert_sharded", False)],
        "param_names": [n for n, _ in named],
    }
