"""Every change this plugin makes to fairseq's own behaviour, in one place.

Each patch has its one-line reason and a test (tests/test_fairseq_patches.py names them).
Importing this module applies the two that must precede fairseq's import; `install()`
(called once by the plugin's __init__) applies the rest. Patches that only concern
expert-parallel runs change nothing unless the model holds sharded experts.
"""
import copy
import functools
import logging
import os
import sys
import types
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# numpy 2 removed np.compat; fairseq 0.12's TokenBlockDataset (fairseq-interactive, hub
# generation for language models) still reads np.compat.long.
if "compat" not in np.__dict__:
    np.compat = types.SimpleNamespace(long=np.int64)

# torch >= 2.6 loads with weights_only=True by default and refuses fairseq checkpoints (they
# hold omegaconf configs): resume and fairseq-eval-lm would fail. Checkpoints are trusted
# files of the user's own runs; an explicit setting by the user still wins.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

_INSTALLED = False


# ------------------------------------------------------------------ checks at start
def verify_save_dir(save_dir: str) -> None:
    """fairseq creates --save-dir at start to test it, so a run that then fails on a bad flag
    leaves an empty directory: test the nearest existing parent instead (the directory is
    created at the first save)."""
    path = Path(save_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OSError(f"--save-dir {save_dir}: cannot write checkpoints there ({existing} is not a writable directory)")


def _on_cpu(cfg) -> bool:
    return cfg.common.cpu or not torch.cuda.is_available()


def check_precision(cfg) -> None:
    """--fp16 on a CPU fails deep inside fairseq ("Torch not compiled with CUDA enabled"): say
    which flag and what to do before anything starts."""
    common = cfg.common
    if _on_cpu(cfg) and (common.fp16 or common.memory_efficient_fp16):
        flag = "--memory-efficient-fp16" if common.memory_efficient_fp16 else "--fp16"
        raise ValueError(
            f"{flag} needs a CUDA GPU (fairseq's fp16 training keeps fp16 weights and a loss scaler on the GPU), "
            f"but this run is on the CPU (--cpu, or no CUDA device visible): use --bf16 (bf16 autocast with fp32 "
            f"weights) or drop {flag} to train in fp32"
        )
    if _on_cpu(cfg) and common.memory_efficient_bf16:
        raise ValueError(
            "--memory-efficient-bf16 (bf16 weights, no fp32 master copy) is not supported on the CPU: "
            "use --bf16 (bf16 autocast with fp32 weights and optimizer state)"
        )


def cpu_autocast_dtype(cfg) -> Optional[torch.dtype]:
    """torch.bfloat16 for --bf16 on the CPU (autocast, fp32 weights), else None."""
    return torch.bfloat16 if _on_cpu(cfg) and cfg.common.bf16 else None


def autocast(fn, dtype: torch.dtype):
    """fn run under CPU autocast: matmuls in `dtype`, reductions and routers in fp32."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return fn(*args, **kwargs)

    return run


def fp32_trainer_config(cfg):
    """What fairseq's Trainer gets for a CPU bf16 run: --bf16 off (it would cast the model to
    bf16 and keep fp32 master weights in FP16Optimizer) and no TPU (fairseq reads --bf16 as
    one); the precision comes from autocast around the forward instead."""
    cfg = copy.deepcopy(cfg)
    cfg.common.bf16, cfg.common.tpu = False, False
    return cfg


# ------------------------------------------------------------------ the patches
def _patch_checkpoint_files(checkpoint_utils, PathManager) -> None:
    """fairseq copies checkpoint_N.pt onto checkpoint_last.pt in place (a kill mid-copy leaves
    a truncated file), and a corrupt checkpoint fails with an unpickling error naming no file."""
    from .checkpoints.file_safety import atomic_copy, load_or_explain

    original_copy = PathManager.copy

    def copy(src_path, dst_path, overwrite=False):
        if "://" in src_path or "://" in dst_path:  # remote (iopath) paths: fairseq's own copy
            return original_copy(src_path, dst_path, overwrite=overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        atomic_copy(src_path, dst_path)
        return True

    PathManager.copy = staticmethod(copy)
    load = checkpoint_utils.load_checkpoint_to_cpu
    checkpoint_utils.load_checkpoint_to_cpu = functools.wraps(load)(functools.partial(load_or_explain, load))
    checkpoint_utils.verify_checkpoint_directory = verify_save_dir


def _patch_cli_entry(distributed_utils) -> None:
    """Every fairseq command starts in call_main: refuse bad precision flags there, before
    anything is written; on the CPU, --bf16 means bf16 autocast, not a TPU run (fairseq's
    reading, which fails looking for torch_xla). Training autocasts its forward only (the
    Trainer patch); the other commands (eval-lm, validate, generate) run under autocast."""
    call_main = distributed_utils.call_main

    @functools.wraps(call_main)
    def call_main_checked(cfg, main, **kwargs):
        check_precision(cfg)
        dtype = cpu_autocast_dtype(cfg)
        if dtype is not None:
            cfg.common.tpu = False
            if main.__module__ != "fairseq_cli.train":
                main = autocast(main, dtype)
        return call_main(cfg, main, **kwargs)

    distributed_utils.call_main = call_main_checked


def _patch_cli_validation(distributed_utils) -> None:
    """fairseq checks almost none of its numbers (--decoder-layers 0 trains an embedding-only
    model, --max-tokens below --tokens-per-sample trains on the few short blocks): every
    fairseq command's full cfg goes through validation.check_config before it acts; a bad
    value ends the command like an argparse error (the message, no traceback)."""
    from .validation import FlagError, check_config

    call_main = distributed_utils.call_main

    @functools.wraps(call_main)
    def call_main_validated(cfg, main, **kwargs):
        try:
            check_config(cfg)
        except FlagError as e:
            sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
        return call_main(cfg, main, **kwargs)

    distributed_utils.call_main = call_main_validated


def _patch_trainer(Trainer) -> None:
    """--bf16 on the CPU trains under bf16 autocast with fp32 weights and optimizer state; with
    sharded experts (fairseq saves on rank 0 only) every rank saves its own file -rank-R with
    its experts, and reads it back on resume (checkpoints/rank_files.py)."""
    from .checkpoints import rank_files

    init, state_dict, save = Trainer.__init__, Trainer.state_dict, Trainer.save_checkpoint
    should_save, suffix = Trainer.should_save_checkpoint_on_current_rank, Trainer.checkpoint_suffix

    @functools.wraps(init)
    def __init__(self, cfg, task, model, criterion, *args, **kwargs):
        check_precision(cfg)
        self.autocast_dtype = cpu_autocast_dtype(cfg)
        if self.autocast_dtype is not None:
            cfg = fp32_trainer_config(cfg)
            criterion.forward = autocast(criterion.forward, self.autocast_dtype)  # loss and forward; backward outside
        self.has_sharded_experts = rank_files.has_sharded_experts(model)
        if self.has_sharded_experts:
            rank_files.check_config(cfg)
            cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True  # each rank reads its own experts
        init(self, cfg, task, model, criterion, *args, **kwargs)

    def should_save_checkpoint_on_current_rank(self):
        return True if self.has_sharded_experts else should_save.fget(self)

    def checkpoint_suffix(self):
        base = suffix.fget(self)
        return rank_files.rank_suffix(base, self.data_parallel_rank) if self.has_sharded_experts else base

    @functools.wraps(state_dict)
    def state_dict_with_layout(self):
        state = state_dict(self)
        if self.autocast_dtype is not None:  # the Trainer ran with --bf16 off (fp32_trainer_config)
            state["cfg"]["common"]["bf16"] = True
        if self.has_sharded_experts:
            state["expert_parallel"] = rank_files.metadata(self._model, self.data_parallel_world_size, self.data_parallel_rank)
        return state

    @functools.wraps(save)
    def save_checkpoint(self, filename, extra_state):
        os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)  # fairseq makes it on rank 0 only
        return save(self, filename, extra_state)

    Trainer.__init__ = __init__
    Trainer.state_dict = state_dict_with_layout
    Trainer.save_checkpoint = save_checkpoint
    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    Trainer.checkpoint_suffix = property(checkpoint_suffix)


def _patch_dictionary_identity(Trainer, checkpoint_utils, FairseqLanguageModel) -> None:
    """fairseq compares no dictionaries: a checkpoint evaluated on a data-bin with other words
    of the same size prints a plausible, wrong perplexity. Checkpoints record their dictionary
    and loading one into a model built on another is an error (models/vocabulary.py)."""
    from .models import vocabulary

    state_dict, load, load_state_dict = Trainer.state_dict, checkpoint_utils.load_checkpoint_to_cpu, FairseqLanguageModel.load_state_dict

    @functools.wraps(state_dict)
    def state_dict_with_dictionary(self):
        state = state_dict(self)
        dictionary = getattr(self.task, "target_dictionary", None)
        if dictionary is not None:
            state["dictionary"] = vocabulary.fingerprint(dictionary)
        return state

    @functools.wraps(load)
    def load_with_dictionary(*args, **kwargs):
        return vocabulary.attach(load(*args, **kwargs))

    @functools.wraps(load_state_dict)
    def load_state_dict_checked(self, state_dict, *args, **kwargs):
        vocabulary.check_vocabulary(self, state_dict)
        return load_state_dict(self, state_dict, *args, **kwargs)

    Trainer.state_dict = state_dict_with_dictionary
    checkpoint_utils.load_checkpoint_to_cpu = load_with_dictionary
    FairseqLanguageModel.load_state_dict = load_state_dict_checked


def _patch_checkpoint_load_errors(Trainer) -> None:
    """fairseq replaces any error while loading a checkpoint's parameters by "Cannot load model
    parameters ...; please ensure that the architectures match": the plugin's own checks
    (ValueError: dictionary mismatch, expert layout) reach the user as they are."""
    load_checkpoint = Trainer.load_checkpoint

    @functools.wraps(load_checkpoint)
    def load_checkpoint_with_cause(self, *args, **kwargs):
        try:
            return load_checkpoint(self, *args, **kwargs)
        except Exception as e:
            cause = own_cause(e)
            if cause is not None:
                raise cause from None
            raise

    Trainer.load_checkpoint = load_checkpoint_with_cause


def own_cause(error: BaseException) -> Optional[BaseException]:
    """The plugin's ValueError behind fairseq's generic "Cannot load model parameters", if any."""
    cause = error.__context__
    generic = type(error) is Exception and str(error).startswith("Cannot load model parameters")
    return cause if generic and isinstance(cause, ValueError) else None


def _patch_crash_save(Trainer) -> None:
    """On an error in a training step fairseq saves crash.pt and re-raises; when that save
    fails too (full disk, lost directory), its error replaced the one that stopped training.
    The crash save is best effort: its failure is logged, the original error propagates."""
    save = Trainer.save_checkpoint

    @functools.wraps(save)
    def save_checkpoint(self, filename, extra_state):
        if os.path.basename(filename) != "crash.pt":
            return save(self, filename, extra_state)
        try:
            return save(self, filename, extra_state)
        except Exception as e:
            logging.getLogger(__name__).error(
                f"could not save {filename} ({type(e).__name__}: {e}); the error that stopped training follows")
            return None

    Trainer.save_checkpoint = save_checkpoint


def _patch_stale_temporaries(checkpoint_utils) -> None:
    """Kills and full disks leave checkpoint_X.pt.tmp files that nothing cleans: the first
    process of a run removes them from --save-dir when it starts (checkpoints/file_safety.py)."""
    from .checkpoints.file_safety import remove_stale_temporaries

    verify = checkpoint_utils.verify_checkpoint_directory

    @functools.wraps(verify)
    def verify_and_clean(save_dir):
        verify(save_dir)
        remove_stale_temporaries(save_dir)

    checkpoint_utils.verify_checkpoint_directory = verify_and_clean


PER_LAYER_PREFIX = "moe/"  # per-layer routing figures (criterions/moe_cross_entropy.py)


def _patch_progress_bar(progress_bar) -> None:
    """The plain log line (simple, tqdm) keeps the routing summary; the per-layer routing
    figures (a hundred fields at 9b) go to the JSON log and TensorBoard only."""
    base_format = progress_bar.BaseProgressBar._format_stats

    def _format_stats(self, stats):
        return base_format(self, {k: v for k, v in stats.items() if not k.startswith(PER_LAYER_PREFIX)})

    progress_bar.BaseProgressBar._format_stats = _format_stats  # JsonProgressBar has its own: keeps all


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq import checkpoint_utils, trainer
    from fairseq.distributed import utils as distributed_utils
    from fairseq.file_io import PathManager
    from fairseq.logging import progress_bar
    from fairseq.models import FairseqLanguageModel

    _patch_checkpoint_files(checkpoint_utils, PathManager)
    _patch_cli_entry(distributed_utils)
    _patch_cli_validation(distributed_utils)
    _patch_trainer(trainer.Trainer)
    _patch_progress_bar(progress_bar)
    _patch_dictionary_identity(trainer.Trainer, checkpoint_utils, FairseqLanguageModel)
    _patch_checkpoint_load_errors(trainer.Trainer)
    _patch_crash_save(trainer.Trainer)
    _patch_stale_temporaries(checkpoint_utils)
    _INSTALLED = True
