"""What every router hands back, and the balanced assignment they share.

Routers compute in fp32 whatever the model's dtype: small logit differences decide
the expert, and fp16 rounding would flip them.
"""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RoutingStats:
    """Expert load of one MoE layer on one batch, read by the criterion for the log."""

    layer: str  # module name of the router, e.g. "decoder.layers.1.feature_moe.router"
    expert_counts: torch.Tensor  # (E,) items (tokens or channels) each expert processed
    aux_loss: Optional[torch.Tensor] = None  # scalar load-balancing loss (1.0 = balanced)
    dropped: Optional[torch.Tensor] = None  # scalar: items that no expert processed
    total: Optional[torch.Tensor] = None  # scalar: items routed (for the dropped fraction)


def load_libbase():
    """fairseq's compiled balanced-assignment solver (the auction algorithm of Base Layers)."""
    try:
        from fairseq import libbase
    except ImportError as e:
        raise ImportError(
            "fairseq's compiled extension `fairseq.libbase` is missing; Base-style balanced "
            "routing (--tmoe-experts > 0, --partial-balance assignment) needs it. Reinstall "
            "fairseq with its extensions built: pip install --no-build-isolation "
            "fairseq-fixed==0.12.3.1"
        ) from e
    return libbase


def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """Assign N items to E experts, N/E each (rounded up), maximising total score.

    scores: (N, E) -> expert index per item (N,) long.
    libbase needs N divisible by E (it never returns otherwise), so the matrix is padded
    with dummy rows, each strongly preferring a different expert, that are dropped again:
    expert loads then differ by at most one.
    """
    num_items, num_experts = scores.shape
    scores = scores.detach().float()
    if not torch.isfinite(scores).all():
        raise FloatingPointError("non-finite routing scores passed to balanced assignment")
    padded = -(-num_items // num_experts) * num_experts
    if padded != num_items:
        margin = 2 * scores.abs().max() + 1
        dummy = torch.eye(num_experts, dtype=scores.dtype, device=scores.device)[: padded - num_items] * margin
        scores = torch.cat([scores, dummy])
    order = load_libbase().balanced_assignment(scores.cpu()).to(scores.device)
    expert = torch.empty_like(order)
    expert[order] = torch.arange(padded, device=order.device) // (padded // num_experts)
    return expert[:num_items]


def fp32(device: torch.device):
    """Autocast would run router matmuls in half precision: switch it off around routing."""
    return torch.autocast(device_type=device.type, enabled=False)


def check_finite(logits: torch.Tensor, layer: str) -> None:
    """Stop at the router that produced NaN/inf instead of letting it spread."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"non-finite router logits in {layer}")


def switch_aux_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """Load-balancing loss of Switch / GShard: E * sum_e f_e * P_e.

    probs: (N, E) router probabilities; top1: (N,) first-choice expert.
    f_e = fraction of items whose first choice is e, P_e = mean probability of e.
    Equals 1.0 when routing is uniform, so a weight of 0.01 means what it does in the papers.
    """
    num_experts = probs.size(-1)
    fraction = torch.bincount(top1, minlength=num_experts).float() / top1.numel()
    return num_experts * torch.sum(fraction * probs.float().mean(0))
