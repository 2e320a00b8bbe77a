"""Precision on the CPU: what --bf16 and --fp16 mean there, and where autocast may live.

--bf16 on the CPU is bf16 autocast with fp32 weights, optimizer state and routing (fairseq's
own reading, a TPU run, fails looking for torch_xla). The one rule for the autocast context:
it ends with the call it wraps (one training step's forward, one evaluation forward). torch
keeps the bf16 copy of each fp32 weight in a cache that only the OUTERMOST context clears on
exit: a context held across optimizer steps runs every later forward on the first step's
weights (a whole `python -m fairseq_cli.train` run inside one context trained to ppl ~1,500).
So no command is ever wrapped whole: training autocasts per step (fairseq_patches, Trainer),
evaluation per forward (fairseq_patches, prepare_for_inference_).
"""
import copy
import functools
import os
from typing import Any, Optional, Tuple

import torch

from .validation import FlagError


def _on_cpu(cfg) -> bool:
    return cfg.common.cpu or not torch.cuda.is_available()


def cpu_fp16_rehearsal() -> bool:
    """SMLP_CPU_FP16=1 (set by the recipes' REHEARSE mode): run fairseq's own --fp16 path on the
    CPU (fp16 weights, fp32 master copies, loss scaling), slowly, to rehearse a GPU run. It
    works with --fp16-no-flatten-grads or --memory-efficient-fp16, the recipes' setting;
    fairseq's flattened master copy asks torch.cuda for its device."""
    return os.environ.get("SMLP_CPU_FP16") == "1"


def check_precision(cfg) -> None:
    """--fp16 on a CPU fails deep inside fairseq ("Torch not compiled with CUDA enabled"): say
    which flag and what to do before anything starts (a FlagError: one line, no traceback)."""
    common = cfg.common
    if _on_cpu(cfg) and (common.fp16 or common.memory_efficient_fp16) and not cpu_fp16_rehearsal():
        flag = "--memory-efficient-fp16" if common.memory_efficient_fp16 else "--fp16"
        raise FlagError(
            f"{flag} needs a CUDA GPU (fairseq's fp16 training keeps fp16 weights and a loss scaler on the GPU), "
            f"but this run is on the CPU (--cpu, or no CUDA device visible): use --bf16 (bf16 autocast with fp32 "
            f"weights) or drop {flag} to train in fp32"
        )
    if _on_cpu(cfg) and common.memory_efficient_bf16:
        raise FlagError(
            "--memory-efficient-bf16 (bf16 weights, no fp32 master copy) is not supported on the CPU: "
            "use --bf16 (bf16 autocast with fp32 weights and optimizer state)"
        )


def cpu_autocast_dtype(cfg) -> Optional[torch.dtype]:
    """torch.bfloat16 for --bf16 on the CPU (autocast, fp32 weights), else None."""
    return torch.bfloat16 if _on_cpu(cfg) and cfg.common.bf16 else None


def autocast_each_call(fn, dtype: torch.dtype):
    """fn run under CPU autocast, one context per call: matmuls in `dtype`, routers and
    reductions in fp32. The context (and with it torch's cache of bf16 weight copies, when it
    is the outermost one) ends when the call returns, so no weight update happens inside it."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return fn(*args, **kwargs)

    return run


def then_forget_casts(step, *args, **kwargs):
    """Run `step` (one training update), then empty torch's cache of bf16 weight copies: a
    caller's own autocast context held around the training loop would otherwise run the next
    step's forward on the copies of the weights from before this update."""
    try:
        return step(*args, **kwargs)
    finally:
        torch.clear_autocast_cache()


def not_a_tpu_run(cfg) -> None:
    """fairseq's option parsing reads --bf16 as a TPU run and writes tpu=True into both the
    common and the distributed config (the latter then wraps the model for XLA, which fails
    at the first all-reduce of a CPU run with several workers)."""
    cfg.common.tpu = False
    distributed = getattr(cfg, "distributed_training", None)
    if distributed is not None and hasattr(distributed, "tpu"):
        distributed.tpu = False


def check_command_precision(cfg) -> None:
    """What every fairseq command does first (fairseq_patches, call_main): refuse bad precision
    flags before anything is written, and read --bf16 on the CPU as autocast, not a TPU run."""
    check_precision(cfg)
    if cpu_autocast_dtype(cfg) is not None:
        not_a_tpu_run(cfg)


def autocast_inference(model, cfg) -> None:
    """For --bf16 on the CPU, run every forward of the model's decoder (which the model's
    forward and generation's forward_decoder both call) under its own bf16 autocast context;
    fairseq's prepare_for_inference_ does nothing for it. Idempotent: wraps at most once."""
    dtype = cpu_autocast_dtype(cfg)
    target = getattr(model, "decoder", model)
    if dtype is not None and not getattr(target, "_smlp_autocast", False):
        target.forward = autocast_each_call(target.forward, dtype)
        target._smlp_autocast = True


def trainer_precision(cfg, criterion) -> Tuple[Any, Optional[torch.dtype]]:
    """(the config fairseq's Trainer gets, the CPU autocast dtype or None). For --bf16 on the
    CPU the criterion's forward (which runs the model) autocasts per call, so the backward
    and the optimizer step run outside the context, and the Trainer sees an fp32 config."""
    check_precision(cfg)
    dtype = cpu_autocast_dtype(cfg)
    if dtype is None:
        return cfg, None
    criterion.forward = autocast_each_call(criterion.forward, dtype)
    return fp32_trainer_config(cfg), dtype


def record_trained_precision(state: dict, autocast_dtype: Optional[torch.dtype]) -> None:
    """A checkpoint of a CPU --bf16 run says bf16 in its cfg: the Trainer itself ran with
    --bf16 off (fp32_trainer_config), and a resume or an evaluation should read what the user asked."""
    if autocast_dtype is not None:
        state["cfg"]["common"]["bf16"] = True


def fp32_trainer_config(cfg):
    """What fairseq's Trainer gets for a CPU bf16 run: --bf16 off (it would cast the model to
    bf16 and keep fp32 master weights in FP16Optimizer) and no TPU; the precision comes from
    autocast around the forward instead."""
    cfg = copy.deepcopy(cfg)
    cfg.common.bf16 = False
    not_a_tpu_run(cfg)
    return cfg
