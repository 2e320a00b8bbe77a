"""The fp32 master weights of fairseq's --fp16 training travel with the optimizer state.

fairseq saves the fp16 weights and Adam's state but not FP16Optimizer's fp32 master copy, in
which the updates accumulate: a resumed --fp16 run restarted from weights rounded to fp16 and
drifted from the uninterrupted run (loss 10.476 instead of 10.477 three updates after the
restart). The copy is saved under state["fp32_master"] (checkpoints/reshard.py splits it like
the experts) and restored from there; fairseq_patches.py wires these into FP16Optimizer.
"""
from typing import Optional, Tuple

KEY = "fp32_master"


def master_tensors(fp32_params) -> list:
    """FP16Optimizer's fp32 master copies: one per parameter (--fp16-no-flatten-grads) or one
    flat tensor per device."""
    return [p.data for p in (fp32_params.values() if isinstance(fp32_params, dict) else fp32_params)]


def add_masters(state: dict, fp32_params) -> dict:
    """The optimizer's state dict with the master copies in it."""
    state[KEY] = master_tensors(fp32_params)
    return state


def split_masters(state: dict) -> Tuple[dict, Optional[list]]:
    """(the state fairseq's load_state_dict reads, the saved master copies or None); the
    caller's dict is left whole."""
    state = dict(state)
    return state, state.pop(KEY, None)


def restore_masters(saved: Optional[list], fp32_params) -> None:
    """Copy the saved master copies into the optimizer's own, where their shapes agree (a
    checkpoint without them, or of another flattening, keeps the copies fairseq rebuilt)."""
    mine = master_tensors(fp32_params)
    if saved is not None and [t.shape for t in saved] == [t.shape for t in mine]:
        for master, value in zip(mine, saved):
            master.copy_(value)
