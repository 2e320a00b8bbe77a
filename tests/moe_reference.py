"""The MoE hot paths as they were before the speed work: plain, obviously-right
compositions of torch ops, kept as the reference that the fast paths in fairseq_smlp.moe and
fairseq_smlp.modules must equal (outputs, gradients and routing decisions).
"""
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ dispatch and experts
def experts_on_slots(experts, x):
    """ExpertFFN on (E, C, H) slots: LN_e, W1_e, act, W2_e, one batched matmul each."""
    if experts.norm_weight is not None:
        x = F.layer_norm(x, (experts.embed_dim,)) * experts.norm_weight + experts.norm_bias
    h = experts.activation(torch.baddbmm(experts.fc1_bias, x, experts.fc1_weight))
    return torch.baddbmm(experts.fc2_bias, h, experts.fc2_weight)


def run_experts_padded(experts, rows, counts):
    """rows (M, H) grouped by expert -> (M, H), through slots padded to the largest load."""
    num_experts, hidden = counts.numel(), rows.size(-1)
    capacity = int(counts.max()) if rows.size(0) else 0
    row_expert = torch.repeat_interleave(torch.arange(num_experts), counts)
    starts = torch.cumsum(counts, 0) - counts
    flat_slot = row_expert * capacity + torch.arange(rows.size(0)) - starts[row_expert]
    slots = rows.new_zeros(num_experts * capacity, hidden).index_copy(0, flat_slot, rows)
    out = experts_on_slots(experts, slots.view(num_experts, capacity, hidden))
    return out.reshape(-1, hidden).index_select(0, flat_slot)


def dispatch_to_experts(x, expert_index, weight, experts):
    """x (N, H), expert_index (N, k) (-1 dropped), weight (N, k) -> sum_k w_k f_{e_k}(x)."""
    num_tokens, k = expert_index.shape
    flat_expert = expert_index.reshape(-1)
    token = torch.arange(num_tokens).repeat_interleave(k)
    kept = flat_expert >= 0
    flat_expert, token, flat_weight = flat_expert[kept], token[kept], weight.reshape(-1)[kept]
    order = torch.argsort(flat_expert, stable=True)
    flat_expert, token, flat_weight = flat_expert[order], token[order], flat_weight[order]
    counts = torch.bincount(flat_expert, minlength=experts.num_experts)
    out = run_experts_padded(experts, x.index_select(0, token), counts)
    out = out * flat_weight.unsqueeze(-1).to(out.dtype)
    return out.new_zeros(x.shape).index_add_(0, token, out).to(x.dtype)


# ------------------------------------------------------------------ routers
def within_capacity(expert, capacity, num_experts, active=None, offset=None):
    """First come, first served, by a one-hot running count."""
    one_hot = F.one_hot(expert, num_experts)
    if active is not None:
        one_hot = one_hot * active.unsqueeze(1)
    position = (torch.cumsum(one_hot, dim=0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)
    if offset is not None:
        position = position + offset[expert]
    kept = position < capacity
    return kept if active is None else kept & active


def switch_aux_loss(probs, top1):
    num_experts = probs.size(-1)
    fraction = torch.bincount(top1, minlength=num_experts).float() / top1.numel()
    return num_experts * torch.sum(fraction * probs.float().mean(0))


def gate_aux_loss(router, logits, probs, first):
    loss = switch_aux_loss(probs, first)
    if router.z_loss_weight > 0:
        loss = loss + router.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
    return loss


def stats(num_experts, expert_index):
    kept = expert_index >= 0
    counts = torch.bincount(expert_index[kept], minlength=num_experts).float()
    return counts, (~kept.any(dim=1)).sum(), torch.tensor(expert_index.size(0))


def top1_route(router, x):
    """Switch: (expert_index, weight, aux_loss, (counts, dropped, total))."""
    logits = F.linear(x.float(), router.gate.weight.float())
    probs = torch.softmax(logits, dim=-1)
    gate, first = probs.max(dim=-1)
    kept = within_capacity(first, router.capacity(x.size(0)), router.num_experts)
    expert_index = torch.where(kept, first, torch.full_like(first, -1)).unsqueeze(1)
    weight = (gate * kept).unsqueeze(1)
    return expert_index, weight, gate_aux_loss(router, logits, probs, first), stats(router.num_experts, expert_index)


def top2_route(router, x):
    """GShard: (expert_index, weight, aux_loss, (counts, dropped, total))."""
    logits = F.linear(x.float(), router.gate.weight.float())
    probs = torch.softmax(logits, dim=-1)
    first = probs.argmax(dim=-1)
    noisy = logits.detach()
    if router.training and router.second_expert_policy == "sampling":
        uniform = torch.rand_like(noisy).clamp(min=1e-9, max=1 - 1e-9)
        noisy = noisy - torch.log(-torch.log(uniform))
    second = noisy.scatter(1, first.unsqueeze(1), float("-inf")).argmax(dim=-1)
    g1, g2 = probs.gather(1, first.unsqueeze(1)).squeeze(1), probs.gather(1, second.unsqueeze(1)).squeeze(1)
    wants_second = torch.ones_like(first, dtype=torch.bool)
    if router.training and router.second_expert_policy == "random":
        wants_second = 2 * (g2 / (g1 + g2)).detach() > torch.rand_like(g2)
    capacity = router.capacity(x.size(0))
    if router.queue == "causal":
        kept = causal_queue(first.tolist(), second.tolist(), wants_second.tolist(), capacity, router.num_experts)
    else:
        keep1 = within_capacity(first, capacity, router.num_experts)
        first_counts = torch.bincount(first, minlength=router.num_experts)
        keep2 = within_capacity(second, capacity, router.num_experts, active=wants_second, offset=first_counts)
        kept = torch.stack([keep1, keep2], dim=1)
    experts = torch.stack([first, second], dim=1)
    gates = torch.stack([g1, g2], dim=1) * kept
    weight = gates / gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).tiny)
    expert_index = torch.where(kept, experts, torch.full_like(experts, -1))
    return expert_index, weight, gate_aux_loss(router, logits, probs, first), stats(router.num_experts, expert_index)


def causal_queue(first, second, wants_second, capacity, num_experts):
    """Tokens in order, each one's first choice then its second, while the expert has room."""
    used = [0] * num_experts
    kept = []
    for e1, e2, wants in zip(first, second, wants_second):
        row = []
        for expert, active in ((e1, True), (e2, wants)):
            row.append(bool(active and used[expert] < capacity))
            used[expert] += row[-1]
        kept.append(row)
    return torch.tensor(kept, dtype=torch.bool).reshape(-1, 2)


# ------------------------------------------------------------------ balanced assignment
def price_assignment(scores, capacity, max_sweeps=50):
    """Balanced assignment by Gauss-Seidel sweeps over expert prices, all problems of the
    batch swept together until every one is balanced (then the first choices), else filled."""
    *batch, num_items, num_experts = scores.shape
    if num_experts == 1:
        return scores.new_zeros(scores.shape[:-1], dtype=torch.long)
    slots = capacity.tolist()
    scores_t = scores.transpose(-1, -2).contiguous()
    adjusted = scores_t.clone()
    for _ in range(max_sweeps):
        for e in range(num_experts):
            adjusted[..., e, :] = float("-inf")
            gain = scores_t[..., e, :] - adjusted.amax(-2)
            adjusted[..., e, :] = scores_t[..., e, :] - clearing_price(gain, slots[e]).unsqueeze(-1)
        if torch.equal((adjusted == adjusted.amax(-2, keepdim=True)).sum(-1), capacity.expand(*batch, -1)):
            return adjusted.transpose(-1, -2).contiguous().argmax(-1)
    from fairseq_smlp.moe.balanced_assignment import _fill_by_preference

    flat = adjusted.reshape(-1, num_experts, num_items)
    return torch.stack([_fill_by_preference(a.t(), capacity) for a in flat]).view(*batch, num_items)


def clearing_price(gain, slots):
    if slots == 0:
        return gain.amax(-1) + 1
    if slots >= gain.size(-1):
        return gain.amin(-1) - 1
    return gain.topk(slots + 1, dim=-1).values[..., -2:].mean(-1)
