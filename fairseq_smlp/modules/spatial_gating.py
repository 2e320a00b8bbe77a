"""The spatial gating unit of gMLP, dense (one spatial matrix) or sparse (sMoE).

gate = W_s LN(u) + b_s, mixing each channel across positions with a causal T x T matrix.
The sparse version (sMoE) chunks the channels and gives every chunk to an expert that
owns its own spatial matrix:
  - deterministic routing: chunk e -> expert e (a multi-head SGU; exactly balanced,
    cannot leak the future);
  - partial-prediction routing: channels are assigned per sequence by a router that
    reads only the prefix (moe/router.py, PrefixChannelRouter).
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules import LayerNorm
from torch import Tensor

from ..distributed import expert_parallel
from ..moe.router import PrefixChannelRouter
from ..moe.sharding import shard_stacked
from .causal_mixing import CausalTokenMixing


@dataclass
class SpatialGateArgs:
    channels: int  # C, the channels the gate mixes (F/2, or F with --smoe-chunk all)
    max_positions: int  # T_max: size of the causal spatial matrices
    num_experts: int = 1  # 1: gMLP's SGU; E: sMoE with E spatial experts of C/E channels
    routing: str = "deterministic"  # sMoE: "deterministic" (chunk e -> expert e) or "partial"
    prefix_ratio: float = 0.2  # partial: share of the T_max positions the router reads
    balance: str = "assignment"  # partial: "assignment" or "aux_loss" (PrefixChannelRouter)
    solver: str = "torch"  # partial, assignment: balanced-assignment solver
    init_eps: float = 1e-3  # spatial matrices start uniform in +-init_eps/T_max (bias 1)
    expert_parallel: bool = False  # shard the spatial experts over the data-parallel workers


@with_incremental_state
class SpatialGatingUnit(nn.Module):
    """u: (B, T, C) -> gate (B, T, C), RoutingStats or None.

    One expert is gMLP's SGU; E experts split the C channels into E chunks of C/E, each
    mixed by its own spatial matrix, assigned deterministically or by a PrefixChannelRouter.
    """

    def compile_targets(self) -> list:
        """What --moe-compile compiles (moe/compile.py): the routed mixing of a partial sMoE."""
        return ["mix_routed"] if self.router is not None else []

    def __init__(self, args: SpatialGateArgs):
        super().__init__()
        if args.channels % args.num_experts != 0:
            raise ValueError(
                f"--smoe-experts {args.num_experts} must divide the {args.channels} channels that sMoE chunks "
                f"(set by --decoder-ffn-embed-dim and --smoe-chunk)"
            )
        router = None
        if args.routing == "partial":  # built first: the order of random initialisation
            router = PrefixChannelRouter(
                args.max_positions, args.prefix_ratio, args.num_experts, args.balance, args.solver
            )
        self.num_experts = args.num_experts
        self.norm = LayerNorm(args.channels)
        self.mixing = CausalTokenMixing(args.num_experts, args.max_positions, args.init_eps)
        self.router = router
        # Default: spatial experts are replicated on every worker (not marked `expert`): their
        # gradients are averaged like any shared parameter. --smoe-expert-parallel shards them
        # (shard_experts, once the model is built).
        if args.expert_parallel and router is not None:
            raise ValueError(
                "--smoe-expert-parallel needs --smoe-routing deterministic (partial routing is per sequence)"
            )
        self.expert_parallel = args.expert_parallel
        self.world_size = 1

    def shard_experts(self, world_size: int, rank: int) -> None:
        """--smoe-expert-parallel: keep rank `rank`'s E / W spatial experts (parallelize_experts
        calls this once, after the model is built); replicated spatial experts stay whole."""
        if not self.expert_parallel:
            return
        if self.world_size > 1:
            raise RuntimeError(f"the spatial experts are already sharded over {self.world_size} workers")
        flag = "--smoe-experts with --smoe-expert-parallel"
        self.mixing.num_experts = shard_stacked(self.mixing, self.num_experts, world_size, rank, flag)
        self.world_size = world_size

    @property
    def prefix_length(self) -> int:
        """Positions before this one were used for routing and are not scored (0: all scored)."""
        return self.router.prefix_length if self.router is not None else 0

    def forward(self, u: Tensor, incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None):
        z = self.norm(u)  # (B, T_new, C): the newest positions
        new_length = z.size(1)
        if incremental_state is not None:
            z = self._extend_history(z, incremental_state)  # (B, T, C): every position so far
        first_output = z.size(1) - new_length

        bsz, length, channels = z.shape
        if self.router is None:  # deterministic: chunk e -> expert e
            groups = z.view(bsz, length, self.num_experts, channels // self.num_experts)  # (B, T, E, c)
            if self.world_size > 1:
                if incremental_state is not None:
                    raise RuntimeError(
                        "incremental decoding with --smoe-expert-parallel: reshard the checkpoint to 1 worker first"
                    )
                mixed = expert_parallel.run_sharded_spatial(self.mixing, groups, self.world_size)
                return mixed.reshape(bsz, new_length, channels), None
            return self.mixing(groups, first_output).reshape(bsz, new_length, channels), None

        order, weight, stats = self.router(z)  # order: (B, C) channels listed expert by expert
        if incremental_state is not None:  # (--moe-compile compiles mix_routed for whole sequences only)
            return SpatialGatingUnit.mix_routed(self, z, order, weight, first_output), stats
        return self.mix_routed(z, order, weight), stats

    def mix_routed(self, z: Tensor, order: Tensor, weight: Tensor, first_output: int = 0) -> Tensor:
        """z (B, T, C); order, weight (B, C) from the router -> gate (B, T_new, C), T_new =
        T - first_output: each channel mixed by its expert's spatial matrix and scaled by its
        router weight."""
        bsz, length, channels = z.shape
        new_length = length - first_output
        by_expert = z.gather(2, order.unsqueeze(1).expand(-1, length, -1))
        groups = by_expert.view(bsz, length, self.num_experts, channels // self.num_experts)  # (B, T, E, c)
        mixed = self.mixing(groups, first_output).reshape(bsz, new_length, channels) * weight.unsqueeze(1).to(z.dtype)
        return torch.empty_like(mixed).scatter_(2, order.unsqueeze(1).expand(-1, new_length, -1), mixed)

    def _extend_history(self, z: Tensor, incremental_state) -> Tensor:
        """Keep the normalised inputs of all past positions: the spatial matrix mixes them all."""
        saved = self.get_incremental_state(incremental_state, "history")
        if saved is not None:
            z = torch.cat([saved["z"], z], dim=1)
        self.set_incremental_state(incremental_state, "history", {"z": z})
        return z

    def forget_history(self, incremental_state) -> None:
        self.set_incremental_state(incremental_state, "history", None)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        saved = self.get_incremental_state(incremental_state, "history")
        if saved is not None:
            self.set_incremental_state(incremental_state, "history", {"z": saved["z"].index_select(0, new_order)})
