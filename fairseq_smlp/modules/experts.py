"""Expert FFNs computed batched, and the one dispatch path every token-routed MoE uses.

Written by hand rather than with fairscale's MOELayer: MOELayer needs a process group
and a fixed capacity; tMoE's balanced assignment needs neither, and evaluation-time
greedy routing has uneven loads that a capacity would drop.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ExpertFFN(nn.Module):
    """E feed-forward experts with stacked weights, run as batched matmuls.

    x: (E, C, H) slots per expert -> (E, C, H).
    expert(x) = W2 act(W1 LN_e(x)) with a per-expert LayerNorm when pre_norm (as in Base
    Layers, where the expert owns its norm). W2 starts at zero, so a new MoE layer adds
    nothing to the residual stream.
    """

    def __init__(self, num_experts: int, embed_dim: int, ffn_dim: int, pre_norm: bool = True, activation: str = "gelu"):
        super().__init__()
        self.num_experts, self.embed_dim = num_experts, embed_dim
        self.norm_weight = nn.Parameter(torch.ones(num_experts, 1, embed_dim)) if pre_norm else None
        self.norm_bias = nn.Parameter(torch.zeros(num_experts, 1, embed_dim)) if pre_norm else None
        bound = embed_dim ** -0.5
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim).uniform_(-bound, bound))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, 1, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.zeros(num_experts, ffn_dim, embed_dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, 1, embed_dim))
        self.activation = getattr(F, activation)
        for p in self.parameters():
            p.expert = True  # fairseq's legacy_ddp skips these in the gradient all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_weight is not None:
            x = F.layer_norm(x, (self.embed_dim,)) * self.norm_weight + self.norm_bias
        h = self.activation(torch.baddbmm(self.fc1_bias, x, self.fc1_weight))
        return torch.baddbmm(self.fc2_bias, h, self.fc2_weight)


def dispatch_to_experts(x: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor, experts: ExpertFFN) -> torch.Tensor:
    """Send each token to its experts, run them batched, and sum the weighted outputs.

    x: (N, H); expert_index: (N, k) long, -1 where an assignment was dropped;
    weight: (N, k) combine weight of each assignment. Returns (N, H): sum_k w_k f_{e_k}(x),
    zero for a token with no kept assignment (it passes through the caller's residual).
    """
    num_tokens, k = expert_index.shape
    flat_expert = expert_index.reshape(-1)
    token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)
    kept = flat_expert >= 0
    flat_expert, token, flat_weight = flat_expert[kept], token[kept], weight.reshape(-1)[kept]

    # slot of each assignment inside its expert: rank among the assignments to that expert
    order = torch.argsort(flat_expert, stable=True)
    flat_expert, token, flat_weight = flat_expert[order], token[order], flat_weight[order]
    counts = torch.bincount(flat_expert, minlength=experts.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(flat_expert.numel(), device=x.device) - starts[flat_expert]

    # flat slot e * C + i; index_select / index_copy / index_add are the fast CPU paths
    # (2-D advanced indexing is several times slower, forward and backward)
    capacity = int(counts.max()) if flat_expert.numel() else 0
    flat_slot = flat_expert * capacity + slot
    routed = x.index_select(0, token)  # (M, H)
    if flat_expert.numel() == experts.num_experts * capacity:  # balanced: slots are already in order
        buffer = routed
    else:
        buffer = x.new_zeros(experts.num_experts * capacity, x.size(-1)).index_copy(0, flat_slot, routed)
    out = experts(buffer.view(experts.num_experts, capacity, -1)).reshape(-1, x.size(-1))
    out = out.index_select(0, flat_slot) * flat_weight.unsqueeze(-1).to(out.dtype)  # (M, H)
    return out.new_zeros(x.shape).index_add_(0, token, out).to(x.dtype)
