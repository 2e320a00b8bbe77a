"""Where each rank resumes from: the ranks agree on one update, and an explicit --restore-file
must exist (fairseq resumed each rank from its own checkpoint_last, so ranks killed at
different moments waited on each other forever, and a missing --restore-file trained from
scratch over checkpoint_last). fairseq_patches.py hands fairseq's load_checkpoint the
CheckpointConfig that resume_config returns."""
import copy
import os

import torch

from . import rank_files


def gather(obj, trainer) -> list:
    """obj of every data-parallel rank, in rank order (a collective; [obj] in one process)."""
    if trainer.data_parallel_world_size == 1:
        return [obj]
    out = [None] * trainer.data_parallel_world_size
    torch.distributed.all_gather_object(out, obj, group=trainer.data_parallel_process_group)
    return out


def resume_config(cfg, trainer):
    """The CheckpointConfig fairseq's load_checkpoint gets on this rank: --restore-file set to
    the file this rank must load (checkpoints/rank_files.py). Every rank reaches the same
    decision, or the same error, at the same time."""
    from fairseq.file_io import PathManager

    suffix = trainer.checkpoint_suffix
    per_rank_files = getattr(trainer, "has_sharded_experts", False) and trainer.data_parallel_world_size > 1
    if cfg.restore_file == "checkpoint_last.pt":  # fairseq's default: resume from --save-dir
        if not per_rank_files:
            return cfg
        mine = rank_files.saved_updates(cfg.save_dir, suffix)
        per_rank = gather(mine, trainer)
        updates = rank_files.agree_on_update(per_rank, cfg.save_dir)
        if updates is None:
            return cfg  # a first launch: no rank has a checkpoint
        picked = [os.path.basename(files[updates]) for files in per_rank]
        if trainer.data_parallel_rank == 0 and not all(name.startswith("checkpoint_last") for name in picked):
            rank_files.logger.warning(
                f"resume: the ranks' newest checkpoints differ (a kill while saving); every rank resumes from "
                f"update {updates}, the newest all of them saved:\n{rank_files.describe(per_rank)}"
            )
        if mine[updates] == os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt"):
            return cfg
        cfg = copy.deepcopy(cfg)
        cfg.restore_file, cfg.finetune_from_model = rank_files.strip_rank_suffix(mine[updates]), None
        return cfg
    # an explicit --restore-file: it must exist (fairseq trained from scratch and overwrote
    # checkpoint_last), and a rank file's name on disk stands for the checkpoint
    restore = rank_files.strip_rank_suffix(cfg.restore_file) if per_rank_files else cfg.restore_file
    path = restore.replace(".pt", suffix + ".pt") if suffix else restore  # fairseq's own rule
    exists = PathManager.isfile(path)
    mine = (path, (rank_files.updates_in(path) if per_rank_files else 0) if exists else None)
    per_rank = gather(mine, trainer)
    loaders = per_rank if per_rank_files or getattr(cfg, "load_checkpoint_on_all_dp_ranks", False) else per_rank[:1]
    missing = sorted({p for p, updates in loaders if updates is None})
    if missing:
        raise FileNotFoundError(
            f"--restore-file {cfg.restore_file}: {', '.join(missing)} does not exist "
            "(fairseq would train from scratch and overwrite checkpoint_last.pt)"
        )
    if per_rank_files:
        rank_files.check_same_update(per_rank, f"--restore-file {cfg.restore_file}")
    if restore != cfg.restore_file:
        cfg = copy.deepcopy(cfg)
        cfg.restore_file = restore
    return cfg
