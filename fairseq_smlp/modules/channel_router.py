"""Partial-prediction routing of hidden channels to spatial experts (sMoE).

A router that looked at a channel over the whole sequence would see future tokens and
leak them into earlier predictions. This one looks only at the first P positions (the
prefix); the LM loss then covers positions >= P only, none of which influenced its own
routing (sMLP paper, section 3.3).
"""
import math

import torch
import torch.nn as nn

from .routing import RoutingStats, balanced_assignment, check_finite, fp32, switch_aux_loss


class PrefixChannelRouter(nn.Module):
    """Assign the C channels of each sequence to E experts, C/E each, from the prefix.

    score[b, c, e] = sum_{t < P} z[b, t, c] * R[t, e]: a learned linear read of the
    channel's prefix. Balance, per sequence so sequences never couple:
      - "assignment": balanced assignment (Base Layers' solver); weight = sigmoid(score);
      - "aux_loss": first choice while the expert has room, the rest spill into free
        slots; weight = softmax probability; Switch load-balancing loss.
    """

    def __init__(self, max_positions: int, prefix_ratio: float, num_experts: int, balance: str = "assignment", solver: str = "torch"):
        super().__init__()
        if not 0.0 < prefix_ratio < 1.0:
            raise ValueError(f"--partial-prefix-ratio must be in (0, 1), got {prefix_ratio}")
        if balance not in ("assignment", "aux_loss"):
            raise ValueError(f"--partial-balance must be 'assignment' or 'aux_loss', got {balance!r}")
        self.prefix_length = max(1, int(math.ceil(prefix_ratio * max_positions)))
        if self.prefix_length >= max_positions:
            raise ValueError(
                f"--partial-prefix-ratio {prefix_ratio} leaves no scored positions for sequences of {max_positions} tokens"
            )
        self.num_experts, self.balance = num_experts, balance
        self.solver = solver  # balanced-assignment solver (routing.SOLVERS)
        self.weight = nn.Parameter(torch.randn(self.prefix_length, num_experts) * self.prefix_length ** -0.5)
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)
        self.name = "prefix_channel_router"

    def forward(self, z: torch.Tensor):
        """z: (B, n, C) normalised channels -> order (B, C), weight (B, C), RoutingStats.

        order lists the channels expert by expert (C/E per expert); weight[b, i] is the
        router weight of channel order[b, i] for its expert.
        """
        with fp32(z.device):
            prefix = z[:, : self.prefix_length].float()  # (B, P', C)
            scores = torch.einsum("bpc,pe->bce", prefix, self.weight[: prefix.size(1)].float())
            check_finite(scores, self.name)
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
        self.expert_load.copy_(counts)
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
    group_start = torch.searchsorted(sorted_first, torch.arange(num_experts, device=probs.device).expand(bsz, -1).contiguous())
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
