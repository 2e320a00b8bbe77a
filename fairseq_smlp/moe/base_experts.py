"""Base Layers (Lewis et al. 2021) with E experts in one process.

fairseq's BaseLayer holds one expert per data-parallel worker, so in one process it is a
dense layer. This is the same layer with all E experts in the process:

    expert_e(x) = the S residual sublayers of fairseq's BaseSublayer, each
                  x <- x + W2 act(W1 LN(x)), W2 starting at zero (Base Layers' init)
    routing     = BaseRouter: centroids c_e; training: balanced assignment (every expert gets
                  the same number of tokens); evaluation: greedy argmax_e x . c_e
    output      = sigmoid(x . c_e) expert_e(x) + (1 - sigmoid(x . c_e)) x   (fairseq's mixing)

The experts are S stacked ExpertFFNs (E experts each) and run on the shared dispatch path
(dispatch.dispatch_to_experts); the mixing is written as x + alpha (expert_e(x) - x), the
same value. With W workers (E = W) fairseq's BaseLayer takes its place, rank r holding
expert r (`shard_experts`, moe/fairseq_base_layer.py); with one expert the two compute the
same function (tests/unit/test_fair_baselines.py).
"""
from typing import Optional

import torch
import torch.nn as nn

from .dispatch import dispatch_to_experts
from .experts import ExpertFFN
from .fairseq_base_layer import FairseqBaseLayer
from .router import BaseRouter


class ResidualExpertStack(nn.Module):
    """S residual sublayers per expert: x (E, K, H) -> expert_e(x) - x (E, K, H).

    Returns the change the expert makes, so that the dispatch's weighted sum gives
    alpha (expert(x) - x). Same interface as ExpertFFN for the dispatch (one process only).
    """

    world_size = 1

    def __init__(
        self, num_experts: int, embed_dim: int, ffn_dim: int, sublayers: int, activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        if sublayers < 1:
            raise ValueError(f"--base-sublayers must be >= 1, got {sublayers}")
        self.num_experts = self.num_local_experts = num_experts
        self.sublayers = nn.ModuleList(
            ExpertFFN(
                num_experts, embed_dim, ffn_dim, pre_norm=True, activation=activation, init="zero_output",
                dropout=dropout,
            )
            for _ in range(sublayers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for sublayer in self.sublayers:
            h = h + sublayer(h)
        return h - x

    def input_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.sublayers[0].input_dtype(x)

    def can_run_grouped(self, x: torch.Tensor) -> bool:
        return self.sublayers[0].can_run_grouped(x)

    def forward_grouped(
        self, x: torch.Tensor, row_expert: Optional[torch.Tensor], counts: torch.Tensor
    ) -> torch.Tensor:
        """x: (M, H) rows grouped by expert (row_expert: (M,) their experts, or None) -> (M, H),
        expert_e(x) - x on each row."""
        if row_expert is None:  # once for every sublayer
            row_expert = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
        h = x
        for sublayer in self.sublayers:
            h = h + sublayer.forward_grouped(h, row_expert, counts)
        return h - x


class BaseExpertsLayer(nn.Module):
    """A whole Base layer, in place of a decoder layer: (T, B, H) -> ((T, B, H), None, None),
    fairseq's BaseLayer's signature. Its RoutingStats are kept in `last_stats`."""

    last_stats = None

    def __init__(
        self, embed_dim: int, ffn_dim: int, num_experts: int, sublayers: int, activation: str = "relu",
        solver: str = "torch", dropout: float = 0.0, shuffle: bool = False,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"--base-experts must be >= 1, got {num_experts}")
        self.router = BaseRouter(embed_dim, num_experts, solver)
        self.experts = ResidualExpertStack(num_experts, embed_dim, ffn_dim, sublayers, activation, dropout)
        self.activation = activation
        self.shuffle = shuffle  # --base-shuffle: fairseq's BaseLayer shuffles the tokens between workers

    def shard_experts(self, world_size: int, rank: int) -> Optional[nn.Module]:
        """With W > 1 workers: fairseq's BaseLayer in this layer's place, one expert per worker,
        rank r holding expert r of this layer (parallelize_experts calls this once, after the
        model is built). E must be W."""
        if world_size == 1:
            return None
        experts = self.router.num_experts
        if experts != world_size:
            raise ValueError(
                f"--base-experts {experts} with {world_size} data-parallel workers: fairseq's BaseLayer, used when "
                f"there are several workers, holds one expert per worker; set --base-experts {world_size} (or 0)"
            )
        return FairseqBaseLayer.from_experts(self, world_size, rank)

    def forward(self, input_features: torch.Tensor, *args, **kwargs):
        x = input_features.reshape(-1, input_features.size(-1))
        expert_index, alpha, self.last_stats = self.router(x)
        out = x + dispatch_to_experts(x, expert_index, alpha, self.experts)
        return out.view_as(input_features), None, None
