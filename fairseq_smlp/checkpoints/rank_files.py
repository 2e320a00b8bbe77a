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
only when the model holds sharded experts. At load, the ranks agree on the update they
resume from (below).
"""
import logging
import os
import re
from typing import Dict, List, Optional, Tuple


from .safe_load import load_checkpoint_file
from ..errors import UserError

logger = logging.getLogger(__name__)

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
    per_parameter = common.memory_efficient_fp16 or common.memory_efficient_bf16 or common.fp16_no_flatten_grads
    if (common.fp16 or common.bf16) and not per_parameter:
        raise ValueError(
            "--fp16/--bf16 with sharded experts needs --fp16-no-flatten-grads (or --memory-efficient-fp16): "
            "flattened fp32 master weights lose the `expert` mark, and the grad norm would mix ranks' experts"
        )


def configure_trainer(cfg, model) -> bool:
    """Whether `model` holds sharded experts; if so, `cfg` (the Trainer's) is checked and every
    rank loads its own checkpoint file at resume (it holds that rank's experts)."""
    if not has_sharded_experts(model):
        return False
    check_config(cfg)
    cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True
    return True


def rank_suffix(suffix: str, rank: int) -> str:
    return f"{suffix}-rank-{rank}"


def checkpoint_suffix(base: str, rank: int, sharded: bool) -> str:
    """The suffix of this rank's checkpoint names: fairseq's own `base`, plus -rank-R with
    sharded experts (unless fairseq already added it: it does for Base layers, in distributed_init)."""
    if not sharded or base.endswith(rank_suffix("", rank)):
        return base
    return rank_suffix(base, rank)


def metadata(model, world_size: int, rank: int) -> dict:
    """state["expert_parallel"] of rank `rank`'s checkpoint (see the layout above)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "world_size": world_size,
        "rank": rank,
        "expert_params": [n for n, p in named if getattr(p, "expert_sharded", False)],
        "param_names": [n for n, _ in named],
    }


# ------------------------------------------------------------------ resume: which file
# After a kill the ranks' newest files can hold different updates (rank 0 had copied update 20
# onto its checkpoint_last, rank 1 not yet); ranks resuming from different updates wait on each
# other forever. At load the ranks therefore agree on the newest update that EVERY rank saved
# (checkpoints/resume.py gathers each rank's `saved_updates` and calls `agree_on_update`).
RANK_FILE = re.compile(r"-rank-(\d+)\.pt$")
INTERVAL_FILE = re.compile(r"^checkpoint_\d+_(\d+)\.pt$")  # checkpoint_<epoch>_<updates>.pt (suffix removed)
EPOCH_FILE = re.compile(r"^checkpoint\d+\.pt$")  # checkpoint<epoch>.pt


class ResumeError(UserError, RuntimeError):
    """The ranks' checkpoints share no update to resume from (the message names each rank's files)."""


def strip_rank_suffix(path: str) -> str:
    """checkpoint_1_20-rank-0.pt -> checkpoint_1_20.pt (fairseq appends each rank's own suffix)."""
    return RANK_FILE.sub(".pt", path)


def updates_in(path: str) -> int:
    """The update count a checkpoint was saved at (memory-mapped: the tensors are not read)."""
    state = load_checkpoint_file(path)
    return int(state["optimizer_history"][-1]["num_updates"])


def saved_updates(save_dir: str, suffix: str) -> Dict[int, str]:
    """{updates: file} of this rank's resumable checkpoints in save_dir: checkpoint_last,
    interval (checkpoint_E_U) and epoch (checkpointE) files; checkpoint_last preferred.
    An unreadable file (truncated by a kill) is left out with a warning."""
    if not os.path.isdir(save_dir):
        return {}
    found = {}
    for name in sorted(os.listdir(save_dir)):
        if not name.endswith(f"{suffix}.pt"):
            continue
        plain = name[: len(name) - len(f"{suffix}.pt")] + ".pt"
        path = os.path.join(save_dir, name)
        interval = INTERVAL_FILE.match(plain)
        if interval:
            found.setdefault(int(interval.group(1)), path)
        elif EPOCH_FILE.match(plain) or plain == "checkpoint_last.pt":
            try:
                updates = updates_in(path)
            except Exception as e:  # noqa: BLE001  (any unpickling error: the file is skipped, and said so)
                logger.warning(f"resume: {path} cannot be read ({type(e).__name__}: {e}); not considered")
                continue
            if plain == "checkpoint_last.pt":
                found[updates] = path
            else:
                found.setdefault(updates, path)
    return found


def describe(per_rank: List[Dict[int, str]]) -> str:
    lines = []
    for rank, files in enumerate(per_rank):
        listed = ", ".join(f"{os.path.basename(p)} @ update {u}" for u, p in sorted(files.items(), reverse=True))
        lines.append(f"  rank {rank}: {listed or 'no checkpoint'}")
    return "\n".join(lines)


def agree_on_update(per_rank: List[Dict[int, str]], save_dir: str) -> Optional[int]:
    """The newest update every rank saved; None when no rank saved any (a first launch).
    Raises ResumeError, naming every rank's files, when the ranks share no update."""
    if not any(per_rank):
        return None
    common = set.intersection(*(set(files) for files in per_rank))
    if not common:
        raise ResumeError(
            f"cannot resume from --save-dir {save_dir}: the ranks' checkpoints hold no common update "
            f"(each rank must resume from the same update, or they wait on each other forever):\n{describe(per_rank)}\n"
            "Resume from a checkpoint every rank has (--restore-file SAVE_DIR/checkpoint_E_U.pt), "
            "or start in a new --save-dir."
        )
    return max(common)


def check_same_update(per_rank: List[Tuple[str, Optional[int]]], flag: str) -> None:
    """An explicit --restore-file: every rank's file exists and holds the same update."""
    missing = [f"  rank {r}: {path}" for r, (path, updates) in enumerate(per_rank) if updates is None]
    if missing:
        raise ResumeError(f"{flag} does not exist for every rank:\n" + "\n".join(missing))
    if len({updates for _, updates in per_rank}) > 1:
        listed = "\n".join(f"  rank {r}: {path} @ update {u}" for r, (path, u) in enumerate(per_rank))
        raise ResumeError(
            f"{flag}: the ranks' files hold different updates, and ranks resuming from different updates "
            f"wait on each other forever:\n{listed}\nPass an interval checkpoint every rank wrote (checkpoint_E_U.pt)."
        )
