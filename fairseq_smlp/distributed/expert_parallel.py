"""Expert parallelism: experts sharded over the data-parallel workers.

Applied to a built model by one function, `parallelize_experts(model, world_size, rank)`:
models are built with all E experts and without asking the process group; this walks the
model and lets every module that holds experts keep one rank's share (its `shard_experts`
method). The caller names the world size and the rank: the models' build_model the real
ones (`data_parallel_layout`), the offline model factory (models/factory.py) any W for
rank 0's shapes.

The token exchange: rank r owns experts [r * E_local, (r + 1) * E_local). Each rank routes its own tokens, then
    all-to-all of counts: every rank learns how many rows it will get from every rank, for each
        of its local experts (routing is unbalanced in general: Switch, GShard, HASH, greedy eval);
    all-to-all of rows with those variable split sizes: exactly the routed rows travel, grouped by
        destination rank (no padding to a common capacity, nothing dropped);
    local experts run on their rows (moe.dispatch.run_experts, handed in by the caller: this
        module only moves rows and never calls into expert classes);
    all-to-all back with the split sizes swapped: outputs return to the rank the token came from.
Balanced routing (tMoE training: equal counts per expert) is just a special case. A rank with
fewer (or zero) tokens still joins every collective with its (zero) counts, so unequal token
counts never hang. Uses torch's autograd all-to-all (torch.distributed.nn),
which sends gradients back the same way.

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

# seconds spent in the all-to-alls (counts; rows, forward and backward), read by
# benchmarks/alltoall_overhead.py
TIMER = {"enabled": False, "seconds": 0.0}


def parallelize_experts(model: torch.nn.Module, world_size: int, rank: int) -> torch.nn.Module:
    """Shard every expert-holding module of a built `model` over `world_size` workers, keeping
    rank `rank`'s experts; returns the model (a module whose place another takes is replaced).

    A module opts in with `shard_experts(world_size, rank)`, which slices its stacked experts,
    marks their parameters (`expert`, `expert_sharded`), scales their gradients and records
    what its forward needs (moe/sharding.py); it may return a module to take its place
    (a one-process Base layer becomes fairseq's BaseLayer). The outermost such module handles
    its own children. One worker changes nothing; call it once per model.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} workers")
    return _parallelize(model, world_size, rank)


def _parallelize(module: torch.nn.Module, world: int, rank: int) -> torch.nn.Module:
    shard = getattr(module, "shard_experts", None)
    if callable(shard):
        new = shard(world, rank)
        return module if new is None else new
    for name, child in list(module.named_children()):
        new = _parallelize(child, world, rank)
        if new is not child:
            setattr(module, name, new)  # same name, same place in the parent: checkpoint keys unchanged
    return module


def data_parallel_layout():
    """(world size, rank) of this process among the data-parallel workers ((1, 0) without a
    process group): what the models' build_model hands to parallelize_experts."""
    return world_size(), rank()


def world_size() -> int:
    return dist_utils.get_data_parallel_world_size()


def rank() -> int:
    return dist_utils.get_data_parallel_rank() if world_size() > 1 else 0


def group():
    return dist_utils.get_data_parallel_group()


def scale_expert_grads(params, world: int) -> None:
    """Divide the gradients of sharded expert params by the world size (see module doc)."""
    for p in params:
        p.register_hook(lambda g, w=world: g / w)


def _exchange(rows: torch.Tensor, output_splits=None, input_splits=None) -> torch.Tensor:
    """rows: (sum(input_splits), H), block w goes to rank w -> (sum(output_splits), H), block w
    came from rank w. Without splits: W equal blocks each way."""
    size = sum(output_splits) if output_splits is not None else rows.size(0)
    output = rows.new_empty(size, *rows.shape[1:])
    if not TIMER["enabled"]:
        return all_to_all_single(output, rows, output_splits, input_splits, group=group())
    # the same exchange, timing the forward call and (through grad hooks) the backward one
    start = time.perf_counter()
    out = all_to_all_single(output, rows, output_splits, input_splits, group=group())
    TIMER["seconds"] += time.perf_counter() - start
    if out.requires_grad and rows.requires_grad:
        mark = {}
        out.register_hook(lambda g: mark.__setitem__("t", time.perf_counter()))
        rows.register_hook(lambda g: TIMER.__setitem__("seconds", TIMER["seconds"] + time.perf_counter() - mark["t"]))
    return out


def _exchange_counts(counts: torch.Tensor) -> torch.Tensor:
    """counts: (W * E_local,) rows this rank sends to each expert -> (W * E_local,) rows each
    rank sends to this rank's experts (no gradient: routing decisions are integers)."""
    received = torch.empty_like(counts)
    start = time.perf_counter()
    dist.all_to_all_single(received, counts, group=group())
    if TIMER["enabled"]:  # part of the exchange's cost, and the point where ranks wait for each other
        TIMER["seconds"] += time.perf_counter() - start
    return received


def run_sharded_experts(rows: torch.Tensor, counts: torch.Tensor, num_local: int, run_local) -> torch.Tensor:
    """rows: (M, H) this rank's routed rows, grouped by expert; counts: (E,) rows per expert
    -> (M, H) the experts' outputs in the same order, computed by the ranks owning the experts.

    run_local(rows, counts) runs this rank's num_local experts on rows grouped by local expert
    (moe.dispatch.run_experts): this module only moves rows.
    """
    world = counts.numel() // num_local
    received_counts = _exchange_counts(counts)  # (W * E_local,): from rank s, rows for my expert l
    # split sizes must be host ints (a device sync on GPU: the price of sending no padding)
    send_splits = counts.view(world, num_local).sum(1).tolist()
    receive_splits = received_counts.view(world, num_local).sum(1).tolist()
    received = _exchange(rows, receive_splits, send_splits)  # (R, H): by source rank, then local expert
    out = _by_local_expert(received, received_counts.view(world, num_local), run_local)
    return _exchange(out, send_splits, receive_splits)


def _by_local_expert(rows: torch.Tensor, counts: torch.Tensor, run_local) -> torch.Tensor:
    """rows: (R, H) ordered by (source rank, local expert), counts: (W, E_local) -> run_local's
    outputs (R, H) in the same order (regrouped expert-major for run_local, then back)."""
    world, local = counts.shape
    if local == 1:  # one expert per worker (the paper's layout): already grouped
        return run_local(rows, counts.sum(0))
    expert_of_row = torch.arange(local, device=rows.device).repeat(world).repeat_interleave(counts.flatten())
    order = torch.argsort(expert_of_row, stable=True)  # expert-major
    out = run_local(rows.index_select(0, order), counts.sum(0))
    return torch.zeros_like(out).index_copy(0, order, out)  # back to the received order


def run_sharded_spatial(mixing, groups: torch.Tensor, world: int) -> torch.Tensor:
    """Sharded sMoE (deterministic routing): groups (B, T, E, c) channel chunks of this rank's
    sequences -> (B, T, E, c) mixed, each chunk mixed by the rank owning its spatial expert.

    Every rank pads to the largest B and T of all ranks (right-padding: causal mixing never
    lets a padded later position reach an earlier one), so the all-to-all is even; the rank
    owning experts e runs them over the whole sequences of every rank as one batch.
    """
    bsz, length, num_experts, c = groups.shape
    local = num_experts // world
    sizes = torch.tensor([bsz, length], device=groups.device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group())
    big_b, big_t = int(sizes[0]), int(sizes[1])
    padded = torch.nn.functional.pad(groups, (0, 0, 0, 0, 0, big_t - length, 0, big_b - bsz))  # (B', T', E, c)
    send = padded.permute(2, 0, 1, 3).reshape(num_experts * big_b * big_t, c)  # expert-major: block w -> rank w
    got = _exchange(send).view(world, local, big_b, big_t, c)  # from rank s: its sequences, my experts
    mine = got.permute(0, 2, 3, 1, 4).reshape(world * big_b, big_t, local, c)  # all ranks' sequences
    mixed = mixing(mine)  # (W * B', T', E_local, c)
    back = mixed.view(world, big_b, big_t, local, c).permute(0, 3, 1, 2, 4).reshape(num_experts * big_b * big_t, c)
    out = _exchange(back).view(num_experts, big_b, big_t, c).permute(1, 2, 0, 3)  # (B', T', E, c)
    return out[:bsz, :length]


def experts_finite_on_every_rank(expert_params) -> bool:
    """True when no expert gradient holds inf/NaN on any data-parallel rank (a collective
    with several workers: every rank holds expert parameters, so every rank joins)."""
    from fairseq.distributed import utils as distributed_utils

    grads = [p.grad for p in expert_params if p.grad is not None]
    device = grads[0].device if grads else expert_params[0].device
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True, device=device)
    flag = finite.to(device=device, dtype=torch.float32).reshape(1)
    if torch.distributed.is_initialized() and distributed_utils.get_data_parallel_world_size() > 1:
        group = distributed_utils.get_data_parallel_group()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item() == 1)


def clip_grad_norm_counting_experts(clip_grad_norm, params, max_norm, aggregate_norm_fn=None):
    """fairseq's `clip_grad_norm(params, ...)`, or inf when an expert gradient overflowed on any
    rank. fairseq's norm leaves expert gradients out (they differ per rank), so the fp16 loss
    scaler never saw an inf there and applied it to the expert's weights; as an inf norm every
    rank skips the step together. A collective when experts are present."""
    params = [params] if torch.is_tensor(params) else list(params)
    total_norm = clip_grad_norm(params, max_norm, aggregate_norm_fn)
    experts = [p for p in params if hasattr(p, "expert")]  # fairseq's own test of the mark
    if experts and not experts_finite_on_every_rank(experts):
        return torch.full_like(torch.as_tensor(total_norm, dtype=torch.float32), float("inf"))
    return total_norm
