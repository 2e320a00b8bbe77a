"""Token dispatch: group routed tokens by expert, run the experts, combine their outputs.

Stateless and router-agnostic: every token-routed MoE (sMLP's tMoE, Switch, GShard, HASH)
comes through `dispatch_to_experts`. `run_experts` runs a block of rows grouped by expert,
the same function in one process and on each worker of expert parallelism (which only
moves the rows to the worker owning their expert and back).
"""
import functools

import torch

from ..distributed import expert_parallel
from .experts import ExpertFFN


def dispatch_to_experts(x: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor, experts: ExpertFFN) -> torch.Tensor:
    """Send each token to its experts, run them, and sum the weighted outputs.

    x: (N, H); expert_index: (N, k) long, -1 where an assignment was dropped;
    weight: (N, k) combine weight of each assignment. Returns (N, H): sum_k w_k f_{e_k}(x),
    zero for a token with no kept assignment (it passes through the caller's residual).
    """
    num_tokens, k = expert_index.shape
    flat_expert = expert_index.reshape(-1)
    token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)
    kept = flat_expert >= 0
    flat_expert, token, flat_weight = flat_expert[kept], token[kept], weight.reshape(-1)[kept]

    # assignments grouped by expert (stable: token order inside each expert)
    order = torch.argsort(flat_expert, stable=True)
    flat_expert, token, flat_weight = flat_expert[order], token[order], flat_weight[order]
    counts = torch.bincount(flat_expert, minlength=experts.num_experts)  # (E,)
    routed = x.index_select(0, token)  # (M, H), grouped by expert
    run_local = functools.partial(run_experts, experts)
    if experts.world_size > 1:  # experts on other ranks: exactly the routed rows travel
        out = expert_parallel.run_sharded_experts(routed, counts, experts.num_local_experts, run_local)
    else:
        out = run_local(routed, counts)
    out = out * flat_weight.unsqueeze(-1).to(out.dtype)  # (M, H)
    return out.new_zeros(x.shape).index_add_(0, token, out).to(x.dtype)


def run_experts(experts: ExpertFFN, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows (M, H) grouped by local expert, counts (E_local,) rows per expert -> (M, H).

    Balanced loads (tMoE training) run as one batched matmul on (E, C, H); uneven loads run
    each expert on exactly its rows (grouped_mm) where torch can, else on (E, C, H) slots
    padded to the largest load.
    """
    num_experts, hidden = counts.numel(), rows.size(-1)  # explicit shapes: a load may be 0
    capacity = int(counts.max()) if rows.size(0) else 0
    if rows.size(0) == num_experts * capacity:  # balanced: rows are already (E, C) slots in order
        return experts(rows.view(num_experts, capacity, hidden)).reshape(-1, hidden)
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=rows.device), counts)  # (M,)
    if experts.can_run_grouped(rows):  # uneven: no padding slots to compute
        return experts.forward_grouped(rows, row_expert, counts)
    # slot of a row inside its expert: its rank among that expert's rows; flat slot e * C + i.
    # index_select / index_copy are the fast CPU paths (2-D advanced indexing is several times
    # slower, forward and backward)
    starts = torch.cumsum(counts, 0) - counts
    flat_slot = row_expert * capacity + torch.arange(rows.size(0), device=rows.device) - starts[row_expert]
    slots = rows.new_zeros(num_experts * capacity, hidden).index_copy(0, flat_slot, rows)
    out = experts(slots.view(num_experts, capacity, hidden))
    return out.reshape(-1, hidden).index_select(0, flat_slot)
