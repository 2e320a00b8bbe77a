"""The two blocks of sMLP: a dense gMLP block, and a sparse block (sMoE + tMoE)."""
from typing import List, Tuple

import torch.nn as nn
import torch.nn.functional as F
from fairseq.modules import LayerNorm
from torch import Tensor

from ..moe.router import RoutingStats
from ..moe.feed_forward_moe import FeedForwardMoE
from .spatial_gating import SpatialGatingUnit


class GatedMLPBlock(nn.Module):
    """gMLP block (Liu et al. 2021), no attention:

        Z = GELU(LN(X) U);  Y = X + (Z1 * gate(Z2)) V       (split_gate=True: Z1, Z2 halves)
        Y = X + (Z * gate(Z)) V                             (split_gate=False: sMoE chunks all of Z)

    gate is a SpatialGatingUnit: dense, or sMoE when it has several experts.
    """

    def __init__(
        self, embed_dim: int, ffn_dim: int, gate: SpatialGatingUnit, split_gate: bool = True, dropout: float = 0.0
    ):
        super().__init__()
        self.norm = LayerNorm(embed_dim)
        self.proj_in = nn.Linear(embed_dim, ffn_dim)  # U
        self.gate = gate
        self.split_gate = split_gate
        self.proj_out = nn.Linear(ffn_dim // 2 if split_gate else ffn_dim, embed_dim)  # V
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, incremental_state=None) -> Tuple[Tensor, List[RoutingStats]]:
        """x: (B, T, H) -> (B, T, H), routing stats of the sMoE (empty list if none)."""
        z = F.gelu(self.proj_in(self.norm(x)))  # (B, T, F)
        if self.split_gate:
            value, gate_in = z.chunk(2, dim=-1)  # (B, T, F/2) each
        else:
            value, gate_in = z, z
        gate, stats = self.gate(gate_in, incremental_state)
        y = x + self.dropout(self.proj_out(value * gate))
        return y, [stats] if stats is not None else []


class SparseBlock(nn.Module):
    """sMLP sparse block: a gMLP block whose gate is an sMoE (token mixing), followed by a
    tMoE (feature mixing): Y = H + FeedForwardMoE(H) with H = GatedMLPBlock(X)."""

    def __init__(self, token_mixing: GatedMLPBlock, feature_moe: FeedForwardMoE, dropout: float = 0.0):
        super().__init__()
        self.token_mixing = token_mixing
        self.feature_moe = feature_moe
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, incremental_state=None) -> Tuple[Tensor, List[RoutingStats]]:
        h, stats = self.token_mixing(x, incremental_state)
        moe_out, moe_stats = self.feature_moe(h)
        return h + self.dropout(moe_out), stats + [moe_stats]
