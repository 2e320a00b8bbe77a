"""The token exchange of expert parallelism: experts sharded over the data-parallel workers.

Rank r owns experts [r * E_local, (r + 1) * E_local). Every rank builds its (E, C, H)
dispatch buffer as in one process, then
    all-to-all: slot rows of expert e go to the rank that owns e   -> (W, E_local, C, H)
    local experts run batched on (E_local, W * C, H)
    all-to-all back: outputs return to the rank the token came from -> (E, C, H)
C is the max capacity over all ranks (one scalar all_reduce), so every rank sends the
same number of rows to every rank: an even all_to_all_single, and a rank with fewer
(or zero) tokens pads with zeros instead of hanging. Uses torch's autograd all-to-all
(torch.distributed.nn), which sends gradients back the same way.

Gradients: an expert's gradient already sums the loss of the tokens of ALL ranks, while
fairseq's trainer multiplies every gradient by world_size / sample_size (undoing legacy_ddp's
averaging of shared gradients); `scale_expert_grads` divides expert gradients by the world
size so both end up as sum / sample_size.
"""
import time

import torch
import torch.distributed as dist
from fairseq.distributed import utils as dist_utils
from torch.distributed.nn.functional import all_to_all_single

# seconds spent in all-to-all (forward and backward), read by benchmarks/alltoall_overhead.py
TIMER = {"enabled": False, "seconds": 0.0}


def world_size() -> int:
    return dist_utils.get_data_parallel_world_size()


def rank() -> int:
    return dist_utils.get_data_parallel_rank() if world_size() > 1 else 0


def group():
    return dist_utils.get_data_parallel_group()


def max_over_ranks(value: int, device) -> int:
    """The largest `value` of all ranks (every rank must call this)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group())
    return int(t.item())


def scale_expert_grads(params, world: int) -> None:
    """Divide the gradients of sharded expert params by the world size (see module doc)."""
    for p in params:
        p.register_hook(lambda g, w=world: g / w)


def _exchange(rows: torch.Tensor) -> torch.Tensor:
    """rows: (W * R, H), block w goes to rank w -> (W * R, H), block w came from rank w."""
    if TIMER["enabled"]:
        return _timed_exchange(rows)
    return all_to_all_single(torch.empty_like(rows), rows, group=group())


def _timed_exchange(rows: torch.Tensor) -> torch.Tensor:
    """The same exchange, timing the forward call and (through grad hooks) the backward one."""
    start = time.perf_counter()
    out = all_to_all_single(torch.empty_like(rows), rows, group=group())
    TIMER["seconds"] += time.perf_counter() - start
    if out.requires_grad and rows.requires_grad:
        mark = {}
        out.register_hook(lambda g: mark.__setitem__("t", time.perf_counter()))
        rows.register_hook(lambda g: TIMER.__setitem__("seconds", TIMER["seconds"] + time.perf_counter() - mark["t"]))
    return out


def run_sharded_experts(experts, buffer: torch.Tensor) -> torch.Tensor:
    """buffer: (E, C, H) slots of all E experts on this rank -> (E, C, H) their outputs,
    computed by the ranks that own the experts."""
    num_experts, capacity, hidden = buffer.shape
    world, local = experts.world_size, experts.num_local_experts
    received = _exchange(buffer.reshape(num_experts * capacity, hidden))  # (W * E_local * C, H)
    mine = received.view(world, local, capacity, hidden).transpose(0, 1).reshape(local, world * capacity, hidden)
    out = experts(mine)  # (E_local, W * C, H)
    back = out.view(local, world, capacity, hidden).transpose(0, 1).reshape(num_experts * capacity, hidden)
    return _exchange(back).view(num_experts, capacity, hidden)


def run_sharded_spatial(mixing, groups: torch.Tensor, world: int) -> torch.Tensor:
    """Sharded sMoE (deterministic routing): groups (B, n, E, c) channel chunks of this rank's
    sequences -> (B, n, E, c) mixed, each chunk mixed by the rank owning its spatial expert.

    Every rank pads to the largest B and n of all ranks (right-padding: causal mixing never
    lets a padded later position reach an earlier one), so the all-to-all is even; the rank
    owning experts e runs them over the whole sequences of every rank as one batch.
    """
    bsz, n, num_experts, c = groups.shape
    local = num_experts // world
    sizes = torch.tensor([bsz, n], device=groups.device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group())
    big_b, big_n = int(sizes[0]), int(sizes[1])
    padded = torch.nn.functional.pad(groups, (0, 0, 0, 0, 0, big_n - n, 0, big_b - bsz))  # (B', n', E, c)
    send = padded.permute(2, 0, 1, 3).reshape(num_experts * big_b * big_n, c)  # expert-major: block w -> rank w
    got = _exchange(send).view(world, local, big_b, big_n, c)  # from rank s: its sequences, my experts
    mine = got.permute(0, 2, 3, 1, 4).reshape(world * big_b, big_n, local, c)  # all ranks' sequences
    mixed = mixing(mine)  # (W * B', n', E_local, c)
    back = mixed.view(world, big_b, big_n, local, c).permute(0, 3, 1, 2, 4).reshape(num_experts * big_b * big_n, c)
    out = _exchange(back).view(num_experts, big_b, big_n, c).permute(1, 2, 0, 3)  # (B', n', E, c)
    return out[:bsz, :n]
