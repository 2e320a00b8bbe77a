"""Checkpoints of expert-parallel training: the layout, and the Trainer hooks that write it.

Layout (W workers, experts sharded): every rank r writes its own complete checkpoint
    checkpoint_X-rank-r.pt  (checkpoint_last-rank-r.pt, checkpoint_best-rank-r.pt, ...)
holding the shared parameters (identical on all ranks), rank r's experts (the stacked
(E_local, ...) tensors of every ExpertFFN), its optimizer state, and
    state["expert_parallel"] = {"world_size": W, "rank": r,
                                "expert_params": [names of expert tensors],
                                "param_names": [names in optimizer order]}.
The shared parameters are stored W times: the price of each rank resuming from one file
with fairseq's own loader, no gather at save time (a consolidating save would need a
collective inside fairseq's rank-0-only save path). Resume: each rank loads its own file
(--load-checkpoint-on-all-dp-ranks is switched on). Other world sizes, and fairseq-eval-lm
(one process), need `python -m fairseq_smlp.checkpoints reshard` first; loading a
mismatched file fails with that hint (ExpertFFN._load_from_state_dict).

fairseq 0.12 saves on rank 0 only and has no hook for this, so `install()` wraps four
Trainer members; they change behaviour only when the model holds sharded experts
(world size > 1), and install() is only called in that case.
"""
import os
from fairseq import trainer as fairseq_trainer

SUPPORTED_DDP = ("legacy_ddp", "no_c10d")
_installed = False


def has_sharded_experts(trainer) -> bool:
    return any(getattr(p, "expert_sharded", False) for p in trainer._model.parameters())


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
    if (common.fp16 or common.bf16) and not (getattr(common, "memory_efficient_fp16", False) or getattr(common, "memory_efficient_bf16", False) or getattr(common, "fp16_no_flatten_grads", False)):
        raise ValueError(
            "--fp16/--bf16 with sharded experts needs --fp16-no-flatten-grads (or --memory-efficient-fp16): "
            "flattened fp32 master weights lose the `expert` mark, and the grad norm would mix ranks' experts"
        )


def install() -> None:
    """Wrap fairseq's Trainer once (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    Trainer = fairseq_trainer.Trainer
    orig_init, orig_state_dict = Trainer.__init__, Trainer.state_dict
    orig_should_save, orig_suffix = Trainer.should_save_checkpoint_on_current_rank, Trainer.checkpoint_suffix

    def __init__(self, cfg, *args, **kwargs):
        orig_init(self, cfg, *args, **kwargs)
        if has_sharded_experts(self):
            check_config(cfg)
            cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True  # each rank reads its own experts

    def should_save(self):
        return True if has_sharded_experts(self) else orig_should_save.fget(self)

    def suffix(self):
        base = orig_suffix.fget(self)
        return f"{base}-rank-{self.data_parallel_rank}" if has_sharded_experts(self) else base

    def state_dict(self):
        state = orig_state_dict(self)
        if has_sharded_experts(self):
            named = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
            state["expert_parallel"] = {
                "world_size": self.data_parallel_world_size,
                "rank": self.data_parallel_rank,
                "expert_params": [n for n, p in named if getattr(p, "expert_sharded", False)],
                "param_names": [n for n, _ in named],
            }
        return state

    orig_save = Trainer.save_checkpoint

    def save_checkpoint(self, filename, extra_state):
        # every rank writes its own file, but only rank 0 creates --save-dir in fairseq
        os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)
        return orig_save(self, filename, extra_state)

    Trainer.__init__ = __init__
    Trainer.save_checkpoint = save_checkpoint
    Trainer.state_dict = state_dict
    Trainer.should_save_checkpoint_on_current_rank = property(should_save)
    Trainer.checkpoint_suffix = property(suffix)
