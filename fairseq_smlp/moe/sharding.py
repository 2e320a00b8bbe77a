"""Expert parallelism, the module side: keep one rank's experts of a stacked-expert module.

One recipe for the feature experts (ExpertFFN) and the spatial experts (sMoE's causal
mixing matrices): every parameter is stacked (E, ...) along its first dimension; with W
data-parallel workers rank r keeps experts [r * E/W, (r + 1) * E/W). Modules are built with
all E experts and sliced afterwards (distributed/expert_parallel.py, parallelize_experts), so
a sharded model starts with exactly the experts of the unsharded one. Sharded parameters are
marked
  p.expert          fairseq's legacy_ddp skips them in the gradient all-reduce;
  p.expert_sharded  every rank then saves its own checkpoint file (checkpoints/rank_files.py);
and their gradients are divided by W (see distributed/expert_parallel.py, "Gradients").
Nothing here asks the process group: the world size and the rank are arguments.
"""
import torch.nn as nn

from ..distributed import expert_parallel


def shard_stacked(module: nn.Module, num_experts: int, world_size: int, rank: int, flag: str) -> int:
    """Slice `module`'s own (E, ...) parameters to rank `rank`'s experts of `world_size`.

    Returns the local expert count E / W; a no-op with one worker. `flag` names the
    command-line flag that sets E, for the error when W does not divide it.
    """
    if num_experts % world_size != 0:
        raise ValueError(
            f"the expert count ({num_experts}, {flag}) must be a multiple of the number of data-parallel "
            f"workers ({world_size}, --distributed-world-size): experts are sharded across workers"
        )
    local = num_experts // world_size
    if world_size > 1:
        mine = slice(rank * local, (rank + 1) * local)
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.data[mine].clone(), requires_grad=p.requires_grad))
        params = list(module.parameters(recurse=False))
        for p in params:
            p.expert, p.expert_sharded = True, True
        expert_parallel.scale_expert_grads(params, world_size)
    return local
