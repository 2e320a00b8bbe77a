"""Every change this plugin makes to fairseq's own behaviour, in one place, as wiring only.

Each fairseq target is wrapped once, by one function below, which says why for each thing it
adds; the logic lives in the module it belongs to (precision.py, checkpoints/, models/
vocabulary.py, optim/, distributed/). tests/unit/test_fairseq_patches.py tests each wrapper.
Importing this module applies the numpy alias that fairseq's import needs; `install()` (called
once by the plugin's __init__) applies the rest. What only concerns expert-parallel runs
changes nothing unless the model holds sharded experts.
"""
import functools
import logging
import os
import types
from typing import Optional

import numpy as np
import torch

from .precision import autocast_each_call, check_precision, cpu_autocast_dtype, fp32_trainer_config, not_a_tpu_run

# numpy 2 removed np.compat; fairseq 0.12's TokenBlockDataset (fairseq-interactive, hub
# generation for language models) still reads np.compat.long.
if "compat" not in np.__dict__:
    np.compat = types.SimpleNamespace(long=np.int64)

_INSTALLED = False


# ------------------------------------------------------------------ every command
def _patch_cli_entry(distributed_utils) -> None:
    """Every fairseq command starts in call_main, which checks nothing:
    - the full cfg goes through validation.check_config (fairseq checks almost none of its
      numbers: --decoder-layers 0 trains an embedding-only model), and bad precision flags are
      refused before anything is written (--fp16 on a CPU fails deep inside fairseq);
    - on the CPU, --bf16 means bf16 autocast, not a TPU run (fairseq's reading fails looking
      for torch_xla). No command is wrapped in autocast as a whole (precision.py);
    - a bad value, and every errors.UserError raised while the command runs (a refused or
      corrupt checkpoint, a dictionary mismatch), ends the command as one line, no traceback
      (SMLP_DEBUG=1: the stack)."""
    from .errors import UserError, exit_with
    from .validation import FlagError, check_config

    call_main = distributed_utils.call_main

    @functools.wraps(call_main)
    def call_main_checked(cfg, main, **kwargs):
        try:
            check_config(cfg)
            check_precision(cfg)
            if cpu_autocast_dtype(cfg) is not None:
                not_a_tpu_run(cfg)
            return call_main(cfg, main, **kwargs)
        except (FlagError, UserError) as e:
            exit_with(e)

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


# ------------------------------------------------------------------ checkpoint files
def _patch_checkpoint_files(checkpoint_utils, PathManager, distributed_utils, FairseqLanguageModel) -> None:
    """fairseq's checkpoint files:
    - its torch.load (and the load of the state rank 0 broadcasts) loads weights only
      (checkpoints/safe_load.py): a checkpoint's pickle can run code;
    - a corrupt checkpoint fails with an unpickling error naming no file: it is named;
    - checkpoints record their dictionary, and loading one into a model built on another is
      an error (models/vocabulary.py): fairseq compares none, so a same-size data-bin of other
      words printed a plausible, wrong perplexity;
    - checkpoint_N.pt is copied onto checkpoint_last.pt in place (a kill mid-copy leaves a
      truncated file): the copy is atomic;
    - --save-dir is created at start to test it (a run that then fails on a bad flag leaves an
      empty folder): its nearest existing parent is tested instead, and the temporaries that
      kills and full disks leave there are removed;
    - each rank resumed from its own checkpoint_last (ranks killed at different moments hung),
      and a missing --restore-file trained from scratch: checkpoints/resume.py decides."""
    from .checkpoints.file_safety import atomic_copy, load_or_explain, remove_stale_temporaries, verify_save_dir
    from .checkpoints.resume import resume_config
    from .checkpoints.safe_load import SafeTorch
    from .models import vocabulary

    checkpoint_utils.torch = SafeTorch()
    distributed_utils.torch = SafeTorch(extra_globals=[distributed_utils._TensorPlaceholder])
    load, load_checkpoint = checkpoint_utils.load_checkpoint_to_cpu, checkpoint_utils.load_checkpoint
    original_copy, load_state_dict = PathManager.copy, FairseqLanguageModel.load_state_dict

    @functools.wraps(load)
    def load_checkpoint_to_cpu(*args, **kwargs):
        return vocabulary.attach(load_or_explain(load, *args, **kwargs))

    @functools.wraps(load_state_dict)
    def load_state_dict_checked(self, state_dict, *args, **kwargs):
        vocabulary.check_vocabulary(self, state_dict)
        return load_state_dict(self, state_dict, *args, **kwargs)

    def copy(src_path, dst_path, overwrite=False):
        if "://" in src_path or "://" in dst_path:  # remote (iopath) paths: fairseq's own copy
            return original_copy(src_path, dst_path, overwrite=overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        atomic_copy(src_path, dst_path)
        return True

    def verify_checkpoint_directory(save_dir):
        verify_save_dir(save_dir)
        remove_stale_temporaries(save_dir)

    @functools.wraps(load_checkpoint)
    def load_agreed_checkpoint(cfg, trainer, **kwargs):
        return load_checkpoint(resume_config(cfg, trainer), trainer, **kwargs)

    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    FairseqLanguageModel.load_state_dict = load_state_dict_checked
    PathManager.copy = staticmethod(copy)
    checkpoint_utils.verify_checkpoint_directory = verify_checkpoint_directory
    checkpoint_utils.load_checkpoint = load_agreed_checkpoint


# ------------------------------------------------------------------ the Trainer
def _patch_trainer(Trainer) -> None:
    """fairseq's Trainer:
    - --bf16 on the CPU trains under bf16 autocast with fp32 weights and optimizer state, one
      context per forward; after each update torch's cache of bf16 weight copies is emptied, so
      that a caller's own autocast held around the loop cannot run the next step on the old
      weights (precision.py);
    - with sharded experts (fairseq saves on rank 0 only) every rank saves its own file
      -rank-R with its experts and reads it back on resume (checkpoints/rank_files.py);
    - its state records the dictionary (models/vocabulary.py) and the bf16 it trained in;
    - it saves into a folder only rank 0 created: every rank creates it;
    - a failed crash.pt save replaced the error that stopped training: that save is best effort;
    - any error while loading parameters became "Cannot load model parameters ... architectures
      match": the plugin's own cause (a dictionary mismatch, an expert layout) is raised."""
    from .checkpoints import rank_files
    from .models import vocabulary

    init, state_dict, train_step = Trainer.__init__, Trainer.state_dict, Trainer.train_step
    save = Trainer.save_checkpoint
    load_checkpoint = Trainer.load_checkpoint
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
    def state_dict_recorded(self):
        state = state_dict(self)
        if self.autocast_dtype is not None:  # the Trainer ran with --bf16 off (fp32_trainer_config)
            state["cfg"]["common"]["bf16"] = True
        if self.has_sharded_experts:
            layout = (self.data_parallel_world_size, self.data_parallel_rank)
            state["expert_parallel"] = rank_files.metadata(self._model, *layout)
        dictionary = getattr(self.task, "target_dictionary", None)
        if dictionary is not None:
            state["dictionary"] = vocabulary.fingerprint(dictionary)
        return state

    @functools.wraps(save)
    def save_checkpoint(self, filename, extra_state):
        try:
            os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)
            return save(self, filename, extra_state)
        except Exception as e:
            if os.path.basename(filename) != "crash.pt":
                raise
            logging.getLogger(__name__).error(
                f"could not save {filename} ({type(e).__name__}: {e}); the error that stopped training follows")
            return None

    @functools.wraps(load_checkpoint)
    def load_checkpoint_with_cause(self, *args, **kwargs):
        try:
            return load_checkpoint(self, *args, **kwargs)
        except Exception as e:
            cause = own_cause(e)
            if cause is not None:
                raise cause from None
            raise

    Trainer.__init__ = __init__
    Trainer.train_step = train_step_then_forget_casts
    Trainer.state_dict = state_dict_recorded
    Trainer.save_checkpoint = save_checkpoint
    Trainer.load_checkpoint = load_checkpoint_with_cause
    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    Trainer.checkpoint_suffix = property(checkpoint_suffix)


def own_cause(error: BaseException) -> Optional[BaseException]:
    """The plugin's ValueError behind fairseq's generic "Cannot load model parameters", if any."""
    cause = error.__context__
    generic = type(error) is Exception and str(error).startswith("Cannot load model parameters")
    return cause if generic and isinstance(cause, ValueError) else None


# ------------------------------------------------------------------ logging, gradients, optimizers
def _patch_progress_bar(progress_bar) -> None:
    """The plain log line (simple, tqdm) keeps the routing summary; the per-layer routing
    figures (a hundred fields at 9b) go to the JSON log and TensorBoard only."""
    from .criterions.moe_cross_entropy import PER_LAYER_PREFIX

    base_format = progress_bar.BaseProgressBar._format_stats

    def _format_stats(self, stats):
        return base_format(self, {k: v for k, v in stats.items() if not k.startswith(PER_LAYER_PREFIX)})

    progress_bar.BaseProgressBar._format_stats = _format_stats  # JsonProgressBar has its own: keeps all


def _patch_expert_grad_overflow(utils) -> None:
    """fairseq's gradient norm, which the fp16 loss scaler reads to detect an overflow, leaves
    out expert gradients (they differ per rank): an inf in an expert's gradient alone was
    applied and made that expert's weights inf. It now counts as an overflow (norm = inf), on
    every rank at once so that all skip the step together (distributed/expert_parallel.py)."""
    from .distributed.expert_parallel import experts_finite_on_every_rank

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


def _patch_cpu_adam(adam) -> None:
    """On the CPU fairseq's Adam is a Python loop of about ten whole-tensor passes per
    parameter: 43 ms of a step for a 4.1M-parameter sMLP against 11 ms fused
    (benchmarks/results/optimizer_ab.md), a cost that grows with the experts. fp32 CPU
    parameters get torch's fused AdamW instead (optim/cpu_adamw.py); `--use-old-adam` keeps fairseq's."""
    from .optim.cpu_adamw import CpuFusedAdamW

    original = adam.FairseqAdam.__init__

    @functools.wraps(original)
    def __init__(self, cfg, params):
        original(self, cfg, params)
        groups = self._optimizer.param_groups
        tensors = [p for g in groups for p in g["params"]]
        plain_adam = type(self._optimizer) is adam.Adam and not getattr(cfg, "use_old_adam", False)
        if (plain_adam and not getattr(cfg, "tpu", False)
                and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tensors)):
            self._optimizer = CpuFusedAdamW([{"params": g["params"]} for g in groups], **self.optimizer_config)

    adam.FairseqAdam.__init__ = __init__


def install() -> None:
    """Wrap each fairseq target once (the order does not matter: no target is wrapped twice)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq import checkpoint_utils, trainer, utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq.file_io import PathManager
    from fairseq.logging import progress_bar
    from fairseq.models import BaseFairseqModel, FairseqLanguageModel
    from fairseq.optim import adam, fp16_optimizer

    _patch_cli_entry(distributed_utils)
    _patch_inference_precision(BaseFairseqModel)
    _patch_checkpoint_files(checkpoint_utils, PathManager, distributed_utils, FairseqLanguageModel)
    _patch_trainer(trainer.Trainer)
    _patch_progress_bar(progress_bar)
    _patch_expert_grad_overflow(utils)
    _patch_fp16_master_weights(fp16_optimizer)
    _patch_cpu_adam(adam)
    _INSTALLED = True
