"""Token dispatch: group routed tokens by expert, run the experts, combine their outputs.

Stateless and router-agnostic: every token-routed MoE (sMLP's tMoE, Switch, GShard, HASH)
comes through `dispatch_to_experts`. `run_experts` runs a block of rows grouped by expert,
the same function in one process and on each worker of expert parallelism (which only
moves the rows to the worker owning their expert and back).

One stable sort groups the assignments by expert; its inverse (each assignment's row in the
grouped block) brings the outputs back. When every token has exactly one kept assignment
(tMoE, HASH, Switch without overflow) grouping is a permutation of the tokens, and both
directions (and their gradients) are plain row gathers: no zero-filled buffer, no index_add.
"""
import functools
from typing import NamedTuple, Optional

import torch

from ..distributed import expert_parallel
from .experts import ExpertFFN


class Grouping(NamedTuple):
    """Assignments (token-major: a = n * k + j) grouped by expert."""

    order: torch.Tensor  # (A,) assignments sorted by expert (stable: token order inside an expert), dropped last
    position: torch.Tensor  # (A,) inverse of order: the row of each assignment in the grouped block
    counts: torch.Tensor  # (E,) kept assignments per expert
    num_kept: int  # M: kept assignments (the first M entries of order)


def group_by_expert(flat_expert: torch.Tensor, num_experts: int) -> Grouping:
    """flat_expert: (A,) expert of each assignment, -1 = dropped -> Grouping."""
    key = torch.remainder(flat_expert, num_experts + 1)  # dropped (-1) -> E: sorts after every expert
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    num_kept = flat_expert.numel() - int(counts[num_experts])
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return Grouping(order, position, counts[:num_experts], num_kept)


class _PermuteRows(torch.autograd.Function):
    """x.index_select(0, index) where index is a permutation; the gradient is gathered with the
    inverse permutation (autograd's index_select backward would zero-fill and index_add)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _CombinePermuted(torch.autograd.Function):
    """y[n] = weight[n] * out[position[n]] for a permutation `position` (order = its inverse),
    in one gather and one in-place scale; the backward mirrors it."""

    @staticmethod
    def forward(ctx, out, weight, position, order):
        gathered = out.index_select(0, position)  # (N, H) back in token order
        ctx.save_for_backward(out, weight, position, order)
        return gathered.mul_(weight.to(gathered.dtype))

    @staticmethod
    def backward(ctx, grad):
        out, weight, position, order = ctx.saved_tensors
        grad_rows = grad.index_select(0, order)  # (N, H) in grouped order
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # d/dw_n = <grad_n, out[position[n]]>, computed in grouped order and moved back
            grad_weight = (grad_rows * out).sum(-1, keepdim=True).index_select(0, position).to(weight.dtype)
        grad_out = grad_rows.mul_(weight.index_select(0, order).to(grad_rows.dtype)) if ctx.needs_input_grad[0] else None
        return grad_out, grad_weight, None, None


def dispatch_to_experts(x: torch.Tensor, expert_index: torch.Tensor, weight: Optional[torch.Tensor], experts: ExpertFFN) -> torch.Tensor:
    """Send each token to its experts, run them, and sum the weighted outputs.

    x: (N, H); expert_index: (N, k) long, -1 where an assignment was dropped;
    weight: (N, k) combine weight of each assignment, or None for weight 1 (HASH).
    Returns (N, H): sum_k w_k f_{e_k}(x), zero for a token with no kept assignment (it
    passes through the caller's residual), in the experts' output dtype (under CPU autocast
    bf16, as an autocast linear layer returns; the caller's residual add promotes it exactly).
    """
    num_tokens, k = expert_index.shape
    if experts.world_size == 1:  # (rows between workers keep their dtype)
        # experts that start with a matmul cast their rows to the autocast dtype anyway: cast
        # once before grouping, and move half the bytes (a pre-norm expert normalises fp32 rows)
        x = x.to(experts.input_dtype(x))
    grouping = group_by_expert(expert_index.reshape(-1), experts.num_experts)
    order, position, counts, num_kept = grouping
    run_local = functools.partial(run_experts, experts)

    def run(routed):
        if experts.world_size > 1:  # experts on other ranks: exactly the routed rows travel
            return expert_parallel.run_sharded_experts(routed, counts, experts.num_local_experts, run_local)
        return run_local(routed, counts)

    if k == 1 and num_kept == num_tokens:  # a permutation of the tokens
        out = run(_PermuteRows.apply(x, order, position))
        if weight is None:
            return _PermuteRows.apply(out, position, order)
        return _CombinePermuted.apply(out, weight, position, order)

    kept = order[:num_kept]  # general case: dropped assignments, or k > 1 (GShard)
    token = kept // k if k > 1 else kept
    out = run(x.index_select(0, token))  # (M, H), grouped by expert
    if weight is not None:
        out = out * weight.reshape(-1).index_select(0, kept).unsqueeze(-1).to(out.dtype)
    return out.new_zeros(x.shape).index_add_(0, token, out)


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
    if experts.can_run_grouped(rows):  # uneven: no padding slots to compute
        return experts.forward_grouped(rows, None, counts)
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=rows.device), counts)  # (M,)
    # slot of a row inside its expert: its rank among that expert's rows; flat slot e * C + i.
    # index_select / index_copy are the fast CPU paths (2-D advanced indexing is several times
    # slower, forward and backward)
    starts = torch.cumsum(counts, 0) - counts
    flat_slot = row_expert * capacity + torch.arange(rows.size(0), device=rows.device) - starts[row_expert]
    slots = rows.new_zeros(num_experts * capacity, hidden).index_copy(0, flat_slot, rows)
    out = experts(slots.view(num_experts, capacity, hidden))
    return out.reshape(-1, hidden).index_select(0, flat_slot)
