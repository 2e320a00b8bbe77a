"""Every change this plugin makes to fairseq's own behaviour, in one place.

Each patch has its one-line reason and a test (tests/test_fairseq_patches.py names them).
Importing this module applies the two that must precede fairseq's import; `install()`
(called once by the plugin's __init__) applies the rest. Patches that only concern
expert-parallel runs change nothing unless the model holds sharded experts.
"""
import contextlib
import copy
import functools
import logging
import os
import sys
import types
from pathlib import Path
from typing import Optional
from unittest import mock

import numpy as np
import torch

from .precision import autocast_each_call, check_precision, cpu_autocast_dtype, fp32_trainer_config, not_a_tpu_run

# numpy 2 removed np.compat; fairseq 0.12's TokenBlockDataset (fairseq-interactive, hub
# generation for language models) still reads np.compat.long.
if "compat" not in np.__dict__:
    np.compat = types.SimpleNamespace(long=np.int64)

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


# ------------------------------------------------------------------ the patches
def _patch_checkpoint_files(checkpoint_utils, PathManager) -> None:
    """fairseq copies checkpoint_N.pt onto checkpoint_last.pt in place (a kill mid-copy leaves
    a truncated file), a corrupt checkpoint fails with an unpickling error naming no file, and
    its torch.load (and the load of the state rank 0 broadcasts) would run code in a pickle
    under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: both load through checkpoints/safe_load.py."""
    from fairseq.distributed import utils as distributed_utils

    from .checkpoints.file_safety import atomic_copy, load_or_explain
    from .checkpoints.safe_load import SafeTorch

    checkpoint_utils.torch = SafeTorch()
    distributed_utils.torch = SafeTorch(extra_globals=[distributed_utils._TensorPlaceholder])

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
    reading, which fails looking for torch_xla). No command is wrapped in autocast as a
    whole (precision.py): training autocasts each step, evaluation each forward."""
    call_main = distributed_utils.call_main

    @functools.wraps(call_main)
    def call_main_checked(cfg, main, **kwargs):
        check_precision(cfg)
        if cpu_autocast_dtype(cfg) is not None:
            not_a_tpu_run(cfg)
        return call_main(cfg, main, **kwargs)

    distributed_utils.call_main = call_main_checked


def _patch_inference_precision(BaseFairseqModel) -> None:
    """fairseq-eval-lm, -generate and -interactive (and the hub) ready a loaded model with
    prepare_for_inference_(cfg), but do nothing for --bf16 on the CPU: there every forward of
    the decoder (which the model's forward and generation's forward_decoder both call) runs
    under its own bf16 autocast context."""
    prepare = BaseFairseqModel.prepare_for_inference_

    @functools.wraps(prepare)
    def prepare_for_inference_(self, cfg):
        prepare(self, cfg)
        dtype = cpu_autocast_dtype(cfg)
        target = getattr(self, "decoder", self)
        if dtype is not None and not getattr(target, "_smlp_autocast", False):
            target.forward = autocast_each_call(target.forward, dtype)
            target._smlp_autocast = True

    BaseFairseqModel.prepare_for_inference_ = prepare_for_inference_


def _patch_cli_validation(distributed_utils) -> None:
    """fairseq checks almost none of its numbers (--decoder-layers 0 trains an embedding-only
    model, --max-tokens below --tokens-per-sample trains on the few short blocks): every
    fairseq command's full cfg goes through validation.check_config before it acts; a bad
    value ends the command like an argparse error (the message, no traceback), and so does
    every errors.UserError the plugin raises while the command runs (a refused or corrupt
    checkpoint, a dictionary mismatch)."""
    from .errors import UserError, exit_with
    from .validation import FlagError, check_config

    call_main = distributed_utils.call_main

    @functools.wraps(call_main)
    def call_main_validated(cfg, main, **kwargs):
        try:
            check_config(cfg)
            return call_main(cfg, main, **kwargs)
        except (FlagError, UserError) as e:  # the user's input: one line (SMLP_DEBUG=1: the stack)
            exit_with(e)

    distributed_utils.call_main = call_main_validated


def _patch_trainer(Trainer) -> None:
    """--bf16 on the CPU trains under bf16 autocast with fp32 weights and optimizer state, one
    context per forward; after each update torch's cache of bf16 weight copies is emptied, so
    that a caller's own autocast held around the loop cannot run the next step on the old
    weights (precision.py). With sharded experts (fairseq saves on rank 0 only) every rank saves its own file -rank-R with
    its experts, and reads it back on resume (checkpoints/rank_files.py)."""
    from .checkpoints import rank_files

    init, state_dict, save, train_step = Trainer.__init__, Trainer.state_dict, Trainer.save_checkpoint, Trainer.train_step
    should_save, suffix = Trainer.should_save_checkpoint_on_current_rank, Trainer.checkpoint_suffix

    @functools.wraps(init)
    def __init__(self, cfg, task, model, criterion, *args, **kwargs):
        check_precision(cfg)
        self.autocast_dtype = cpu_autocast_dtype(cfg)
        if self.autocast_dtype is not None:
            cfg = fp32_trainer_config(cfg)
            criterion.forward = autocast_each_call(criterion.forward, self.autocast_dtype)  # backward outside
        self.has_sharded_experts = rank_files.has_sharded_experts(model)
        if self.has_sharded_experts:
            rank_files.check_config(cfg)
            cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True  # each rank reads its own experts
        init(self, cfg, task, model, criterion, *args, **kwargs)

    @functools.wraps(train_step)
    def train_step_then_forget_casts(self, *args, **kwargs):
        try:
            return train_step(self, *args, **kwargs)
        finally:
            torch.clear_autocast_cache()

    def should_save_checkpoint_on_current_rank(self):
        return True if self.has_sharded_experts else should_save.fget(self)

    def checkpoint_suffix(self):
        base = suffix.fget(self)
        if not self.has_sharded_experts or base.endswith(rank_files.rank_suffix("", self.data_parallel_rank)):
            return base  # fairseq itself sets -rank-R for Base layers (distributed_init)
        return rank_files.rank_suffix(base, self.data_parallel_rank)

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
    Trainer.train_step = train_step_then_forget_casts
    Trainer.state_dict = state_dict_with_layout
    Trainer.save_checkpoint = save_checkpoint
    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    Trainer.checkpoint_suffix = property(checkpoint_suffix)


def _gather(obj, trainer) -> list:
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

    from .checkpoints import rank_files

    suffix = trainer.checkpoint_suffix
    per_rank_files = getattr(trainer, "has_sharded_experts", False) and trainer.data_parallel_world_size > 1
    if cfg.restore_file == "checkpoint_last.pt":  # fairseq's default: resume from --save-dir
        if not per_rank_files:
            return cfg
        mine = rank_files.saved_updates(cfg.save_dir, suffix)
        per_rank = _gather(mine, trainer)
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
    per_rank = _gather(mine, trainer)
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


def _patch_resume(checkpoint_utils) -> None:
    """fairseq resumes each rank from whatever its own checkpoint_last holds: ranks killed at
    different moments resumed at different updates and waited on each other forever. An
    explicit --restore-file that does not exist trained from scratch (one INFO line) and
    overwrote checkpoint_last, and a rank file's own name got the rank suffix twice. Now the
    ranks agree on the update they resume from, and a missing file is an error naming it."""
    load_checkpoint = checkpoint_utils.load_checkpoint

    @functools.wraps(load_checkpoint)
    def load_agreed_checkpoint(cfg, trainer, **kwargs):
        return load_checkpoint(resume_config(cfg, trainer), trainer, **kwargs)

    checkpoint_utils.load_checkpoint = load_agreed_checkpoint


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


def experts_finite_on_every_rank(expert_params) -> bool:
    """True when no expert gradient holds inf/NaN on any data-parallel rank (a collective
    with several workers: every rank holds expert parameters, so every rank joins)."""
    from fairseq.distributed import utils as distributed_utils

    grads = [p.grad for p in expert_params if p.grad is not None]
    device = grads[0].device if grads else expert_params[0].device
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True, device=device)
    flag = finite.to(device=device, dtype=torch.float32).reshape(1)
    if torch.distributed.is_initialized() and distributed_utils.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=distributed_utils.get_data_parallel_group())
    return bool(flag.item() == 1)


def _patch_expert_grad_overflow(utils) -> None:
    """fairseq's gradient norm, which the fp16 loss scaler reads to detect an overflow, leaves
    out expert gradients (they differ per rank): an inf in an expert's gradient alone was
    applied and made that expert's weights inf. It now counts as an overflow (norm = inf), on
    every rank at once so that all skip the step together."""
    clip_grad_norm = utils.clip_grad_norm_

    @functools.wraps(clip_grad_norm)
    def clip_grad_norm_with_experts(params, max_norm, aggregate_norm_fn=None):
        params = [params] if torch.is_tensor(params) else list(params)
        total_norm = clip_grad_norm(params, max_norm, aggregate_norm_fn)
        experts = [p for p in params if hasattr(p, "expert")]  # fairseq's own test of the mark
        if experts and not experts_finite_on_every_rank(experts):
            return torch.full_like(torch.as_tensor(total_norm, dtype=torch.float32), float("inf"))
        return total_norm

    utils.clip_grad_norm_ = clip_grad_norm_with_experts


def _master_tensors(fp32_params) -> list:
    """FP16Optimizer's fp32 master copies: one per parameter (--fp16-no-flatten-grads) or one
    flat tensor per device."""
    return [p.data for p in (fp32_params.values() if isinstance(fp32_params, dict) else fp32_params)]


def _patch_fp16_master_weights(fp16_optimizer) -> None:
    """fairseq saves the fp16 weights and Adam's state but not the fp32 master copy the updates
    accumulate in: a resumed --fp16 run restarted from weights rounded to fp16 and drifted from
    the uninterrupted run (loss 10.476 instead of 10.477 three updates after the restart). The
    master copy is saved with the optimizer state and restored from it."""
    mixin = fp16_optimizer._FP16OptimizerMixin
    state_dict, load_state_dict = mixin.state_dict, mixin.load_state_dict

    @functools.wraps(state_dict)
    def state_dict_with_master(self):
        state = state_dict(self)
        state["fp32_master"] = _master_tensors(self.fp32_params)
        return state

    @functools.wraps(load_state_dict)
    def load_state_dict_with_master(self, state, optimizer_overrides=None):
        state = dict(state)
        saved = state.pop("fp32_master", None)
        load_state_dict(self, state, optimizer_overrides)
        mine = _master_tensors(self.fp32_params)
        if saved is not None and [t.shape for t in saved] == [t.shape for t in mine]:
            for master, value in zip(mine, saved):
                master.copy_(value)

    mixin.state_dict, mixin.load_state_dict = state_dict_with_master, load_state_dict_with_master



class CpuFusedAdamW(torch.optim.AdamW):
    """torch's fused AdamW (one kernel per tensor), what fairseq's Adam is on the CPU.
    fairseq's is AdamW too (decoupled weight decay); the one difference is where eps enters:
    torch adds it to the bias-corrected sqrt(v), as fairseq's own GPU FusedAdam does, fairseq's
    CPU Adam before the correction (it matters only for gradients near eps, in the first steps)."""

    supports_flat_params = True  # FP16Optimizer (the CPU fp16 rehearsal) hands it one flat fp32 tensor

    def __init__(self, param_groups, lr, betas, eps, weight_decay):
        super().__init__(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the state of fairseq's Adam (an older checkpoint) says nothing of it
            group["fused"] = True


def _patch_cpu_adam(adam) -> None:
    """On the CPU fairseq's Adam is a Python loop of about ten whole-tensor passes per
    parameter: 43 ms of a step for a 4.1M-parameter sMLP against 11 ms fused
    (benchmarks/results/optimizer_ab.md), a cost that grows with the experts. fp32 CPU
    parameters get torch's fused AdamW instead; `--use-old-adam` keeps fairseq's."""
    original = adam.FairseqAdam.__init__

    @functools.wraps(original)
    def __init__(self, cfg, params):
        original(self, cfg, params)
        groups = self._optimizer.param_groups
        tensors = [p for g in groups for p in g["params"]]
        if (type(self._optimizer) is adam.Adam and not getattr(cfg, "use_old_adam", False) and not getattr(cfg, "tpu", False)
                and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tensors)):
            self._optimizer = CpuFusedAdamW([{"params": g["params"]} for g in groups], **self.optimizer_config)

    adam.FairseqAdam.__init__ = __init__


# ------------------------------------------------------------------ scoped: one-process BaseLayer
class _LocalAll2All(torch.autograd.Function):
    """All-to-all among one worker: every token stays where it is."""

    @staticmethod
    def forward(ctx, xs, input_splits=None, output_splits=None):
        return xs.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


@contextlib.contextmanager
def base_layer_as_only_worker():
    """fairseq's BaseLayer asks torch.distributed for its rank and all-to-all even in one
    process: give it rank 0 and the identity all-to-all while no process group exists (one
    process, e.g. tests or --base-experts 0); nothing changes when torch.distributed is set up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    from fairseq.distributed import utils as distributed_utils
    from fairseq.modules import base_layer

    with mock.patch.object(distributed_utils, "get_data_parallel_rank", lambda: 0), mock.patch.object(base_layer, "All2All", _LocalAll2All):
        yield


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq import checkpoint_utils, trainer, utils
    from fairseq.optim import adam, fp16_optimizer
    from fairseq.distributed import utils as distributed_utils
    from fairseq.file_io import PathManager
    from fairseq.logging import progress_bar
    from fairseq.models import BaseFairseqModel, FairseqLanguageModel

    _patch_checkpoint_files(checkpoint_utils, PathManager)
    _patch_cli_entry(distributed_utils)
    _patch_inference_precision(BaseFairseqModel)
    _patch_cli_validation(distributed_utils)
    _patch_trainer(trainer.Trainer)
    _patch_progress_bar(progress_bar)
    _patch_expert_grad_overflow(utils)
    _patch_resume(checkpoint_utils)
    _patch_fp16_master_weights(fp16_optimizer)
    _patch_dictionary_identity(trainer.Trainer, checkpoint_utils, FairseqLanguageModel)
    _patch_checkpoint_load_errors(trainer.Trainer)
    _patch_crash_save(trainer.Trainer)
    _patch_stale_temporaries(checkpoint_utils)
    _patch_cpu_adam(adam)
    _INSTALLED = True
