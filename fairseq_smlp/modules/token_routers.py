"""Token routers for feature-mixing MoE (tMoE): each returns (expert_index, weight, stats).

expert_index: (N, k) long, -1 for a dropped assignment; weight: (N, k) combine weights.
Routers: BaseRouter (Base Layers, sMLP's tMoE), Top1Router (Switch), Top2Router (GShard),
HashRouter (HASH Layers). All route in fp32.
"""
import heapq
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import ExpertFFN, dispatch_to_experts
from .routing import RoutingStats, balanced_assignment, check_finite, fp32, switch_aux_loss


class BaseRouter(nn.Module):
    """Base Layers routing (Lewis et al. 2021), the tMoE routing of sMLP.

    Each expert has a centroid; a token's affinity to expert e is x . c_e. Training:
    balanced assignment (every expert gets N/E tokens, no token dropped, no auxiliary
    loss). Evaluation: greedy top-1. The expert output is mixed in with weight
    sigmoid(x . c_e), which is what trains the centroids.
    """

    def __init__(self, embed_dim: int, num_experts: int, solver: str = "torch"):
        super().__init__()
        self.num_experts = num_experts
        self.solver = solver  # balanced-assignment solver (routing.SOLVERS)
        centroids = torch.empty(num_experts, embed_dim)
        nn.init.orthogonal_(centroids, gain=0.1)
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)
        self.name = "base_router"

    def forward(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 1), weight (N, 1), RoutingStats."""
        with fp32(x.device):
            scores = x.float() @ self.centroids.float().t()  # (N, E)
            check_finite(scores, self.name)
            with torch.no_grad():
                expert = balanced_assignment(scores, self.solver) if self.training else scores.argmax(-1)
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


# ------------------------------------------------- baselines: Switch, GShard, HASH
def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * ceil(tokens / experts)).

    Switch: capacity_factor * tokens / experts (exact when experts divide tokens);
    GShard with factor 2: 2 * ceil(S / E). A factor <= 0 means no limit (nothing dropped).
    """
    if capacity_factor <= 0:
        return num_tokens  # a token's k assignments go to k distinct experts: all fit
    return int(math.ceil(capacity_factor * math.ceil(num_tokens / num_experts)))


def within_capacity(expert: torch.Tensor, capacity: int, num_experts: int, active=None, offset=None) -> torch.Tensor:
    """First come, first served: which assignments get one of their expert's slots.

    expert: (N,) expert of each assignment, in priority order; active: (N,) bool, the
    assignments that compete (default all); offset: (E,) slots already taken.
    Returns kept (N,) bool. Priority is the order of the tokens, which fairseq's layers
    flatten time-major: a token only competes with tokens at earlier or equal positions.
    """
    one_hot = F.one_hot(expert, num_experts)  # (N, E)
    if active is not None:
        one_hot = one_hot * active.unsqueeze(1)
    position = (torch.cumsum(one_hot, dim=0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)  # (N,)
    if offset is not None:
        position = position + offset[expert]
    kept = position < capacity
    return kept if active is None else kept & active


class LearnedGateRouter(nn.Module):
    """What Switch (top-1) and GShard (top-2) share: a linear gate computed in fp32,
    a capacity per expert (train / eval factors), and the load-balancing loss.

    aux_loss = E * sum_e f_e * P_e (switch_aux_loss; 1.0 when uniform) + z_loss_weight *
    mean_n logsumexp(logits_n)^2 (router z-loss, ST-MoE; 0 disables it). The criterion
    multiplies the sum by --moe-aux-loss-weight.
    """

    top_k = 1

    def __init__(self, embed_dim: int, num_experts: int, train_capacity_factor: float, eval_capacity_factor: float, z_loss_weight: float = 0.0):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"--moe-experts must be >= 1, got {num_experts}")
        if num_experts < self.top_k:
            raise ValueError(f"--moe-experts {num_experts} is fewer than the {self.top_k} experts each token is sent to")
        self.num_experts = num_experts
        self.train_capacity_factor, self.eval_capacity_factor = train_capacity_factor, eval_capacity_factor
        self.z_loss_weight = z_loss_weight
        # small init: near-uniform probabilities at the start (Switch, section 2.4)
        self.gate = nn.Linear(embed_dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.1 * embed_dim ** -0.5)
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)
        self.name = type(self).__name__

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, H) -> (N, E) fp32, also under autocast: near-ties decide the expert."""
        with fp32(x.device):
            logits = F.linear(x.float(), self.gate.weight.float())
        check_finite(logits, self.name)
        return logits

    def capacity(self, num_tokens: int) -> int:
        factor = self.train_capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, factor)

    def aux_loss(self, logits: torch.Tensor, probs: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        loss = switch_aux_loss(probs, first)
        if self.z_loss_weight > 0:
            loss = loss + self.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return loss

    def stats(self, expert_index: torch.Tensor, aux: torch.Tensor) -> RoutingStats:
        """expert_index: (N, k), -1 = dropped. A token is dropped when no expert kept it."""
        kept = expert_index >= 0
        counts = torch.bincount(expert_index[kept], minlength=self.num_experts).float()
        self.expert_load.copy_(counts)
        dropped = (~kept.any(dim=1)).sum()
        total = torch.tensor(expert_index.size(0), device=expert_index.device)
        return RoutingStats(layer=self.name, expert_counts=counts, aux_loss=aux, dropped=dropped, total=total)


class Top1Router(LearnedGateRouter):
    """Switch Transformer routing (Fedus et al. 2021): each token goes to its most probable
    expert, weighted by that probability; tokens beyond the expert's capacity are dropped
    (the layer then adds nothing: the token passes through the residual)."""

    top_k = 1

    def forward(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 1) (-1 = dropped), weight (N, 1) fp32, RoutingStats."""
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        gate, first = probs.max(dim=-1)  # (N,)
        kept = within_capacity(first, self.capacity(x.size(0)), self.num_experts)
        expert_index = torch.where(kept, first, torch.full_like(first, -1)).unsqueeze(1)
        weight = (gate * kept).unsqueeze(1)
        return expert_index, weight, self.stats(expert_index, self.aux_loss(logits, probs, first))


class Top2Router(LearnedGateRouter):
    """GShard routing (Lepikhin et al. 2020): first and second most probable experts.

    Second expert in training, by --moe-second-expert-policy: "all" the runner-up,
    "sampling" drawn from the remaining experts' softmax (Gumbel-max), "random" the
    runner-up kept with probability 2 * g2 / (g1 + g2). In evaluation always the runner-up.
    Capacity: all first choices queue before any second choice (GShard's order), so in
    training a later token's first choice can take an earlier token's second slot.
    Combine weights are the gate probabilities renormalised over the kept experts.
    """

    top_k = 2
    policies = ("sampling", "all", "random")

    def __init__(self, *args, second_expert_policy: str = "sampling", **kwargs):
        super().__init__(*args, **kwargs)
        if second_expert_policy not in self.policies:
            raise ValueError(f"--moe-second-expert-policy must be one of {self.policies}, got {second_expert_policy!r}")
        self.second_expert_policy = second_expert_policy

    def forward(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 2) (-1 = dropped), weight (N, 2) fp32, RoutingStats."""
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        first = probs.argmax(dim=-1)
        second = self.second_choice(logits.detach(), first)
        g1, g2 = probs.gather(1, first.unsqueeze(1)).squeeze(1), probs.gather(1, second.unsqueeze(1)).squeeze(1)
        wants_second = torch.ones_like(first, dtype=torch.bool)
        if self.training and self.second_expert_policy == "random":
            wants_second = 2 * (g2 / (g1 + g2)).detach() > torch.rand_like(g2)

        capacity = self.capacity(x.size(0))
        keep1 = within_capacity(first, capacity, self.num_experts)
        first_counts = torch.bincount(first, minlength=self.num_experts)
        keep2 = within_capacity(second, capacity, self.num_experts, active=wants_second, offset=first_counts)

        kept = torch.stack([keep1, keep2], dim=1)  # (N, 2)
        experts = torch.stack([first, second], dim=1)
        gates = torch.stack([g1, g2], dim=1) * kept
        weight = gates / gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).tiny)
        expert_index = torch.where(kept, experts, torch.full_like(experts, -1))
        return expert_index, weight, self.stats(expert_index, self.aux_loss(logits, probs, first))

    def second_choice(self, logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """(N, E), (N,) -> (N,) an expert other than the first."""
        if self.training and self.second_expert_policy == "sampling":
            uniform = torch.rand_like(logits).clamp(min=1e-9, max=1 - 1e-9)
            logits = logits - torch.log(-torch.log(uniform))  # + Gumbel noise: a softmax sample
        return logits.scatter(1, first.unsqueeze(1), float("-inf")).argmax(dim=-1)


class HashRouter(nn.Module):
    """HASH Layers routing (Roller et al. 2021): expert = table[token id], weight 1.

    The table is a buffer, so it is saved in the checkpoint and identical after reload;
    no learned parameters, no auxiliary loss, nothing dropped. fairseq's decoder layers
    only receive hidden states, so the decoder hands the token ids over with
    `set_token_ids` before each forward.
    """

    top_k = 1

    def __init__(self, table: torch.Tensor, num_experts: int):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"--moe-experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.register_buffer("table", table.long())  # (V,) persistent: part of the checkpoint
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)
        self.token_ids = None
        self.name = "hash_router"

    def set_token_ids(self, token_ids) -> None:
        """token_ids: (N,) in the order the layer flattens its input (time-major in fairseq)."""
        self.token_ids = token_ids

    def forward(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 1), weight (N, 1) ones, RoutingStats."""
        if self.token_ids is None or self.token_ids.numel() != x.size(0):
            raise RuntimeError(
                f"{self.name}: token ids for {x.size(0)} tokens were not set; a HASH layer must run inside "
                "MoETransformerDecoder (arch hash_lm_*), which passes them down"
            )
        expert = self.table[self.token_ids.to(self.table.device)]
        counts = torch.bincount(expert, minlength=self.num_experts).float()
        self.expert_load.copy_(counts)
        zero = torch.zeros((), device=x.device)
        stats = RoutingStats(layer=self.name, expert_counts=counts, dropped=zero, total=torch.tensor(x.size(0), device=x.device))
        return expert.unsqueeze(1), torch.ones(x.size(0), 1, device=x.device), stats


def random_hash_table(vocab_size: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """(V,) expert of every token id, uniform at random (a fixed seed: same table every build)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(num_experts, (vocab_size,), generator=generator)


def balanced_hash_table(counts, num_experts: int) -> torch.Tensor:
    """(V,) expert of every token id such that experts receive about equal numbers of tokens.

    counts: training frequency of each token id (fairseq Dictionary.count). Greedy bin
    packing: most frequent token first, each to the expert with the fewest tokens so far.
    """
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    heap = [(0, e) for e in range(num_experts)]  # (load, expert)
    table = [0] * len(counts)
    for token in order:
        load, expert = heapq.heappop(heap)
        table[token] = expert
        heapq.heappush(heap, (load + counts[token], expert))
    return torch.tensor(table, dtype=torch.long)
