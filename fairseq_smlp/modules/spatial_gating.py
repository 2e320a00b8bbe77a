"""The spatial gating unit of gMLP, dense (one spatial matrix) or sparse (sMoE).

gate = W_s LN(u) + b_s, mixing each channel across positions with a causal T x T matrix.
The sparse version (sMoE) chunks the channels and gives every chunk to an expert that
owns its own spatial matrix:
  - deterministic routing: chunk e -> expert e (a multi-head SGU; exactly balanced,
    cannot leak the future);
  - partial-prediction routing: channels are assigned per sequence by a router that
    reads only the prefix (see channel_router.py).
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules import LayerNorm
from torch import Tensor

from ..distributed import expert_parallel
from .causal_mixing import CausalTokenMixing
from .routing import RoutingStats


@with_incremental_state
class SpatialGatingUnit(nn.Module):
    """u: (B, n, C) -> gate (B, n, C), RoutingStats or None.

    num_experts = 1 is gMLP's SGU; num_experts = E splits the C channels into E experts
    of C/E channels; router (a PrefixChannelRouter) chooses which channels each expert gets.
    """

    def __init__(self, channels: int, max_positions: int, num_experts: int = 1, router: Optional[nn.Module] = None, init_eps: float = 1e-3, expert_parallel_mode: bool = False):
        super().__init__()
        if channels % num_experts != 0:
            raise ValueError(
                f"--smoe-experts {num_experts} must divide the {channels} channels that sMoE chunks "
                f"(set by --decoder-ffn-embed-dim and --smoe-chunk)"
            )
        self.num_experts = num_experts
        self.norm = LayerNorm(channels)
        self.mixing = CausalTokenMixing(num_experts, max_positions, init_eps)
        # Default: spatial experts are replicated on every worker (not marked `expert`): their
        # gradients are averaged like any shared parameter. --smoe-expert-parallel shards them.
        self.router = router
        self.world_size = 1
        if expert_parallel_mode:
            self._shard_experts(router)

    def _shard_experts(self, router) -> None:
        """Keep this rank's E / W spatial matrices (sliced from the full init: same start as one process)."""
        world, rank = expert_parallel.world_size(), expert_parallel.rank()
        if router is not None:
            raise ValueError("--smoe-expert-parallel needs --smoe-routing deterministic (partial routing is per sequence)")
        if self.num_experts % world != 0:
            raise ValueError(
                f"--smoe-experts {self.num_experts} must be a multiple of the number of data-parallel workers "
                f"({world}, --distributed-world-size) with --smoe-expert-parallel"
            )
        if world == 1:
            return
        local = self.num_experts // world
        mine = slice(rank * local, (rank + 1) * local)
        self.mixing.weight = nn.Parameter(self.mixing.weight.data[mine].clone())
        self.mixing.bias = nn.Parameter(self.mixing.bias.data[mine].clone())
        self.mixing.num_experts, self.world_size, self.num_local_experts = local, world, local
        for p in self.mixing.parameters():
            p.expert, p.expert_sharded = True, True
        expert_parallel.scale_expert_grads(self.mixing.parameters(), world)
        from ..distributed import checkpointing

        checkpointing.install()

    @property
    def prefix_length(self) -> int:
        """Positions before this one were used for routing and are not scored (0: all scored)."""
        return self.router.prefix_length if self.router is not None else 0

    def forward(self, u: Tensor, incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None):
        z = self.norm(u)  # (B, m, C): the m newest positions
        new = z.size(1)
        if incremental_state is not None:
            z = self._extend_history(z, incremental_state)  # (B, n, C) all positions so far
        first_output = z.size(1) - new

        bsz, n, channels = z.shape
        if self.router is None:  # deterministic: chunk e -> expert e
            groups = z.view(bsz, n, self.num_experts, channels // self.num_experts)
            if self.world_size > 1:
                if incremental_state is not None:
                    raise RuntimeError("incremental decoding with --smoe-expert-parallel: reshard the checkpoint to 1 worker first")
                return expert_parallel.run_sharded_spatial(self.mixing, groups, self.world_size).reshape(bsz, new, channels), None
            return self.mixing(groups, first_output).reshape(bsz, new, channels), None

        order, weight, stats = self.router(z)  # order: (B, C) channels listed expert by expert
        by_expert = z.gather(2, order.unsqueeze(1).expand(-1, n, -1))
        groups = by_expert.view(bsz, n, self.num_experts, channels // self.num_experts)
        mixed = self.mixing(groups, first_output).reshape(bsz, new, channels) * weight.unsqueeze(1).to(z.dtype)
        gate = torch.empty_like(mixed).scatter_(2, order.unsqueeze(1).expand(-1, new, -1), mixed)
        return gate, stats

    def _extend_history(self, z: Tensor, incremental_state) -> Tensor:
        """Keep the normalised inputs of all past positions: the spatial matrix mixes them all."""
        saved = self.get_incremental_state(incremental_state, "history")
        if saved is not None:
            z = torch.cat([saved["z"], z], dim=1)
        self.set_incremental_state(incremental_state, "history", {"z": z})
        return z

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        saved = self.get_incremental_state(incremental_state, "history")
        if saved is not None:
            self.set_incremental_state(incremental_state, "history", {"z": saved["z"].index_select(0, new_order)})
