"""Routers: which expert(s) each item goes to, and with what weight, decided in fp32.

Token routers (sMLP's tMoE and the Transformer-MoE baselines), x: (N, H) ->
    expert_index (N, k) long, -1 where an assignment was dropped; weight (N, k) fp32; RoutingStats
    BaseRouter    Base Layers (Lewis et al. 2021), sMLP's tMoE: balanced assignment / greedy
    Top1Router    Switch (Fedus et al. 2021): softmax gate, capacity, load-balancing loss
    Top2Router    GShard (Lepikhin et al. 2020): first and second choice, capacity, loss
    Top1BiasedRouter  auxiliary-loss-free balancing (Wang et al. 2024): top-1 of score + bias
    HashRouter    HASH Layers (Roller et al. 2021): a fixed token-id -> expert table
    SinkhornRouter  S-BASE (Clark et al. 2022): top-1 of a causal Sinkhorn balancing in training
    CausalBalancedRouter  tokens in position order, each to its best expert with room left
The channel router of sMoE's partial prediction, z: (B, n, C) -> channel order and weights:
    PrefixChannelRouter  reads the first P positions only (sMLP paper, section 3.3)

Routers never move data: grouping tokens by expert and running the experts is dispatch.py.

Causality: capacity is first come, first served in the order of the N items, so callers
flatten position-major (all sequences' position t before position t+1: fairseq's (T, B)
layers do; sMLP's (B, T) tMoE transposes first), and a token then only competes with
tokens at earlier or equal positions. Routers that balance position by position
(SinkhornRouter, CausalBalancedRouter) also need to know where each position starts: the
decoder hands them a BatchLayout (`batch_layout`). Only BaseRouter's training assignment and
Top2Router's GShard queue (--moe-second-expert-queue gshard) look ahead.

Health: every token router remembers its evaluation choices (health.ChoiceMemory) and
reports in RoutingStats how many tokens changed expert since the previous evaluation pass.
"""
import heapq
import math
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .balanced_assignment import balanced_assignment
from .health import ChoiceMemory


@dataclass
class RoutingStats:
    """Expert load of one router on one batch, read by the criterion for the log."""

    layer: str  # the router's place in the decoder, e.g. "layers.1.feature_moe.router"
    expert_counts: torch.Tensor  # (E,) items (tokens or channels) each expert processed
    aux_loss: Optional[torch.Tensor] = None  # scalar load-balancing loss (1.0 = balanced)
    dropped: Optional[torch.Tensor] = None  # scalar: items that no expert processed
    total: Optional[torch.Tensor] = None  # scalar: items routed (for the dropped fraction)
    bias_range: Optional[torch.Tensor] = None  # scalar: max - min of a biased router's selection bias
    changed: Optional[torch.Tensor] = None  # evaluation: tokens whose first choice changed since the last pass
    compared: Optional[torch.Tensor] = None  # evaluation: tokens compared with the last pass


@dataclass
class BatchLayout:
    """Where the positions are among a router's N items, for routers that balance position
    by position. Items are position-major: [t*B, (t+1)*B) are the B sequences' position
    start + t."""

    sequences: int  # B
    start: int = 0  # position of the first item: positions already decoded (incremental decoding)
    incremental_state: Optional[dict] = None  # fairseq's, during incremental decoding


@contextmanager
def batch_layout(routers, layout: BatchLayout):
    """Hand `layout` to `routers` (those with uses_layout) for the duration of one forward."""
    for router in routers:
        router.layout = layout
    try:
        yield
    finally:
        for router in routers:
            router.layout = None


def layout_routers(root: nn.Module) -> list:
    """The routers under `root` that route position by position (and read a BatchLayout)."""
    return [m for m in root.modules() if getattr(m, "uses_layout", False)]


def check_finite(logits: torch.Tensor, layer: str) -> None:
    """Stop at the router that produced NaN/inf instead of letting it spread."""
    # a NaN/inf anywhere makes the sum non-finite: one reduction instead of an elementwise
    # test (a finite sum that overflowed gets the elementwise test)
    if not torch.isfinite(logits.sum()) and not torch.isfinite(logits).all():
        raise FloatingPointError(
            f"non-finite router logits in {layer}: NaN/inf reached this router (training diverged, or a bad input "
            "or checkpoint); stopped here rather than routing on garbage. Try a lower --lr or --clip-norm"
        )


def check_expert_count(num_experts: int, flag: str, per_item: int = 1) -> None:
    """A router needs at least one expert, and at least as many as each item is sent to."""
    if num_experts < max(1, per_item):
        need = f"at least {per_item} (each token goes to {per_item} experts)" if per_item > 1 else ">= 1"
        raise ValueError(f"{flag} must be {need}, got {num_experts}")


class Router(nn.Module):
    """What every router shares: its expert count, a name for its statistics (the decoder
    sets it to the router's place), and routing in fp32 with autocast off — small logit
    differences decide the expert, and half-precision rounding would flip them."""

    top_k = 1  # experts each item is sent to
    unit_weight = False  # True: every combine weight is 1 (dispatch then skips the product)
    remembers_choices = True  # token routers: count the tokens that changed expert between evaluations
    uses_layout = False  # True: routes position by position, reads the BatchLayout the decoder hands over
    update_watch = None  # routers with per-update state (a bias, global-batch counts) own an UpdateWatch

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.name = type(self).__name__
        self.memory = ChoiceMemory()
        self.layout = None

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq hands every module the update count before each training forward."""
        if self.update_watch is not None:
            self.update_watch.num_updates = num_updates

    def forward(self, x: torch.Tensor):
        with torch.autocast(device_type=x.device.type, enabled=False):
            routed = self.route(x)
        if self.remembers_choices:
            self.remember(routed[0][:, 0], routed[2])
        return routed

    def route(self, x: torch.Tensor):
        raise NotImplementedError

    def remember(self, first: torch.Tensor, stats: RoutingStats) -> None:
        """first: (N,) first choices (-1 = dropped); evaluation: how many changed since the last pass."""
        if self.training:
            self.memory.training_forward()
            return
        compared = self.memory.compare(first)
        if compared is not None:
            stats.changed, stats.compared = compared

    def positions(self, num_items: int):
        """-> (B sequences, position of the first item, incremental_state) of this forward's
        position-major items. Without a layout every item is its own position (one sequence)."""
        layout = self.layout
        if layout is None:
            return 1, 0, None
        if layout.sequences < 1 or num_items % layout.sequences:
            raise RuntimeError(
                f"{self.name}: {num_items} items are not whole positions of {layout.sequences} sequences"
            )
        return layout.sequences, layout.start, layout.incremental_state

    def score(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (N, H), weight (E, H) -> (N, E) fp32 logits, checked for NaN/inf."""
        return self.checked(F.linear(x.float(), weight.float()))

    def checked(self, logits: torch.Tensor) -> torch.Tensor:
        """Every router's fp32 scores pass here before any decision is taken from them."""
        check_finite(logits, self.name)
        return logits

    def score_by_expert(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The same logits expert-major, (E, N) contiguous. Reductions over the E experts of
        each token (softmax, max, logsumexp, running counts) are then reductions over the
        outer dimension, which torch vectorises along the N tokens: on the CPU a softmax over
        the short last dimension of (N, E) is ~20x slower than over dim 0 of (E, N)."""
        return self.score(x, weight).t().contiguous()

    def stats(self, expert_index: torch.Tensor, aux: Optional[torch.Tensor] = None) -> RoutingStats:
        """expert_index: (N, k), -1 = dropped. A token is dropped when no expert kept it."""
        kept = expert_index >= 0
        counts = torch.bincount(expert_index[kept], minlength=self.num_experts).float()
        dropped = (~kept.any(dim=1)).sum()
        total = torch.tensor(expert_index.size(0), device=expert_index.device)
        return RoutingStats(layer=self.name, expert_counts=counts, aux_loss=aux, dropped=dropped, total=total)


def name_routers(root: nn.Module) -> None:
    """Label every router's statistics with its place, e.g. "layers.1.feature_moe.router"."""
    for name, module in root.named_modules():
        if isinstance(module, Router):
            module.name = name


def switch_aux_loss(probs: torch.Tensor, top1: torch.Tensor, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Load-balancing loss of Switch / GShard: E * sum_e f_e * P_e.

    probs: (N, E) router probabilities; top1: (N,) first-choice expert; counts: (E,)
    first-choice counts f is taken from instead of top1's (a global-batch statistic).
    f_e = fraction of items whose first choice is e (no gradient), P_e = mean probability
    of e over these N items. Equals 1.0 when routing is uniform, so a weight of 0.01 means
    what it does in the papers.
    """
    num_experts = probs.size(-1)
    if counts is None:
        counts = torch.bincount(top1, minlength=num_experts)
    fraction = counts.float() / counts.float().sum().clamp(min=1)
    return num_experts * torch.sum(fraction * probs.float().mean(0))


def router_z_loss(logits_t: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss, mean_n logsumexp_e(logits)^2 over (E, N) expert-major logits:
    keeps gate logits small, so that scores neither saturate nor overflow."""
    return torch.logsumexp(logits_t, dim=0).pow(2).mean()


class UpdateWatch:
    """Notices optimizer updates from inside a forward. Under fairseq the update count does:
    fairseq's task hands it to every module's `set_num_updates` before each training forward,
    and a step skipped for fp16 overflow does not advance it. Without fairseq (a plain torch
    loop) a change of the router's weight since the previous training forward does; that
    alone would miss updates once the gate stops moving (a saturated sigmoid gate gets zero
    gradient), and a step with learning rate 0 (fairseq's first warm-up update) counts with
    the next."""

    def __init__(self):
        self.seen = None
        self.num_updates = None  # set by fairseq through the router's set_num_updates
        self.seen_updates = None

    def new_update(self, weight: torch.Tensor) -> bool:
        """Call at every training forward: True when an update happened since the last call."""
        weight = weight.detach()
        seen, self.seen = self.seen, weight.clone()
        kind = (weight.shape, weight.device, weight.dtype)
        moved = seen is not None and (seen.shape, seen.device, seen.dtype) == kind and not torch.equal(seen, weight)
        counted = self.seen_updates is not None and self.num_updates != self.seen_updates
        self.seen_updates = self.num_updates
        return moved or counted


# ------------------------------------------------------------------- Base Layers (tMoE)
class BaseRouter(Router):
    """Base Layers routing (Lewis et al. 2021), the tMoE routing of sMLP.

    Each expert has a centroid; a token's affinity to expert e is x . c_e. Training:
    balanced assignment (every expert gets N/E tokens, no token dropped, no auxiliary
    loss). Evaluation: greedy top-1. The expert output is mixed in with weight
    sigmoid(x . c_e), which is what trains the centroids.
    """

    def __init__(self, embed_dim: int, num_experts: int, solver: str = "torch"):
        super().__init__(num_experts)
        self.solver = solver  # balanced_assignment.SOLVERS
        centroids = torch.empty(num_experts, embed_dim)
        nn.init.orthogonal_(centroids, gain=0.1)
        self.centroids = nn.Parameter(centroids)

    def route(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 1), weight (N, 1), RoutingStats."""
        scores = self.score(x, self.centroids)  # (N, E)
        with torch.no_grad():
            expert = balanced_assignment(scores, self.solver) if self.training else scores.argmax(-1)
        alpha = torch.sigmoid(scores.gather(1, expert.unsqueeze(1)))
        counts = torch.bincount(expert, minlength=self.num_experts).float()
        return expert.unsqueeze(1), alpha, RoutingStats(layer=self.name, expert_counts=counts)


# ------------------------------------------------------------------- Switch, GShard
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
    # running count of each expert's assignments, expert-major (E, N): a cumsum along the
    # contiguous token dimension (over the short last dimension of a (N, E) one-hot it is slow)
    mine = expert.unsqueeze(0) == torch.arange(num_experts, device=expert.device).unsqueeze(1)  # (E, N)
    if active is not None:
        mine &= active.unsqueeze(0)
    position = mine.cumsum(1).gather(0, expert.unsqueeze(0)).squeeze(0) - 1  # (N,) slots before this one
    if offset is not None:
        position = position + offset[expert]
    kept = position < capacity
    return kept if active is None else kept & active


class LearnedGateRouter(Router):
    """What Switch (top-1) and GShard (top-2) share: a linear gate, a capacity per expert
    (train / eval factors), and the load-balancing loss.

    aux_loss = E * sum_e f_e * P_e (switch_aux_loss; 1.0 when uniform) + z_loss_weight *
    mean_n logsumexp(logits_n)^2 (router z-loss, ST-MoE; 0 disables it). The criterion
    multiplies the sum by --moe-aux-loss-weight.

    balance_scope, where f_e (the share of first choices, no gradient) is counted:
      "micro-batch": this forward's tokens (Switch, GShard);
      "global-batch" (Qiu et al. 2025, arXiv 2501.11873), in training: the first choices of
        every training forward of the current optimizer update so far (micro-batches 1..m
        of --update-freq, this one included), summed over the data-parallel workers (one
        all-reduce of E counts per forward; every worker then has the same f). P_e stays
        the mean probability over this forward's own tokens, so the gradient is unchanged
        in form. An update is noticed by UpdateWatch. Evaluation: micro-batch.
    """

    balance_scopes = ("micro-batch", "global-batch")

    def __init__(self, embed_dim: int, num_experts: int, train_capacity_factor: float, eval_capacity_factor: float,
                 z_loss_weight: float = 0.0, balance_scope: str = "micro-batch"):
        check_expert_count(num_experts, "--moe-experts", per_item=self.top_k)
        super().__init__(num_experts)
        if balance_scope not in self.balance_scopes:
            raise ValueError(f"--moe-balance-scope must be one of {self.balance_scopes}, got {balance_scope!r}")
        self.train_capacity_factor, self.eval_capacity_factor = train_capacity_factor, eval_capacity_factor
        self.z_loss_weight, self.balance_scope = z_loss_weight, balance_scope
        self.update_watch, self._update_counts = UpdateWatch(), None
        # small init: near-uniform probabilities at the start (Switch, section 2.4)
        self.gate = nn.Linear(embed_dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.1 * embed_dim ** -0.5)

    def capacity(self, num_tokens: int) -> int:
        factor = self.train_capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, factor)

    def aux_loss(self, logits_t: torch.Tensor, probs_t: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """logits_t, probs_t: (E, N) expert-major; first: (N,) first choices."""
        loss = switch_aux_loss(probs_t.t(), first, self.balance_counts(first))
        if self.z_loss_weight > 0:
            loss = loss + self.z_loss_weight * router_z_loss(logits_t)
        return loss

    @torch.no_grad()
    def balance_counts(self, first: torch.Tensor) -> Optional[torch.Tensor]:
        """(N,) first choices -> (E,) counts f_e is taken from; None: this forward's own."""
        if not (self.training and self.balance_scope == "global-batch"):
            return None
        counts = all_reduce_counts(torch.bincount(first, minlength=self.num_experts).float())
        pending = self._update_counts
        if self.update_watch.new_update(self.gate.weight) or pending is None or pending.device != counts.device:
            pending = torch.zeros_like(counts)
        self._update_counts = pending + counts
        return self._update_counts

    def gate_probs(self, x: torch.Tensor):
        """x (N, H) -> logits and softmax probabilities, both expert-major (E, N)."""
        logits_t = self.score_by_expert(x, self.gate.weight)
        return logits_t, torch.softmax(logits_t, dim=0)


class Top1Router(LearnedGateRouter):
    """Switch Transformer routing: each token goes to its most probable expert, weighted by
    that probability; tokens beyond the expert's capacity are dropped (the layer then adds
    nothing: the token passes through the residual)."""

    top_k = 1

    def route(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 1) (-1 = dropped), weight (N, 1) fp32, RoutingStats."""
        logits_t, probs_t = self.gate_probs(x)  # (E, N)
        gate, first = probs_t.max(dim=0)  # (N,)
        capacity = self.capacity(x.size(0))
        kept = within_capacity(first, capacity, self.num_experts)
        expert_index = torch.where(kept, first, -1).unsqueeze(1)
        weight = (gate * kept).unsqueeze(1)
        # first come, first served: an expert keeps min(demand, capacity) tokens
        counts = torch.bincount(first, minlength=self.num_experts).clamp_(max=capacity)
        total = torch.tensor(x.size(0), device=x.device)
        stats = RoutingStats(
            layer=self.name, expert_counts=counts.float(), aux_loss=self.aux_loss(logits_t, probs_t, first),
            dropped=total - counts.sum(), total=total,
        )
        return expert_index, weight, stats


class Top2Router(LearnedGateRouter):
    """GShard routing: first and second most probable experts.

    Second expert in training, by --moe-second-expert-policy: "all" the runner-up,
    "sampling" drawn from the remaining experts' softmax (Gumbel-max), "random" the
    runner-up kept with probability 2 * g2 / (g1 + g2) (GShard's own policy). In
    evaluation always the runner-up. Capacity, by --moe-second-expert-queue: "causal" (the
    default) keeps one queue in token order, each token's first choice just before its
    second, so a token competes only with earlier positions; "gshard" (GShard's own order)
    queues all first choices before any second choice, so in training a later token's first
    choice can take an earlier token's second slot: a causal LM then learns from the future
    whenever tokens are dropped (kept for comparison with the paper's setting). Combine weights
    are the gate probabilities renormalised over the kept experts.
    """

    top_k = 2
    policies = ("sampling", "all", "random")
    queues = ("gshard", "causal")

    def __init__(self, *args, second_expert_policy: str = "sampling", queue: str = "causal", **kwargs):
        super().__init__(*args, **kwargs)
        if second_expert_policy not in self.policies:
            raise ValueError(f"--moe-second-expert-policy must be one of {self.policies}, got {second_expert_policy!r}")
        if queue not in self.queues:
            raise ValueError(f"--moe-second-expert-queue must be one of {self.queues}, got {queue!r}")
        self.second_expert_policy, self.queue = second_expert_policy, queue

    def route(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 2) (-1 = dropped), weight (N, 2) fp32, RoutingStats."""
        logits_t, probs_t = self.gate_probs(x)  # (E, N)
        first = probs_t.max(dim=0).indices
        second = self.second_choice(logits_t.detach(), first)
        g1, g2 = probs_t.gather(0, first.unsqueeze(0)).squeeze(0), probs_t.gather(0, second.unsqueeze(0)).squeeze(0)
        wants_second = torch.ones_like(first, dtype=torch.bool)
        if self.training and self.second_expert_policy == "random":
            wants_second = 2 * (g2 / (g1 + g2)).detach() > torch.rand_like(g2)

        capacity = self.capacity(x.size(0))
        experts = torch.stack([first, second], dim=1)  # (N, 2)
        if self.queue == "causal":
            # one queue in token order, each token's first choice just before its second: a
            # token competes only with tokens at earlier or equal positions
            active = torch.stack([torch.ones_like(wants_second), wants_second], dim=1)
            kept = within_capacity(experts.reshape(-1), capacity, self.num_experts, active=active.reshape(-1))
            kept = kept.view_as(experts)
        else:  # GShard: every first choice before any second choice
            keep1 = within_capacity(first, capacity, self.num_experts)
            first_counts = torch.bincount(first, minlength=self.num_experts)
            keep2 = within_capacity(second, capacity, self.num_experts, active=wants_second, offset=first_counts)
            kept = torch.stack([keep1, keep2], dim=1)
        gates = torch.stack([g1, g2], dim=1) * kept
        weight = gates / gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).tiny)
        expert_index = torch.where(kept, experts, -1)
        return expert_index, weight, self.stats(expert_index, self.aux_loss(logits_t, probs_t, first))

    def second_choice(self, logits_t: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """(E, N) expert-major logits, (N,) -> (N,) an expert other than the first."""
        if self.training and self.second_expert_policy == "sampling":
            # noise drawn token-major (N, E), the order of the random stream before the
            # expert-major layout: the same seed samples the same experts
            uniform = torch.rand(logits_t.t().shape, device=logits_t.device, dtype=logits_t.dtype)
            uniform = uniform.clamp_(min=1e-9, max=1 - 1e-9)
            logits_t = logits_t - uniform.log_().neg_().log_().t()  # + Gumbel noise: a softmax sample
        return logits_t.scatter(0, first.unsqueeze(0), float("-inf")).max(dim=0).indices


# ------------------------------------------------------------------- auxiliary-loss-free balancing
def all_reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum expert counts over fairseq's data-parallel workers (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            from fairseq.distributed.utils import get_data_parallel_group

            group = get_data_parallel_group()
        except Exception:  # fairseq's groups not set up (a plain torch.distributed run)
            group = None
        dist.all_reduce(counts, group=group)
    return counts


class Top1BiasedRouter(Router):
    """Auxiliary-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

    scores = sigmoid (or softmax) of fp32 logits x . W_e; each token goes to
    argmax_e (score_e + bias_e), weighted by its UNBIASED score_e. The bias is a buffer
    (in the checkpoint, no gradient) that steers selection only: after each optimizer
    update, bias_e += rate * sign(mean load - load_e), the load counted over every training
    forward of that update and summed over the data-parallel workers (a global-batch
    statistic, identical on every worker). The update is applied at the first training
    forward of the next update (UpdateWatch: fairseq's update count, or the gate's weights
    having changed; a skipped fp16 step advances neither), or by calling `update_bias()`.
    Same routing in training and evaluation, no capacity, nothing dropped, no balance loss
    (z_loss_weight > 0 adds ST-MoE's router z-loss, which only keeps the logits small: at a
    high learning rate they grow until the sigmoid saturates, its scores tie at 1.0 and the
    gate's gradient vanishes): every token's expert depends on that token alone (causal, incremental decoding
    equals the full forward).
    """

    top_k = 1
    score_functions = ("sigmoid", "softmax")

    def __init__(
        self, embed_dim: int, num_experts: int, bias_update_rate: float = 1e-3, score_function: str = "sigmoid",
        z_loss_weight: float = 0.0,
    ):
        check_expert_count(num_experts, "--moe-experts")
        super().__init__(num_experts)
        if score_function not in self.score_functions:
            raise ValueError(f"score function must be one of {self.score_functions}, got {score_function!r}")
        self.bias_update_rate, self.score_function = bias_update_rate, score_function
        self.z_loss_weight = z_loss_weight
        self.gate = nn.Linear(embed_dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.1 * embed_dim ** -0.5)
        self.register_buffer("expert_bias", torch.zeros(num_experts))  # persistent: saved in checkpoints
        self._pending = None  # (E,) fp32 loads counted since the last bias update (not saved)
        self.update_watch = UpdateWatch()

    def route(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 1), weight (N, 1) fp32, RoutingStats."""
        if self.training and self.update_watch.new_update(self.gate.weight):
            self.update_bias()
        logits_t = self.score_by_expert(x, self.gate.weight)  # (E, N)
        scores_t = torch.sigmoid(logits_t) if self.score_function == "sigmoid" else torch.softmax(logits_t, dim=0)
        with torch.no_grad():
            expert = (scores_t + self.expert_bias.float().unsqueeze(1)).argmax(dim=0)  # (N,)
        weight = scores_t.gather(0, expert.unsqueeze(0)).t()  # (N, 1) unbiased score
        counts = torch.bincount(expert, minlength=self.num_experts).float()
        if self.training:
            self._pending = counts.clone() if self._pending is None else self._pending.to(counts.device) + counts
        bias = self.expert_bias.float()
        z_loss = self.z_loss_weight * router_z_loss(logits_t) if self.training and self.z_loss_weight > 0 else None
        stats = RoutingStats(
            layer=self.name, expert_counts=counts, aux_loss=z_loss,
            dropped=torch.zeros((), dtype=torch.long, device=x.device),
            total=torch.tensor(x.size(0), device=x.device), bias_range=(bias.max() - bias.min()).detach(),
        )
        return expert.unsqueeze(1), weight, stats

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += rate * sign(mean load - load), from the loads counted since the last update."""
        if self._pending is None:
            return
        load = all_reduce_counts(self._pending.to(self.expert_bias.device, torch.float32))
        self._pending = None
        if load.sum() > 0:
            self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load).to(self.expert_bias.dtype))


# ------------------------------------------------------------------- S-BASE (Sinkhorn)
def causal_sinkhorn(logits_t: torch.Tensor, iterations: int) -> torch.Tensor:
    """logits_t: (E, T, B) fp32, expert-major -> (E, T, 1) log column scales log c_e(t) of an
    online Sinkhorn balancing: the scales applied at position t balance the tokens of the
    positions before t, of every sequence.

    Sinkhorn alternates two normalisations of K = exp(logits): every token's row sums to 1
    (row scale r), every expert's column gets an equal share of the tokens (column scale c).
    Here c(t) balances the n = t * B tokens of positions < t: c_e(t) = (n / E) /
    sum_{t' < t, b} r_t'b K_t'be (a cumulative sum over positions), and each token's row
    scale uses its own position's c. Position 0 has no past: c = 1, greedy. Every quantity
    at t comes from positions < t and from the token itself. The current position is left
    out of its own balance on purpose: with it, a lone token (B = 1, t = 0) would be spread
    exactly evenly over the experts, and its choice a tie that rounding noise decides. In
    log space, so that fp32 never overflows.
    """
    num_experts, num_positions, sequences = logits_t.shape
    tokens_before = torch.arange(1, num_positions, device=logits_t.device, dtype=torch.float32) * sequences
    log_share = (tokens_before / num_experts).log().view(1, -1, 1)  # (1, T - 1, 1): log(n / E) for t >= 1
    log_r = -torch.logsumexp(logits_t, dim=0, keepdim=True)  # (1, T, B): rows normalised, c = 1
    log_c = torch.zeros(num_experts, num_positions, 1, device=logits_t.device, dtype=logits_t.dtype)
    for _ in range(iterations):
        mass = torch.logsumexp(logits_t + log_r, dim=2, keepdim=True)  # (E, T, 1): each position's column mass
        past = torch.logcumsumexp(mass, dim=1)[:, :-1]  # (E, T - 1, 1): positions < t, for t >= 1
        log_c = torch.cat([torch.zeros_like(log_c[:, :1]), log_share - past], dim=1)
        log_r = -torch.logsumexp(logits_t + log_c, dim=0, keepdim=True)
    return log_c


class SinkhornRouter(Router):
    """S-BASE (Clark et al. 2022, "Unified scaling laws for routed language models"): Base
    Layers' balanced assignment replaced by a few Sinkhorn iterations.

    Training: each token goes to the top-1 expert of a Sinkhorn-balanced assignment
    (argmax_e of logit_e + log c_e(t), causal_sinkhorn: an online Sinkhorn whose scales at
    position t balance the tokens of the positions before t, of all sequences; strictly
    causal. The paper balances the whole batch, which looks ahead). Evaluation: greedy top-1
    of the logits, as S-BASE (and Megatron-LM's sinkhorn router) do: per token, strictly
    causal, incremental decoding equals the full forward; but training and evaluation route
    differently. The expert output is weighted by sigmoid(logit_e) of the unbiased logit (Base
    Layers' gate), which is what trains the router. No auxiliary loss, no capacity, nothing
    dropped; the balance is soft (top-1 of a balanced soft assignment), not exact.
    """

    uses_layout = True  # training: needs the positions (BatchLayout) to stay causal

    def __init__(self, embed_dim: int, num_experts: int, iterations: int = 8):
        check_expert_count(num_experts, "--moe-experts")
        super().__init__(num_experts)
        if iterations < 1:
            raise ValueError(f"Sinkhorn needs at least one iteration, got {iterations}")
        self.iterations = iterations
        self.gate = nn.Linear(embed_dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.1 * embed_dim ** -0.5)

    def route(self, x: torch.Tensor):
        """x: (N, H) position-major -> expert_index (N, 1), weight (N, 1) fp32, RoutingStats."""
        logits_t = self.score_by_expert(x, self.gate.weight)  # (E, N)
        with torch.no_grad():
            if self.training:
                sequences = self.positions(x.size(0))[0]
                by_position = logits_t.view(self.num_experts, -1, sequences)  # (E, T, B)
                balanced = by_position + causal_sinkhorn(by_position, self.iterations)
                expert = balanced.argmax(dim=0).reshape(-1)  # (N,) position-major again
            else:
                expert = logits_t.argmax(dim=0)
        weight = torch.sigmoid(logits_t.gather(0, expert.unsqueeze(0))).t()  # (N, 1)
        expert_index = expert.unsqueeze(1)
        return expert_index, weight, self.stats(expert_index)


# ------------------------------------------------------------------- causal balanced assignment
class CausalBalancedRouter(Router):
    """A balanced assignment that never looks ahead: tokens taken in position order (all
    sequences' position t, in batch order, before position t + 1), each to the best expert
    (highest logit) that still has room.

    Room: among the n_t tokens at positions <= t, an expert takes at most
    ceil(capacity_factor * n_t / E). With capacity_factor >= 1 some expert always has room,
    so no token is dropped, and every prefix of positions is balanced to within that bound.
    The bound does not depend on how many positions follow: a token's expert depends only
    on the tokens before it in that order, never on a later position of any sequence.
    Training and evaluation route by the same rule (the same batch routes identically);
    the balance couples the sequences of a batch, so a validation result depends on which
    sequences share a batch. Incremental decoding carries the counts in fairseq's
    incremental state and equals the full forward (beam search: the counts include every
    hypothesis the decoder expanded). Weight sigmoid(logit_e) of the chosen expert (Base
    Layers' gate): no auxiliary loss. The assignment is a Python loop over the tokens
    (about a microsecond each), with one device-to-host copy per layer.
    """

    uses_layout = True

    def __init__(self, embed_dim: int, num_experts: int, capacity_factor: float = 1.0):
        check_expert_count(num_experts, "--moe-experts")
        super().__init__(num_experts)
        if capacity_factor < 1.0:
            raise ValueError(
                f"the causal balanced assignment needs capacity factor >= 1 (nothing dropped), got {capacity_factor}"
            )
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(embed_dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.1 * embed_dim ** -0.5)
        self.state_key = f"{uuid.uuid4()}.causal_balanced"  # its entry in fairseq's incremental state

    def route(self, x: torch.Tensor):
        """x: (N, H) position-major -> expert_index (N, 1), weight (N, 1) fp32, RoutingStats."""
        logits = self.score(x, self.gate.weight)  # (N, E)
        sequences, start, state = self.positions(x.size(0))
        counts, routed = self.carried(start, state)
        with torch.no_grad():
            expert = self.assign(logits.detach(), sequences, counts, routed)
        if state is not None:
            state[self.state_key] = {
                "counts": torch.tensor(counts), "routed": torch.tensor(routed + x.size(0)),
                "positions": torch.tensor(start + x.size(0) // sequences),
            }
        expert_index = expert.unsqueeze(1)
        weight = torch.sigmoid(logits.gather(1, expert_index))
        return expert_index, weight, self.stats(expert_index)

    def carried(self, start: int, state: Optional[dict]):
        """-> (E,) tokens per expert and tokens routed at the positions before `start`."""
        if start == 0:
            return [0] * self.num_experts, 0
        saved = state.get(self.state_key) if state is not None else None
        if saved is None or int(saved["positions"]) != start:
            raise RuntimeError(
                f"{self.name}: decoding position {start} without the counts of positions 0..{start - 1}: "
                "the causal balanced assignment decodes position by position from the first"
            )
        return saved["counts"].tolist(), int(saved["routed"])

    def assign(self, logits: torch.Tensor, sequences: int, counts: list, routed: int) -> torch.Tensor:
        """logits: (N, E) position-major; counts (E,) and routed: the tokens before them
        (updated in place) -> (N,) expert of each token."""
        num_items, num_experts = logits.shape
        first = logits.argmax(dim=1).tolist()
        preference = logits.argsort(dim=1, descending=True).cpu().numpy()  # (N, E) best first
        expert = [0] * num_items
        room = 0
        for i in range(num_items):
            if i % sequences == 0:  # a new position: n_t counts all of its tokens
                room = math.ceil(self.capacity_factor * (routed + i + sequences) / num_experts)
            e = first[i]
            if counts[e] >= room:
                e = next(int(c) for c in preference[i] if counts[c] < room)
            counts[e] += 1
            expert[i] = e
        return torch.tensor(expert, device=logits.device)


# ------------------------------------------------------------------- HASH Layers
class HashRouter(Router):
    """HASH Layers routing: expert = table[token id], weight 1.

    The table is a buffer, so it is saved in the checkpoint and identical after reload;
    no learned parameters, no auxiliary loss, nothing dropped. fairseq's decoder layers
    only receive hidden states, so the decoder hands the token ids over with
    `set_token_ids` before each forward.
    """

    unit_weight = True

    def __init__(self, table: torch.Tensor, num_experts: int):
        check_expert_count(num_experts, "--moe-experts")
        super().__init__(num_experts)
        self.register_buffer("table", table.long())  # (V,) persistent: part of the checkpoint
        self.token_ids = None

    def set_token_ids(self, token_ids) -> None:
        """token_ids: (N,) in the order the layer flattens its input (time-major in fairseq)."""
        self.token_ids = token_ids

    def route(self, x: torch.Tensor):
        """x: (N, H) -> expert_index (N, 1), weight (N, 1) ones, RoutingStats."""
        if self.token_ids is None or self.token_ids.numel() != x.size(0):
            raise RuntimeError(
                f"{self.name}: token ids for {x.size(0)} tokens were not set; a HASH layer must run inside "
                "MoETransformerDecoder (arch hash_lm_*), which passes them down"
            )
        expert = self.table[self.token_ids.to(self.table.device)].unsqueeze(1)  # (N, 1)
        return expert, torch.ones(x.size(0), 1, device=x.device), self.stats(expert)


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


# ------------------------------------------------------------------- sMoE partial prediction
class PrefixChannelRouter(Router):
    """Assign the C channels of each sequence to E spatial experts, C/E each, from the prefix.

    A router that looked at a channel over the whole sequence would see future tokens and
    leak them into earlier predictions. This one reads only the first P positions; the LM
    loss then covers positions >= P only, none of which influenced its own routing.

    score[b, c, e] = sum_{t < P} z[b, t, c] * R[t, e]: a learned linear read of the
    channel's prefix. Balance, per sequence so sequences never couple:
      - "assignment": balanced assignment (Base Layers' solver); weight = sigmoid(score);
      - "aux_loss": first choice while the expert has room, the rest spill into free
        slots; weight = softmax probability; Switch load-balancing loss.
    """

    remembers_choices = False  # routes channels, and returns them in expert order, not tokens

    def __init__(
        self, max_positions: int, prefix_ratio: float, num_experts: int, balance: str = "assignment",
        solver: str = "torch",
    ):
        super().__init__(num_experts)
        if not 0.0 < prefix_ratio < 1.0:
            raise ValueError(f"--partial-prefix-ratio must be in (0, 1), got {prefix_ratio}")
        if balance not in ("assignment", "aux_loss"):
            raise ValueError(f"--partial-balance must be 'assignment' or 'aux_loss', got {balance!r}")
        self.prefix_length = max(1, int(math.ceil(prefix_ratio * max_positions)))
        if self.prefix_length >= max_positions:
            raise ValueError(
                f"--partial-prefix-ratio {prefix_ratio} leaves no scored positions for sequences of "
                f"{max_positions} tokens"
            )
        self.balance, self.solver = balance, solver
        self.weight = nn.Parameter(torch.randn(self.prefix_length, num_experts) * self.prefix_length ** -0.5)

    def route(self, z: torch.Tensor):
        """z: (B, n, C) normalised channels -> order (B, C), weight (B, C), RoutingStats.

        order lists the channels expert by expert (C/E per expert); weight[b, i] is the
        router weight of channel order[b, i] for its expert.
        """
        prefix = z[:, : self.prefix_length].float()  # (B, P', C)
        scores = self.checked(torch.einsum("bpc,pe->bce", prefix, self.weight[: prefix.size(1)].float()))
        if self.balance == "assignment":
            expert = balanced_assignment(scores.detach(), self.solver)  # (B, C): all sequences at once
            weight = torch.sigmoid(scores.gather(2, expert.unsqueeze(-1)).squeeze(-1))
            aux = None
        else:
            probs = torch.softmax(scores, dim=-1)
            expert = _first_choice_with_spill(probs.detach())
            weight = probs.gather(2, expert.unsqueeze(-1)).squeeze(-1)
            aux = switch_aux_loss(probs.reshape(-1, self.num_experts), probs.argmax(-1).reshape(-1))
        order = torch.argsort(expert, dim=1, stable=True)
        counts = torch.bincount(expert.reshape(-1), minlength=self.num_experts).float()
        return order, weight.gather(1, order), RoutingStats(layer=self.name, expert_counts=counts, aux_loss=aux)


def _first_choice_with_spill(probs: torch.Tensor) -> torch.Tensor:
    """probs: (B, C, E) -> expert (B, C), exactly C/E channels per expert in each row.

    Each expert keeps its C/E most confident first-choice channels; the channels it
    could not keep fill the free slots of the other experts, most confident first.
    """
    bsz, channels, num_experts = probs.shape
    per_expert = channels // num_experts
    top_prob, first = probs.max(-1)
    # rank of each channel among those choosing the same expert, most confident first
    key = first.float() * 2 - top_prob  # sorts by expert, then by descending probability
    by_expert = torch.argsort(key, dim=1)
    sorted_first = first.gather(1, by_expert)
    expert_ids = torch.arange(num_experts, device=probs.device).expand(bsz, -1).contiguous()
    group_start = torch.searchsorted(sorted_first, expert_ids)
    rank_sorted = torch.arange(channels, device=probs.device) - group_start.gather(1, sorted_first)
    rank = torch.empty_like(rank_sorted).scatter_(1, by_expert, rank_sorted)
    kept = rank < per_expert

    slot = torch.where(kept, first * per_expert + rank, torch.full_like(first, -1))  # (B, C)
    # spilled channels write into a spare last column, which is dropped
    occupied = torch.zeros(bsz, channels + 1, dtype=torch.int8, device=probs.device)
    occupied.scatter_(1, torch.where(kept, slot, channels), 1)
    occupied = occupied[:, :channels]
    # the i-th spilled channel takes the i-th free slot; both lists have the same length
    free_slots = torch.argsort(occupied, dim=1, stable=True)
    spill_order = torch.argsort(torch.where(kept, 2.0, 1.0 - top_prob), dim=1, stable=True)
    num_spilled = (~kept).sum(1, keepdim=True)
    is_spill = torch.arange(channels, device=probs.device) < num_spilled
    slot = slot.scatter(1, spill_order, torch.where(is_spill, free_slots, slot.gather(1, spill_order)))
    return slot // per_expert
