"""Balanced assignment: N items to E experts, N/E each, maximising the total score.

Base Layers routing (sMLP's tMoE in training, and the partial-prediction channel router)
assigns every expert the same number of items, none dropped, no auxiliary loss. Two solvers:
"torch" (default; vectorised dual prices, on the scores' device) and "libbase" (fairseq's
compiled auction algorithm, on the CPU).
"""
import torch


def load_libbase():
    """fairseq's compiled balanced-assignment solver (the auction algorithm of Base Layers)."""
    try:
        from fairseq import libbase
    except ImportError as e:
        raise ImportError(
            "fairseq's compiled extension `fairseq.libbase` is missing; Base-style balanced "
            "routing (--tmoe-experts > 0, --partial-balance assignment) with --balanced-assignment "
            "libbase needs it (the default solver, torch, does not). Reinstall "
            "fairseq with its extensions built: pip install --no-build-isolation "
            "fairseq-fixed==0.12.3.1"
        ) from e
    return libbase


SOLVERS = ("torch", "libbase")


def balanced_assignment(scores: torch.Tensor, solver: str = "torch") -> torch.Tensor:
    """Assign N items to E experts, N/E each (rounded up), maximising total score.

    scores: (N, E) -> expert index per item (N,) long; (B, N, E) -> (B, N), B independent
    problems (the torch solver runs them together). Expert loads differ by at most one
    (experts 0.. take the smaller share when E does not divide N).
    solver "torch" (default): dual price search + capacity fill below, vectorised over
    the items, on the scores' device; its total score is >= libbase's (tested). "libbase":
    fairseq's compiled auction (Base Layers), on the CPU. Their times, by E and N:
    benchmarks/results/balanced_assignment.md.
    """
    num_items, num_experts = scores.shape[-2:]
    scores = scores.detach().float()
    if not torch.isfinite(scores.sum()) and not torch.isfinite(scores).all():  # (a sum is one cheap reduction)
        raise FloatingPointError("non-finite routing scores passed to balanced assignment")
    if solver == "torch":
        return _price_assignment(scores, _capacities(num_items, num_experts, scores.device))
    if solver != "libbase":
        raise ValueError(f"--balanced-assignment must be one of {SOLVERS}, got {solver!r}")
    if scores.dim() == 3:
        return torch.stack([_libbase_assignment(s) for s in scores])
    return _libbase_assignment(scores)


def _capacities(num_items: int, num_experts: int, device) -> torch.Tensor:
    """(E,) slots per expert: N // E, plus one for the last N % E experts (as libbase's padding)."""
    capacity = torch.full((num_experts,), num_items // num_experts, dtype=torch.long, device=device)
    capacity[num_experts - num_items % num_experts :] += num_items % num_experts > 0
    return capacity


def _libbase_assignment(scores: torch.Tensor) -> torch.Tensor:
    """libbase needs N divisible by E (it never returns otherwise), so the matrix is padded
    with dummy rows, each strongly preferring a different expert, that are dropped again."""
    num_items, num_experts = scores.shape
    padded = -(-num_items // num_experts) * num_experts
    if padded != num_items:
        margin = 2 * scores.abs().max() + 1
        dummy = torch.eye(num_experts, dtype=scores.dtype, device=scores.device)[: padded - num_items] * margin
        scores = torch.cat([scores, dummy])
    order = load_libbase().balanced_assignment(scores.cpu()).to(scores.device)
    expert = torch.empty_like(order)
    expert[order] = torch.arange(padded, device=order.device) // (padded // num_experts)
    return expert[:num_items]


# Written by hand: no installed library solves this transportation problem vectorised
# in torch (scipy's linear_sum_assignment needs an N x N matrix and a CPU round trip).
def _price_assignment(scores: torch.Tensor, capacity: torch.Tensor, max_sweeps: int = 50) -> torch.Tensor:
    """Balanced assignment through expert prices (the LP dual of the assignment).

    Every item takes its best expert under price-adjusted scores s[i, e] - p[e]; if
    each expert then holds exactly capacity[e] items, with no item tied, the assignment is
    the unique optimum (LP duality: each item has its best adjusted score and every slot is
    used). Prices come from coordinate descent on the dual (_sweep_prices); with many experts
    and items they start from the smoothed dual's minimum (_smoothed_prices), which needs
    far fewer sweeps at large E. A certified optimum is unique, so wherever the sweeps from
    zero prices certify one the warm start returns the same assignment, and a problem it
    cannot certify is solved again from zero prices, exactly as without it. (Where the sweeps
    from zero prices never certify and end in the fill, the warm start may certify the
    optimum: a higher total score.) scores (..., N, E): leading dimensions are independent
    problems solved together, each with its unbatched solution.
    """
    *batch, num_items, num_experts = scores.shape
    if num_experts == 1:
        return scores.new_zeros(scores.shape[:-1], dtype=torch.long)
    flat = scores.reshape(-1, num_items, num_experts)
    if num_experts >= WARM_START_EXPERTS and num_items >= WARM_START_ITEMS:
        prices = _smoothed_prices(flat, capacity)
        expert, solved = _sweep_prices(flat, capacity, prices, min(WARM_SWEEPS, max_sweeps), fill=False)
        if not bool(solved.all()):  # unsolved (ties, slow convergence): as from zero prices
            rest = ~solved
            expert[rest] = _sweep_prices(flat[rest], capacity, None, max_sweeps)[0]
        return expert.view(*batch, num_items)
    return _sweep_prices(flat, capacity, None, max_sweeps)[0].view(*batch, num_items)


# The warm start pays from here (benchmarks/results/balanced_assignment.md): below, the sweeps
# from zero prices converge in a few sweeps and the Newton steps cost more than they save.
WARM_START_EXPERTS = 16
WARM_START_ITEMS = 2048
WARM_SWEEPS = 15  # good warm prices certify at once or in a few sweeps; else start over from zero


def _sweep_prices(scores: torch.Tensor, capacity: torch.Tensor, prices, max_sweeps: int, fill: bool = True):
    """scores (P, N, E), capacity (E,), prices (P, E) or None (zero) -> expert (P, N), solved (P,).

    Gauss-Seidel coordinate descent on the dual: in turn, each expert's price is set so that
    exactly its capacity of items prefers it. A problem balanced with no ties is solved (its
    first choices are the unique optimum); whatever is left after max_sweeps is settled by
    _fill_by_preference (solved False; with fill=False their experts are left undefined).
    Deterministic: no randomness, stable sorts.
    """
    num_problems, num_items, num_experts = scores.shape
    slots = capacity.tolist()
    # expert-major (P, E, N): a max over experts is then an elementwise max of contiguous rows
    # (amax: no indices), ~10x faster on CPU than reducing the short last dimension of (N, E)
    scores_t = scores.transpose(-1, -2).contiguous()
    adjusted = scores_t.clone() if prices is None else scores_t - prices.unsqueeze(-1)  # s - p
    expert = torch.empty(num_problems, num_items, dtype=torch.long, device=scores.device)
    solved = torch.zeros(num_problems, dtype=torch.bool, device=scores.device)
    problems = torch.arange(num_problems, device=scores.device)  # the problems still swept
    for sweep in range(max_sweeps + 1):
        if sweep or prices is not None:  # (warm prices may already be the optimum's)
            balanced = _balanced(adjusted, capacity, expert_dim=-2)  # (P',)
            # a balanced problem's answer is its first choices (argmax over a contiguous last
            # dimension: several times faster than over dim -2)
            if problems.numel() == num_problems and bool(balanced.all()):
                return adjusted.transpose(-1, -2).contiguous().argmax(-1), balanced
            if bool(balanced.any()):
                # a balanced problem is a fixed point of the sweeps: its answer is final, and the
                # others go on without it (fewer problems per sweep, same answers)
                expert[problems[balanced]] = adjusted[balanced].transpose(-1, -2).contiguous().argmax(-1)
                solved[problems[balanced]] = True
                rest = ~balanced
                if not bool(rest.any()):
                    return expert, solved
                problems, scores_t, adjusted = problems[rest], scores_t[rest], adjusted[rest]
        if sweep == max_sweeps:
            break
        # one row view per expert, written in place (out=): the sweep is latency-bound, so
        # every op saved per expert counts
        for e, (score_row, adjusted_row) in enumerate(zip(scores_t.unbind(1), adjusted.unbind(1))):
            adjusted_row.fill_(float("-inf"))  # hide e: the max is then the best alternative
            gain = score_row - adjusted.amax(-2)  # highest price at which item i still prefers e
            torch.sub(score_row, _clearing_price(gain, slots[e]), out=adjusted_row)
    if fill:
        expert[problems] = torch.stack([_fill_by_preference(a.t(), capacity) for a in adjusted])
    return expert, solved


# the smoothing temperatures, relative to the scores' spread: a quarter decade apart from 0.1 to
# 1e-6, one Newton step each (benchmarks/results/balanced_assignment.md: fewer, coarser steps
# leave prices that the sweeps must finish; a later start lets the damped steps crawl)
TEMPERATURES = tuple(10 ** (-k / 4) for k in range(4, 25))


def _smoothed_prices(scores: torch.Tensor, capacity: torch.Tensor, temperatures=TEMPERATURES) -> torch.Tensor:
    """scores (P, N, E), capacity (E,) -> prices (P, E) near the assignment's dual optimum.

    The dual, min_p sum_i max_e (s[i, e] - p[e]) + sum_e capacity[e] p[e], is convex in only E
    variables but piecewise linear; with the max smoothed to t * logsumexp(. / t) it is smooth,
    with gradient capacity - sum_i softmax_i and Hessian (diag(sum_i P_i) - P^T P) / t, so a few
    Newton steps (E x E solves) minimise it, from prices at each expert's mean score. Lowering t
    (relative to the scores' spread) brings the prices to the piecewise-linear minimum; the
    sweeps then certify (or finish) them. From t = 1e-3 on, the steps stop once every problem
    is certified (_certified).
    """
    num_problems, num_items, num_experts = scores.shape
    spread = scores.std().clamp_min(1e-12)
    # start from each expert's mean score: a router that prefers some experts for every token
    # (common early in training) needs prices beyond what the damped steps below can travel
    prices = scores.mean(1)
    prices = prices - prices.mean(-1, keepdim=True)  # (P, E)
    eye = torch.eye(num_experts, dtype=scores.dtype, device=scores.device)
    for relative in temperatures:
        t = relative * spread
        probs = torch.softmax((scores - prices.unsqueeze(1)) / t, dim=-1)  # (P, N, E)
        load = probs.sum(1)  # (P, E)
        # (the Hessian is singular along equal prices: a small ridge, and the step centred)
        hessian = (torch.diag_embed(load) - probs.transpose(1, 2) @ probs) / t + eye * (1e-6 * num_items / t)
        step = torch.linalg.solve(hessian, (capacity - load).unsqueeze(-1)).squeeze(-1)
        # damped: no overshoot far from the minimum
        step = (step - step.mean(-1, keepdim=True)).clamp(-4 * t, 4 * t)
        prices = prices - step
        if relative <= 1e-3 and bool(_certified(scores, prices, capacity).all()):
            break
    if not bool(torch.isfinite(prices).all()):
        return torch.zeros_like(prices)
    return prices


def _certified(scores: torch.Tensor, prices: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """scores (P, N, E), prices (P, E) -> (P,): every expert is the first choice of exactly its
    capacity of items under s - p, with no item tied (a tie counts for each expert it ties)."""
    return _balanced(scores - prices.unsqueeze(1), capacity, expert_dim=-1)


def _balanced(adjusted: torch.Tensor, capacity: torch.Tensor, expert_dim: int) -> torch.Tensor:
    """adjusted scores s - p of P problems, experts along expert_dim (-1: (P, N, E); -2: (P, E, N))
    -> (P,): each expert is the first choice of exactly capacity[e] items. An item tied between
    experts counts for each, so a problem with a tie at the top never passes."""
    first = adjusted == adjusted.amax(expert_dim, keepdim=True)
    item_dim = -2 if expert_dim == -1 else -1
    return (first.sum(item_dim) == capacity).all(-1)


def _clearing_price(gain: torch.Tensor, slots: int) -> torch.Tensor:
    """gain (..., N) -> (..., 1): a price at which exactly `slots` items have a higher gain
    (midway between two gains)."""
    if slots == 0:
        return gain.amax(-1, keepdim=True) + 1
    if slots >= gain.size(-1):
        return gain.amin(-1, keepdim=True) - 1
    # the slots-th and (slots+1)-th largest gains: the two smallest of the top slots + 1
    # (an unsorted topk is about twice as fast as a sorted one)
    top = gain.topk(slots + 1, dim=-1, sorted=False).values
    return top.topk(2, dim=-1, largest=False).values.mean(-1, keepdim=True)


def _fill_by_preference(adjusted: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Exactly capacity[e] items per expert, each item as high on its preference list as possible.

    Round r: every unplaced item asks for its r-th choice; an expert with k free slots
    takes the k askers that would lose the most by falling to their next choice. An item
    turned away only by full experts cannot remain unplaced (slots = items), so E rounds
    place everyone; with converged prices round 0 places all.
    """
    num_items, num_experts = adjusted.shape
    ranked, choices = adjusted.sort(dim=1, descending=True, stable=True)
    regret = ranked - torch.cat([ranked[:, 1:], ranked[:, -1:]], 1)  # loss of dropping to the next choice
    expert = torch.full((num_items,), -1, dtype=torch.long, device=adjusted.device)
    free = capacity.clone()
    for r in range(num_experts):
        asking = (expert < 0).nonzero().squeeze(1)
        if asking.numel() == 0:
            break
        choice = choices[asking, r]
        by_regret = torch.argsort(regret[asking, r], descending=True, stable=True)
        order = by_regret[torch.argsort(choice[by_regret], stable=True)]  # grouped by expert, largest regret first
        counts = torch.bincount(choice, minlength=num_experts)
        rank = torch.arange(order.numel(), device=adjusted.device) - (torch.cumsum(counts, 0) - counts)[choice[order]]
        taken = order[rank < free[choice[order]]]
        expert[asking[taken]] = choice[taken]
        free -= torch.bincount(choice[taken], minlength=num_experts)
    return expert
