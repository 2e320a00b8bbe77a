"""Expert parallelism, the module side: keep this rank's experts of a stacked-expert module.

One recipe for the feature experts (ExpertFFN) and the spatial experts (sMoE's causal
mixing matrices): every parameter is stacked (E, ...) along its first dimension; with W
data-parallel workers rank r keeps experts [r * E/W, (r + 1) * E/W). The parameters are
initialised for all E experts first and then sliced, so a sharded model starts with
exactly the experts of the unsharded one. Sharded parameters are marked
  p.expert          fairseq's legacy_ddp skips them in the gradient all-reduce;
  p.expert_sharded  every rank then saves its own checkpoint file (checkpoints/rank_files.py);
and their gradients are divided by W (see distributed/expert_parallel.py, "Gradients").
"""
import torch.nn as nn

from ..distributed import expert_parallel


def shard_experts(module: nn.Module, num_experts: int, flag: str):
    """Slice `module`'s own (E, ...) parameters to this rank's experts.

    Returns (world_size, local expert count); a no-op in one process.
    """
    world = expert_parallel.world_size()
    if num_experts % world != 0:
        raise ValueError(
            f"the expert count ({num_experts}, {flag}) must be a multiple of the number of data-parallel "
            f"workers ({world}, --distributed-world-size): experts are sharded across workers"
        )
    local = num_experts // world
    if world > 1:
        rank = expert_parallel.rank()
        mine = slice(rank * local, (rank + 1) * local)
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.data[mine].clone()))
        params = list(module.parameters(recurse=False))
        for p in params:
            p.expert, p.expert_sharded = True, True
        expert_parallel.scale_expert_grads(params, world)
    return world, local
