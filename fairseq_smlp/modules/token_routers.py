"""Token routers for feature-mixing MoE (tMoE): each returns (expert_index, weight, stats).

expert_index: (N, k) long, -1 for a dropped assignment; weight: (N, k) combine weights.
"""
import torch
import torch.nn as nn

from .experts import ExpertFFN, dispatch_to_experts
from .routing import RoutingStats, balanced_assignment, check_finite


class BaseRouter(nn.Module):
    """Base Layers routing (Lewis et al. 2021), the tMoE routing of sMLP.

    Each expert has a centroid; a token's affinity to expert e is x . c_e. Training:
    balanced assignment (every expert gets N/E tokens, no token dropped, no auxiliary
    loss). Evaluation: greedy top-1. The expert output is mixed in with weight
    sigmoid(x . c_e), which is what trains the centroids.
    """

    def __init__(self, embed_dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        centroids = torch.empty(num_experts, embed_dim)
        nn.init.orthogonal_(centroids, gain=0.1)
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)
        self.name = "base_router"

    def forward(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 1), weight (N, 1), RoutingStats."""
        scores = x.float() @ self.centroids.float().t()  # (N, E)
        check_finite(scores, self.name)
        with torch.no_grad():
            expert = balanced_assignment(scores) if self.training else scores.argmax(-1)
        alpha = torch.sigmoid(scores.gather(1, expert.unsqueeze(1)))
        counts = torch.bincount(expert, minlength=self.num_experts).float()
        self.expert_load.copy_(counts)
        return expert.unsqueeze(1), alpha, RoutingStats(layer=self.name, expert_counts=counts)


class TokenMoE(nn.Module):
    """A router and its experts: x -> sum_k w_k expert_{e_k}(x) (the caller adds the residual)."""

    def __init__(self, router: nn.Module, experts: ExpertFFN):
        super().__init__()
        self.router, self.experts = router, experts

    def forward(self, x: torch.Tensor):
        """x: (B, T, H) -> (B, T, H), RoutingStats."""
        flat = x.reshape(-1, x.size(-1))
        expert_index, weight, stats = self.router(flat)
        return dispatch_to_experts(flat, expert_index, weight, self.experts).view_as(x), stats
