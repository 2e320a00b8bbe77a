"""A feed-forward MoE layer: a router sends each token (a feature vector) to feed-forward
experts; built from one MoEArgs.

sMLP's tMoE (Base routing, an expert LayerNorm each) and the Transformer baselines' MoE
FFNs (Switch, GShard, HASH) are all this layer with other arguments.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .dispatch import dispatch_to_experts
from .experts import ExpertFFN
from .router import (
    BaseRouter, CausalBalancedRouter, HashRouter, SinkhornRouter, Top1BiasedRouter, Top1Router, Top2Router,
)

ROUTERS = ("base", "top1", "top2", "hash", "top1_biased", "sinkhorn", "causal_balanced")


@dataclass
class MoEArgs:
    router: str  # one of ROUTERS: base (Base Layers / tMoE), top1 (Switch), top2 (GShard), hash, top1_biased
    # (loss-free), sinkhorn (S-BASE), causal_balanced (position order, best expert with room)
    num_experts: int  # all workers together
    embed_dim: int  # H
    ffn_dim: int  # hidden width of each expert
    expert_norm: bool = True  # a LayerNorm per expert before its FFN (Base Layers, sMLP's tMoE)
    activation: str = "gelu"
    solver: str = "torch"  # base: balanced-assignment solver
    train_capacity_factor: float = 1.25  # top1/top2: slots per expert, see router.expert_capacity
    eval_capacity_factor: float = 0.0  # <= 0: no limit
    z_loss_weight: float = 0.0  # top1/top2/top1_biased: router z-loss
    second_expert_policy: str = "sampling"  # top2, training
    second_expert_queue: str = "causal"  # top2: causal (token order) or gshard (all first choices first: leaks)
    hash_table: Optional[torch.Tensor] = None  # hash: (V,) expert of every token id
    expert_init: str = "dense"  # ExpertFFN.INITS: dense (as a dense FFN) or zero_output (Base Layers)
    expert_dropout: float = 0.0  # dropout on the experts' hidden activations
    bias_update_rate: float = 1e-3  # top1_biased: step of the selection bias after each update
    balance_scope: str = "micro-batch"  # top1/top2: the aux loss's load share over micro-batch or global-batch


class FeedForwardMoE(nn.Module):
    """x -> sum_k w_k expert_{e_k}(x) over the experts the router picked (the caller adds
    the residual). x: (..., H) -> (..., H), RoutingStats."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        if args.router not in ROUTERS:
            raise ValueError(f"unknown token router {args.router!r}; one of {ROUTERS}")
        # initialised experts first, registered router first (parameter and checkpoint order)
        experts = ExpertFFN(
            args.num_experts, args.embed_dim, args.ffn_dim, args.expert_norm, args.activation,
            init=args.expert_init, dropout=args.expert_dropout,
        )
        self.router, self.experts = build_router(args), experts

    def compile_targets(self) -> list:
        """What --moe-compile compiles (moe/compile.py): the whole layer (router, dispatch, experts,
        combine) in one process; with expert parallelism only the experts (rows cross workers)."""
        return ["forward"] if self.experts.world_size == 1 else []

    def forward(self, x: torch.Tensor):
        flat = x.reshape(-1, x.size(-1))  # (N, H)
        expert_index, weight, stats = self.router(flat)
        weight = None if self.router.unit_weight else weight  # HASH: every weight is 1, skip the product
        # compiled: the static path, whose shapes a compiler can trace (grouped_mm's CPU fallback
        # loops over groups with host syncs and has no fp32 kernel to trace)
        path = "static" if torch.compiler.is_compiling() else None
        return dispatch_to_experts(flat, expert_index, weight, self.experts, path=path).view_as(x), stats


def build_router(args: MoEArgs):
    if args.router == "base":
        return BaseRouter(args.embed_dim, args.num_experts, args.solver)
    if args.router == "hash":
        return HashRouter(args.hash_table, args.num_experts)
    if args.router == "top1_biased":
        return Top1BiasedRouter(args.embed_dim, args.num_experts, args.bias_update_rate,
                                z_loss_weight=args.z_loss_weight)
    if args.router == "sinkhorn":
        return SinkhornRouter(args.embed_dim, args.num_experts)
    if args.router == "causal_balanced":
        return CausalBalancedRouter(args.embed_dim, args.num_experts)
    gate = (args.embed_dim, args.num_experts, args.train_capacity_factor, args.eval_capacity_factor, args.z_loss_weight)
    if args.router == "top1":
        return Top1Router(*gate, balance_scope=args.balance_scope)
    return Top2Router(*gate, second_expert_policy=args.second_expert_policy, queue=args.second_expert_queue,
                      balance_scope=args.balance_scope)
