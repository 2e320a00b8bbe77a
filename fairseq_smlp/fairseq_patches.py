"""Every change this plugin makes to fairseq's own behaviour, in one place, as wiring only.

Each fairseq target is wrapped once, by one function below that says why for each thing it adds; the logic
lives in the module it belongs to (precision.py, checkpoints/, models/vocabulary.py, optim/, distributed/,
errors.py). tests/unit/test_fairseq_patches.py tests each wrapper. Importing this module applies the numpy
alias fairseq's import needs; `install()` (called once by the plugin's __init__) applies the rest. What only
concerns expert-parallel runs changes nothing unless the model holds sharded experts.
"""
import functools
import types

import numpy as np

from . import precision

# numpy 2 removed np.compat; fairseq 0.12's TokenBlockDataset (fairseq-interactive, hub
# generation for language models) still reads np.compat.long.
if "compat" not in np.__dict__:
    np.compat = types.SimpleNamespace(long=np.int64)

_INSTALLED = False


# ------------------------------------------------------------------ every command
def _patch_cli_entry(distributed_utils) -> None:
    """Every fairseq command starts in call_main, which checks nothing: the full cfg is checked first
    (validation.check_config; fairseq trained --decoder-layers 0 as an embedding-only model), precision flags
    too (--fp16 on a CPU failed deep inside fairseq; CPU --bf16 is autocast, not a TPU run: precision.py), and a
    bad value or an errors.UserError ends the command as one line, no traceback (SMLP_DEBUG=1: the stack)."""
    from .errors import UserError, exit_with
    from .validation import FlagError, check_config

    call_main = distributed_utils.call_main

    @functools.wraps(call_main)
    def call_main_checked(cfg, main, **kwargs):
        try:
            check_config(cfg)
            precision.check_command_precision(cfg)
            return call_main(cfg, main, **kwargs)
        except (FlagError, UserError) as e:
            exit_with(e)

    distributed_utils.call_main = call_main_checked


def _patch_inference_precision(BaseFairseqModel) -> None:
    """fairseq-eval-lm, -generate and -interactive (and the hub) ready a model with prepare_for_inference_(cfg),
    which does nothing for --bf16 on the CPU: the decoder's forwards autocast (precision.autocast_inference)."""
    prepare = BaseFairseqModel.prepare_for_inference_

    @functools.wraps(prepare)
    def prepare_for_inference_(self, cfg):
        prepare(self, cfg)
        precision.autocast_inference(self, cfg)

    BaseFairseqModel.prepare_for_inference_ = prepare_for_inference_


# ------------------------------------------------------------------ checkpoint files
def _patch_checkpoint_files(checkpoint_utils, PathManager, distributed_utils, FairseqLanguageModel) -> None:
    """fairseq's checkpoint files:
    - its torch.load (and rank 0's broadcast) loads weights only: a pickle can run code (checkpoints/safe_load.py);
    - a corrupt checkpoint failed with an unpickling error naming no file: it is named;
    - fairseq compares no dictionaries (a same-size data-bin of other words gave a plausible, wrong
      perplexity): checkpoints record theirs, and loading into another is an error (models/vocabulary.py);
    - checkpoint_N.pt was copied onto checkpoint_last.pt in place (a kill mid-copy truncates it): atomically;
    - --save-dir was created at start to test it (a bad flag then left an empty folder): its nearest
      existing parent is tested, and stale temporaries removed (checkpoints/file_safety.py);
    - each rank resumed from its own checkpoint_last (ranks killed at different moments hung), and a
      missing --restore-file trained from scratch: checkpoints/resume.py decides."""
    from .checkpoints import file_safety
    from .checkpoints.resume import resume_config
    from .checkpoints.safe_load import SafeTorch
    from .models import vocabulary

    checkpoint_utils.torch = SafeTorch()
    distributed_utils.torch = SafeTorch(extra_globals=[distributed_utils._TensorPlaceholder])
    load, load_checkpoint = checkpoint_utils.load_checkpoint_to_cpu, checkpoint_utils.load_checkpoint
    original_copy, load_state_dict = PathManager.copy, FairseqLanguageModel.load_state_dict

    @functools.wraps(load)
    def load_checkpoint_to_cpu(*args, **kwargs):
        return vocabulary.attach(file_safety.load_or_explain(load, *args, **kwargs))

    @functools.wraps(load_state_dict)
    def load_state_dict_checked(self, state_dict, *args, **kwargs):
        vocabulary.check_vocabulary(self, state_dict)
        return load_state_dict(self, state_dict, *args, **kwargs)

    def copy(src_path, dst_path, overwrite=False):
        return file_safety.copy_checkpoint(src_path, dst_path, overwrite, remote_copy=original_copy)

    @functools.wraps(load_checkpoint)
    def load_agreed_checkpoint(cfg, trainer, **kwargs):
        return load_checkpoint(resume_config(cfg, trainer), trainer, **kwargs)

    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    FairseqLanguageModel.load_state_dict = load_state_dict_checked
    PathManager.copy = staticmethod(copy)
    checkpoint_utils.verify_checkpoint_directory = file_safety.ready_save_dir
    checkpoint_utils.load_checkpoint = load_agreed_checkpoint


# ------------------------------------------------------------------ the Trainer
def _patch_trainer(Trainer) -> None:
    """fairseq's Trainer:
    - --bf16 on the CPU trains under bf16 autocast, one context per forward, with fp32 weights and
      optimizer state; torch's cache of bf16 weight copies is emptied after each update, so that a
      caller's autocast around the loop cannot run a step on old weights (precision.py);
    - with sharded experts (fairseq saves on rank 0 only) every rank saves and resumes its own
      -rank-R file with its experts (checkpoints/rank_files.py);
    - its state records the dictionary (models/vocabulary.py) and the bf16 it trained in;
    - only rank 0 created the save folder: every save creates it; a failed crash.pt save replaced
      the error that stopped training: it is best effort (checkpoints/file_safety.py);
    - any error loading parameters became "Cannot load model parameters": the plugin's own cause
      (a dictionary mismatch, an expert layout) is raised instead (errors.py)."""
    from .checkpoints import file_safety, rank_files
    from .errors import with_own_cause
    from .models import vocabulary

    init, state_dict, train_step = Trainer.__init__, Trainer.state_dict, Trainer.train_step
    save, load_checkpoint = Trainer.save_checkpoint, Trainer.load_checkpoint
    should_save, suffix = Trainer.should_save_checkpoint_on_current_rank, Trainer.checkpoint_suffix

    @functools.wraps(init)
    def __init__(self, cfg, task, model, criterion, *args, **kwargs):
        cfg, self.autocast_dtype = precision.trainer_precision(cfg, criterion)
        self.has_sharded_experts = rank_files.configure_trainer(cfg, model)
        init(self, cfg, task, model, criterion, *args, **kwargs)

    @functools.wraps(train_step)
    def train_step_then_forget_casts(self, *args, **kwargs):
        return precision.then_forget_casts(train_step, self, *args, **kwargs)

    def should_save_checkpoint_on_current_rank(self):
        return True if self.has_sharded_experts else should_save.fget(self)

    def checkpoint_suffix(self):
        return rank_files.checkpoint_suffix(suffix.fget(self), self.data_parallel_rank, self.has_sharded_experts)

    @functools.wraps(state_dict)
    def state_dict_recorded(self):
        state = state_dict(self)
        precision.record_trained_precision(state, self.autocast_dtype)
        if self.has_sharded_experts:
            state["expert_parallel"] = rank_files.metadata(self._model, self.data_parallel_world_size,
                                                           self.data_parallel_rank)
        vocabulary.record(state, self.task)
        return state

    @functools.wraps(save)
    def save_checkpoint(self, filename, extra_state):
        return file_safety.save_creating_dir(functools.partial(save, self), filename, extra_state)

    @functools.wraps(load_checkpoint)
    def load_checkpoint_with_cause(self, *args, **kwargs):
        return with_own_cause(load_checkpoint, self, *args, **kwargs)

    Trainer.__init__ = __init__
    Trainer.train_step = train_step_then_forget_casts
    Trainer.state_dict = state_dict_recorded
    Trainer.save_checkpoint = save_checkpoint
    Trainer.load_checkpoint = load_checkpoint_with_cause
    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    Trainer.checkpoint_suffix = property(checkpoint_suffix)


# ------------------------------------------------------------------ logging, gradients, optimizers
def _patch_progress_bar(progress_bar) -> None:
    """The plain log line (simple, tqdm) keeps the routing summary; the per-layer routing
    figures (a hundred fields at 9b) go to the JSON log and TensorBoard only."""
    from .criterions.moe_cross_entropy import without_per_layer

    base_format = progress_bar.BaseProgressBar._format_stats

    def _format_stats(self, stats):
        return base_format(self, without_per_layer(stats))

    progress_bar.BaseProgressBar._format_stats = _format_stats  # JsonProgressBar has its own: keeps all


def _patch_expert_grad_overflow(utils) -> None:
    """fairseq's gradient norm, read by the fp16 loss scaler, leaves expert gradients out, so an inf in one was
    applied to the expert's weights: it is now an overflow, on every rank at once (distributed/expert_parallel.py)."""
    from .distributed.expert_parallel import clip_grad_norm_counting_experts

    clip_grad_norm = utils.clip_grad_norm_

    @functools.wraps(clip_grad_norm)
    def clip_grad_norm_with_experts(params, max_norm, aggregate_norm_fn=None):
        return clip_grad_norm_counting_experts(clip_grad_norm, params, max_norm, aggregate_norm_fn)

    utils.clip_grad_norm_ = clip_grad_norm_with_experts


def _patch_fp16_master_weights(fp16_optimizer) -> None:
    """fairseq saves no fp32 master copy of --fp16 weights, so a resumed run drifted from the uninterrupted one:
    the copy is saved with the optimizer state and restored from it (optim/fp16_masters.py)."""
    from .optim import fp16_masters

    mixin = fp16_optimizer._FP16OptimizerMixin
    state_dict, load_state_dict = mixin.state_dict, mixin.load_state_dict

    @functools.wraps(state_dict)
    def state_dict_with_master(self):
        return fp16_masters.add_masters(state_dict(self), self.fp32_params)

    @functools.wraps(load_state_dict)
    def load_state_dict_with_master(self, state, optimizer_overrides=None):
        state, saved = fp16_masters.split_masters(state)
        load_state_dict(self, state, optimizer_overrides)
        fp16_masters.restore_masters(saved, self.fp32_params)

    mixin.state_dict, mixin.load_state_dict = state_dict_with_master, load_state_dict_with_master


def _patch_cpu_adam(adam) -> None:
    """On the CPU fairseq's Adam is a Python loop of whole-tensor passes per parameter (43 ms of a 4.1M-parameter
    sMLP's step against 11 ms fused: benchmarks/results/optimizer_ab.md): fp32 CPU parameters get torch's fused
    AdamW (optim/cpu_adamw.py); `--use-old-adam` keeps fairseq's."""
    from .optim.cpu_adamw import replace_cpu_adam

    original = adam.FairseqAdam.__init__

    @functools.wraps(original)
    def __init__(self, cfg, params):
        original(self, cfg, params)
        self._optimizer = replace_cpu_adam(self._optimizer, cfg, self.optimizer_config)

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
