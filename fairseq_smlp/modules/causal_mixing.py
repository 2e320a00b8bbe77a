"""Causal token mixing: the learned T x T matrices of gMLP's spatial gating unit.

One module serves the dense gate (one matrix) and the sparse sMoE (one matrix per
expert): an sMoE expert is exactly a spatial matrix that owns a chunk of channels.
"""
import torch
import torch.nn as nn


def check_length(length: int, max_positions: int) -> None:
    """The spatial matrix is T_max x T_max: a longer sequence has no weights."""
    if length > max_positions:
        raise ValueError(
            f"sequence length {length} exceeds the spatial matrix size {max_positions} "
            f"(set by --tokens-per-sample / --max-target-positions at training time); "
            f"evaluate with --tokens-per-sample <= {max_positions}"
        )


class CausalTokenMixing(nn.Module):
    """Per-expert causal spatial projection.

    y[b, t, e, :] = sum_{s <= t} W[e, t, s] * x[b, s, e, :] + bias[e, t]

    W starts near zero and the bias at one, so a gMLP block starts as a plain FFN
    (Liu et al. 2021). Positions are absolute: inputs must be right-padded.
    """

    def __init__(self, num_experts: int, max_positions: int, init_eps: float = 1e-3):
        super().__init__()
        self.num_experts = num_experts
        self.max_positions = max_positions
        eps = init_eps / max_positions
        self.weight = nn.Parameter(torch.empty(num_experts, max_positions, max_positions).uniform_(-eps, eps))
        self.bias = nn.Parameter(torch.ones(num_experts, max_positions))

    def forward(self, x: torch.Tensor, first_output: int = 0) -> torch.Tensor:
        """x: (B, T, E, c) positions 0..T-1 -> (B, T_new, E, c), rows first_output..T-1,
        T_new = T - first_output.

        first_output > 0 computes only the newest rows (incremental decoding).
        """
        bsz, length, num_experts, c = x.shape
        check_length(length, self.max_positions)
        new_length = length - first_output
        # rows first_output..T-1, columns 0..T-1, zero above the diagonal (no look-ahead)
        weight = torch.tril(self.weight[:, first_output:length, :length], diagonal=first_output)
        bias = self.bias[:, first_output:length]
        # one batched matmul over experts: (E, T_new, T) @ (E, T, B*c)
        x_e = x.permute(2, 1, 0, 3).reshape(num_experts, length, bsz * c)
        y_e = torch.baddbmm(bias.unsqueeze(-1).to(x.dtype), weight.to(x.dtype), x_e)
        return y_e.view(num_experts, new_length, bsz, c).permute(2, 1, 0, 3)
