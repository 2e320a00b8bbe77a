"""Token dispatch: group routed tokens by expert, run the experts, combine their outputs.

Stateless and router-agnostic: every token-routed MoE (sMLP's tMoE, Switch, GShard, HASH)
comes through `dispatch_to_experts`. `run_experts` runs a block of rows grouped by expert,
the same function in one process and on each worker of expert parallelism (which only
moves the rows to the worker owning their expert and back).

One stable sort groups the assignments by expert; its inverse (each assignment's row in the
grouped block) brings the outputs back. When every token has exactly one kept assignment
(tMoE, HASH, Switch without overflow) grouping is a permutation of the tokens, and both
directions (and their gradients) are plain row gathers: no zero-filled buffer, no index_add.

Paths, chosen per call in one process (`set_dispatch_path` / `dispatch_path`):
  "static"   static-shape dispatch: `dispatch_balanced` when every expert gets exactly N/E
             tokens (Base training, a balanced assignment): one permutation, one bmm per
             projection on (E, N/E, H); else `dispatch_padded`: the rows are scattered
             straight into an (E, K, H) buffer, K = the largest load (never more than a
             capacity router's K), one bmm per projection, each token gathers its slots
             weighted by its combine weights; nothing is dropped that the router kept.
  "grouped"  the previous path: rows grouped by expert, uneven loads on exactly their rows
             (grouped_mm where torch can, else slots padded to the largest load): dropless
             in FLOPs as well as in tokens.
  "auto"     (default) what measured fastest (benchmarks/results/layer_microbench_auto.md,
             --compare-paths): exact balance -> dispatch_balanced; uneven loads -> grouped_mm
             on exactly the rows where the experts can run it (fp32: padding to K costs up to
             the capacity factor in FLOPs), else (bf16 autocast) dispatch_padded.
Expert parallelism (world size > 1) always takes the grouped path (rows travel grouped).
"""
import contextlib
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
        grad_out = None
        if ctx.needs_input_grad[0]:
            grad_out = grad_rows.mul_(weight.index_select(0, order).to(grad_rows.dtype))
        return grad_out, grad_weight, None, None


PATHS = ("auto", "static", "grouped")
_PATH = {"default": "auto"}


def set_dispatch_path(path: str) -> None:
    """The dispatch path every later call takes (one of PATHS)."""
    if path not in PATHS:
        raise ValueError(f"dispatch path must be one of {PATHS}, got {path!r}")
    _PATH["default"] = path


@contextlib.contextmanager
def dispatch_path(path: str):
    """with dispatch_path("grouped"): ... runs the calls inside on that path (the backward
    follows the path its forward took)."""
    previous = _PATH["default"]
    set_dispatch_path(path)
    try:
        yield
    finally:
        _PATH["default"] = previous


def dispatch_to_experts(
    x: torch.Tensor, expert_index: torch.Tensor, weight: Optional[torch.Tensor], experts: ExpertFFN,
    path: Optional[str] = None,
) -> torch.Tensor:
    """Send each token to its experts, run them, and sum the weighted outputs.

    x: (N, H); expert_index: (N, k) long, -1 where an assignment was dropped;
    weight: (N, k) combine weight of each assignment, or None for weight 1 (HASH).
    Returns (N, H): sum_k w_k f_{e_k}(x), zero for a token with no kept assignment (it
    passes through the caller's residual), in the experts' output dtype (under CPU autocast
    bf16, as an autocast linear layer returns; the caller's residual add promotes it exactly).
    path: one of PATHS, None for the current default (see the module docstring).
    """
    path = path or _PATH["default"]
    if path not in PATHS:
        raise ValueError(f"dispatch path must be one of {PATHS}, got {path!r}")
    if experts.world_size == 1:  # (rows between workers keep their dtype)
        # experts that start with a matmul cast their rows to the autocast dtype anyway: cast
        # once before grouping, and move half the bytes (a pre-norm expert normalises fp32 rows)
        x = x.to(experts.input_dtype(x))
        if path != "grouped":
            return dispatch_static(x, expert_index, weight, experts, uneven_grouped=path == "auto")
    return dispatch_grouped(x, expert_index, weight, experts)


def dispatch_grouped(
    x: torch.Tensor, expert_index: torch.Tensor, weight: Optional[torch.Tensor], experts: ExpertFFN
) -> torch.Tensor:
    """The "grouped" path: x (N, H), expert_index (N, k) -> (N, H) through rows grouped by
    expert (M, H), M = kept assignments; also the expert-parallel path."""
    num_tokens, k = expert_index.shape
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

    Balanced loads (tMoE training) run as one batched matmul on (E, K, H); uneven loads run
    each expert on exactly its rows (grouped_mm) where torch can, else on (E, K, H) slots
    padded to the largest load.
    """
    num_experts, hidden = counts.numel(), rows.size(-1)  # explicit shapes: a load may be 0
    capacity = int(counts.max()) if rows.size(0) else 0
    if rows.size(0) == num_experts * capacity:  # balanced: rows are already (E, K) slots in order
        return experts(rows.view(num_experts, capacity, hidden)).reshape(-1, hidden)
    if experts.can_run_grouped(rows):  # uneven: no padding slots to compute
        return experts.forward_grouped(rows, None, counts)
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=rows.device), counts)  # (M,)
    # slot of a row inside its expert: its rank among that expert's rows; flat slot e * K + i.
    # index_select / index_copy are the fast CPU paths (2-D advanced indexing is several times
    # slower, forward and backward)
    starts = torch.cumsum(counts, 0) - counts
    flat_slot = row_expert * capacity + torch.arange(rows.size(0), device=rows.device) - starts[row_expert]
    slots = rows.new_zeros(num_experts * capacity, hidden).index_copy(0, flat_slot, rows)
    out = experts(slots.view(num_experts, capacity, hidden))
    return out.reshape(-1, hidden).index_select(0, flat_slot)


# ------------------------------------------------------------------ static-shape dispatch
def dispatch_static(
    x: torch.Tensor, expert_index: torch.Tensor, weight: Optional[torch.Tensor], experts: ExpertFFN,
    uneven_grouped: bool = False,
) -> torch.Tensor:
    """The "static" / "auto" paths, one process: x (N, H), expert_index (N, k) -> (N, H).

    One bincount decides: k = 1, nothing dropped and every expert at exactly N/E tokens ->
    dispatch_balanced; anything else -> dispatch_padded, or (uneven_grouped, "auto") the
    grouped path where the experts run grouped_mm on exactly their rows."""
    num_tokens, k = expert_index.shape
    num_experts = experts.num_experts
    flat = expert_index.reshape(-1)  # (A,), A = N k, token-major: a = n k + j
    key = torch.remainder(flat, num_experts + 1)  # dropped (-1) -> E
    counts = torch.bincount(key, minlength=num_experts + 1)  # (E + 1,): loads, then dropped
    if k == 1 and num_tokens % num_experts == 0 and bool((counts[:num_experts] == num_tokens // num_experts).all()):
        return dispatch_balanced(x, key, weight, experts)
    if uneven_grouped and experts.can_run_grouped(x):
        return dispatch_grouped(x, expert_index, weight, experts)
    return dispatch_padded(x, key, counts, weight, experts)


def dispatch_balanced(
    x: torch.Tensor, expert: torch.Tensor, weight: Optional[torch.Tensor], experts: ExpertFFN
) -> torch.Tensor:
    """Exact balance: x (N, H), expert (N,) with N / E tokens on every expert -> (N, H).

    One stable argsort is the permutation to slots: x[order] is (E, N/E, H) in expert order
    (token order inside an expert); its inverse brings the outputs back, no padding."""
    num_experts, hidden = experts.num_experts, x.size(-1)
    order = torch.argsort(expert, stable=True)  # (N,) slot -> token
    slot_of = torch.arange(order.numel(), device=order.device)
    position = torch.empty_like(order).scatter_(0, order, slot_of)  # token -> slot
    slots = _PermuteRows.apply(x, order, position).view(num_experts, -1, hidden)  # (E, N/E, H)
    out = experts(slots).reshape(-1, hidden)  # (N, H) in slot order
    if weight is None:
        return _PermuteRows.apply(out, position, order)
    return _CombinePermuted.apply(out, weight, position, order)


def slot_positions(key: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """key (A,) expert of each assignment (E = dropped), counts (E + 1,) -> slot (A,).

    slot[a] = e * K + (rank of a among expert e's assignments, in assignment order
    a = n k + j; for top-1 the first-come-first-served position of the router's one-hot
    cumsum); dropped assignments get E * K (a trash row past the buffer). Slots of kept
    assignments are distinct, so scatters into them are copies, never sums."""
    num_experts = counts.numel() - 1
    order = torch.argsort(key, stable=True)  # (A,) assignments by expert
    sorted_key = key.index_select(0, order)
    starts = torch.cumsum(counts, 0) - counts  # (E + 1,) first sorted index of each expert
    rank = torch.arange(key.numel(), device=key.device) - starts.index_select(0, sorted_key)
    sorted_slot = (sorted_key * capacity + rank).clamp_(max=num_experts * capacity)
    return torch.empty_like(order).scatter_(0, order, sorted_slot)


def dispatch_padded(
    x: torch.Tensor, key: torch.Tensor, counts: torch.Tensor, weight: Optional[torch.Tensor], experts: ExpertFFN,
) -> torch.Tensor:
    """Capacity-padded: x (N, H), key (N k,) expert per assignment (E = dropped), counts (E + 1,)
    -> (N, H).

    x (N, H) -> slots (E, K, H) by one scatter per choice (zero rows pad each expert to K, the
    largest load), one bmm per projection, then y[n] = sum_j w[n, j] out[slot[n, j]]: a dropped
    assignment (slot E K) contributes nothing, a token with none gives 0."""
    num_experts, hidden = experts.num_experts, x.size(-1)
    num_tokens = x.size(0)
    capacity = int(counts[:num_experts].max())
    slot = slot_positions(key, counts, capacity).view(num_tokens, -1)  # (N, k)
    has_dropped = bool(counts[num_experts] > 0)
    slots = _ScatterToSlots.apply(x, slot, num_experts * capacity, has_dropped)  # (E K, H)
    out = experts(slots.view(num_experts, capacity, hidden)).reshape(-1, hidden)  # (E K, H)
    return _GatherFromSlots.apply(out, weight, slot, has_dropped)


class _ScatterToSlots(torch.autograd.Function):
    """x (N, H), slot (N, k) -> slots (E K, H): slots[slot[n, j]] = x[n]; slot E K = dropped (a trash
    row, cut off); slots no token fills stay zero. Backward: grad_x[n] = sum_j grad[slot[n, j]]
    over the kept assignments (a clamped gather, dropped rows zeroed: no copy of grad)."""

    @staticmethod
    def forward(ctx, x, slot, num_slots, has_dropped):
        ctx.save_for_backward(slot)
        ctx.num_slots, ctx.has_dropped = num_slots, has_dropped
        buffer = x.new_zeros(num_slots + has_dropped, x.size(-1))
        for j in range(slot.size(1)):  # one scatter per choice: no (N k, H) copy of x
            buffer.index_copy_(0, slot[:, j], x)
        return buffer[:num_slots]

    @staticmethod
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        num_slots = ctx.num_slots
        if num_slots == 0:  # every assignment dropped
            return grad.new_zeros(slot.size(0), grad.size(-1)), None, None, None
        grad_x = None
        for j in range(slot.size(1)):
            rows = grad.index_select(0, slot[:, j].clamp(max=num_slots - 1))
            if ctx.has_dropped:
                rows.masked_fill_(slot[:, j : j + 1] >= num_slots, 0)
            grad_x = rows if grad_x is None else grad_x.add_(rows)
        return grad_x, None, None, None


class _GatherFromSlots(torch.autograd.Function):
    """out (E K, H), weight (N, k) or None (= 1), slot (N, k) -> y (N, H),
    y[n] = sum_j weight[n, j] out[slot[n, j]], where slot E K (dropped) contributes zero.

    A dropped assignment gathers a clamped slot with scale 0 (no zero row appended to out).
    Backward: grad_out[slot[n, j]] = scale[n, j] grad_y[n] (slots are distinct, so a copy, not
    an add; padding slots get zero); grad_weight[n, j] = <grad_y[n], out[slot[n, j]]>, 0 if dropped."""

    @staticmethod
    def forward(ctx, out, weight, slot, has_dropped):
        num_slots, k = out.size(0), slot.size(1)
        kept = slot < num_slots  # (N, k)
        scale = kept.to(torch.float32) if weight is None else weight * kept  # (N, k), 0 where dropped
        index = slot.clamp(max=max(num_slots - 1, 0))
        source = out if num_slots else out.new_zeros(1, out.size(-1))
        ctx.save_for_backward(source, weight, slot, index, scale, kept)
        ctx.num_slots, ctx.has_dropped = num_slots, has_dropped
        y = None
        for j in range(k):  # (a non-finite expert output at a clamped slot reaches a dropped token too)
            picked = source.index_select(0, index[:, j]).mul_(scale[:, j : j + 1].to(out.dtype))  # (N, H)
            y = picked if y is None else y.add_(picked)
        return y

    @staticmethod
    def backward(ctx, grad):
        source, weight, slot, index, scale, kept = ctx.saved_tensors
        num_slots, k = ctx.num_slots, slot.size(1)
        grad_out = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_out = grad.new_zeros(num_slots + ctx.has_dropped, grad.size(-1))
            for j in range(k):  # dropped assignments land in the trash row (scale 0), cut off
                grad_out.index_copy_(0, slot[:, j], grad * scale[:, j : j + 1].to(grad.dtype))
            grad_out = grad_out[:num_slots]
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = torch.stack(
                [(grad * source.index_select(0, index[:, j]).to(grad.dtype)).sum(-1) for j in range(k)], dim=1
            )
            grad_weight = grad_weight.masked_fill_(~kept, 0).to(weight.dtype)
        return grad_out, grad_weight, None, None
