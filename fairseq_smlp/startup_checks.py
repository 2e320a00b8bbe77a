"""Refuse bad runs before anything is written (installed when the plugin is imported).

- fairseq-train creates --save-dir at start to test that it is writable, so a run that then
  fails on a bad flag leaves an empty directory behind: test the nearest existing parent
  instead (fairseq creates the directory itself at the first save).
- `--fp16` on a CPU fails deep inside fairseq with "Torch not compiled with CUDA enabled":
  say which flag, and what to do, before the trainer starts; the same for `--bf16`, which
  fairseq takes for a TPU run when there is no CUDA ("... has no attribute 'xla_device'").
"""
import os
from pathlib import Path

import torch

_INSTALLED = False


def verify_save_dir(save_dir: str) -> None:
    path = Path(save_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OSError(f"--save-dir {save_dir}: cannot write checkpoints there ({existing} is not a writable directory)")


def check_precision(cfg) -> None:
    common = cfg.common
    on_cpu = common.cpu or not torch.cuda.is_available()
    if on_cpu and (common.fp16 or common.memory_efficient_fp16):
        raise ValueError(
            "--fp16 needs a CUDA GPU (fairseq's fp16 training keeps fp16 weights and a loss scaler on the GPU), "
            "but this run is on the CPU (--cpu, or no CUDA device visible): drop --fp16 to train in fp32"
        )
    if on_cpu and (common.bf16 or common.memory_efficient_bf16):
        flag = "--memory-efficient-bf16" if common.memory_efficient_bf16 else "--bf16"
        # fairseq reads --bf16 without CUDA as a TPU run and fails with "'NoneType' ... 'xla_device'"
        raise ValueError(
            f"{flag} needs a CUDA GPU (fairseq takes bf16 on a CPU for a TPU run and fails looking for "
            f"torch_xla), but this run is on the CPU (--cpu, or no CUDA device visible): drop {flag} to train in fp32"
        )


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq import checkpoint_utils, trainer

    checkpoint_utils.verify_checkpoint_directory = verify_save_dir
    original_init = trainer.Trainer.__init__

    def __init__(self, cfg, *args, **kwargs):
        check_precision(cfg)
        original_init(self, cfg, *args, **kwargs)

    trainer.Trainer.__init__ = __init__
    _INSTALLED = True
