"""Router health: how evenly a router spreads its tokens, and how stable its choices are.

One definition for the training log (criterions/moe_cross_entropy.py) and the sparsity
study (benchmarks), so that both report the same numbers:
    load_entropy     normalised entropy of the expert load: 1 = every expert gets the same
                     number of tokens, 0 = one expert gets them all
    changed_tokens   tokens whose first-choice expert differs between two evaluation passes
                     over the same tokens in the same order
    ChoiceMemory     a router's first choices over one evaluation pass, compared forward by
                     forward with the previous pass (the log's `changed`)
"""
import math
from typing import List, Optional, Tuple

import torch


def load_entropy(counts: torch.Tensor) -> torch.Tensor:
    """counts: (E,) tokens per expert -> scalar fp32 in [0, 1]: entropy of the load / log E.

    One expert (E = 1) is balanced by definition (1.0); no tokens at all gives 0.
    """
    num_experts = counts.numel()
    if num_experts < 2:
        return torch.ones((), device=counts.device)
    p = counts.float() / counts.float().sum().clamp(min=1)
    # 0 * log 0 = 0: unused experts contribute nothing
    return -(p * p.clamp(min=torch.finfo(p.dtype).tiny).log()).sum() / math.log(num_experts)


def changed_tokens(previous: torch.Tensor, current: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """previous, current: (N,) expert of the same N tokens (-1 = dropped) in two passes ->
    (tokens whose expert differs, tokens compared), both scalar long tensors."""
    if previous.shape != current.shape:
        raise ValueError(f"cannot compare the choices of {tuple(previous.shape)} and {tuple(current.shape)} tokens")
    changed = (previous.to(current.device, torch.long) != current.long()).sum()
    return changed, torch.tensor(current.numel(), device=current.device)


class ChoiceMemory:
    """The first-choice expert of every token a router saw in one evaluation pass, to count
    the tokens whose expert changed since the previous pass.

    A pass is every evaluation forward between two training forwards: a validation. Its
    i-th forward is compared with the i-th forward of the previous pass when both routed
    the same number of tokens, which holds for fairseq's validation (the same batches in
    the same order every time; the valid iterator is not shuffled). Only the first `limit`
    tokens of a pass are kept (2 bytes each): later forwards are not compared. Not saved in
    checkpoints: the first validation after a (re)start compares nothing.
    """

    limit = 1 << 21  # tokens kept per pass, per router

    def __init__(self):
        self.previous: List[Optional[torch.Tensor]] = []
        self.current: List[Optional[torch.Tensor]] = []
        self.kept = 0
        self.new_pass = True

    def training_forward(self) -> None:
        """A training forward ends the evaluation pass: the next evaluation starts a new one."""
        self.new_pass = True

    def compare(self, choice: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """choice: (N,) this evaluation forward's first choices -> (changed, compared) against
        the same forward of the previous pass, or None when there is nothing to compare."""
        if self.new_pass:
            self.previous, self.current, self.kept, self.new_pass = self.current, [], 0, False
        index = len(self.current)
        compact = None
        if self.kept + choice.numel() <= self.limit:
            compact = choice.detach().to(torch.int16)  # expert ids < 2^15
            self.kept += choice.numel()
        self.current.append(compact)
        before = self.previous[index] if index < len(self.previous) else None
        if before is None or compact is None or before.shape != compact.shape:
            return None
        return changed_tokens(before, compact)
