"""The torch balanced-assignment solver: exact balance, optimal (or libbase-level) score, determinism."""
import numpy as np
import pytest
import torch

from fairseq_smlp.moe.balanced_assignment import _capacities, _fill_by_preference, balanced_assignment


def total_score(scores, expert):
    return scores.gather(1, expert.unsqueeze(1)).sum().item()


def optimal_assignment(scores):
    """Exact optimum: scipy's Hungarian solver on the matrix with every expert's column
    repeated once per slot (N x N: small N only)."""
    from scipy.optimize import linear_sum_assignment

    num_items, num_experts = scores.shape
    capacity = _capacities(num_items, num_experts, "cpu").tolist()
    columns = np.array([e for e in range(num_experts) for _ in range(capacity[e])], dtype=np.int64)
    rows, cols = linear_sum_assignment(scores.double().numpy()[:, columns], maximize=True)
    expert = torch.empty(num_items, dtype=torch.long)
    expert[torch.as_tensor(rows)] = torch.as_tensor(columns[cols], dtype=torch.long)
    return expert


CASES = [(512, 4, 1.0), (512, 4, 10.0), (510, 4, 1.0), (600, 8, 3.0), (257, 2, 5.0), (480, 16, 1.0), (7, 4, 1.0), (3, 4, 1.0)]


@pytest.mark.parametrize("num_items,num_experts,scale", CASES)
def test_balance_is_exact_and_score_is_optimal(num_items, num_experts, scale):
    g = torch.Generator().manual_seed(num_items * num_experts)
    # a per-item offset, as in real router scores, changes nothing about the optimum
    scores = torch.randn(num_items, num_experts, generator=g) * scale + torch.randn(num_items, 1, generator=g)
    expert = balanced_assignment(scores)
    counts = torch.bincount(expert, minlength=num_experts)
    assert torch.equal(counts, _capacities(num_items, num_experts, "cpu"))
    assert counts.max() - counts.min() <= 1
    best = total_score(scores, optimal_assignment(scores))
    assert total_score(scores, expert) >= best - 1e-3 * abs(best) - 1e-4


@pytest.mark.parametrize("num_items,num_experts,scale", [(2048, 4, 1.0), (2048, 4, 10.0), (1024, 16, 3.0), (1000, 8, 0.05)])
def test_score_at_least_libbase(num_items, num_experts, scale):
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(num_items, num_experts, generator=g) * scale
    ours, theirs = balanced_assignment(scores, "torch"), balanced_assignment(scores, "libbase")
    assert torch.equal(torch.bincount(ours, minlength=num_experts), torch.bincount(theirs, minlength=num_experts))
    assert total_score(scores, ours) >= total_score(scores, theirs) * (1 - 1e-6)


def test_ties_and_identical_items_still_balance_exactly():
    scores = torch.zeros(64, 4)  # every item indifferent
    assert torch.bincount(balanced_assignment(scores), minlength=4).tolist() == [16] * 4
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(40, 1)  # all want expert 0
    assert torch.bincount(balanced_assignment(scores), minlength=4).tolist() == [10] * 4


def test_deterministic():
    scores = torch.randn(999, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(balanced_assignment(scores), balanced_assignment(scores.clone()))


def test_fill_places_everyone_even_with_bad_prices():
    """The repair pass alone (prices far off) still gives every expert its exact share."""
    scores = torch.randn(100, 4, generator=torch.Generator().manual_seed(5))
    scores[:, 0] += 5  # unadjusted: everyone's first choice is expert 0
    expert = _fill_by_preference(scores, _capacities(100, 4, "cpu"))
    assert torch.bincount(expert, minlength=4).tolist() == [25] * 4


def test_unknown_solver_names_the_flag():
    with pytest.raises(ValueError, match="--balanced-assignment"):
        balanced_assignment(torch.randn(8, 2), "hungarian")


def test_solver_flag_reaches_the_routers():
    from conftest import build_tiny_smlp

    model = build_tiny_smlp(smoe_routing="partial", partial_prefix_ratio=0.25, balanced_assignment="libbase")
    solvers = {m.solver for m in model.modules() if hasattr(m, "solver")}
    assert solvers == {"libbase"}
    assert {m.solver for m in build_tiny_smlp().modules() if hasattr(m, "solver")} == {"torch"}


def test_batched_problems_equal_one_at_a_time(solver="torch"):
    """The partial-prediction router solves all sequences at once: same as one by one."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(6, 40, 4, generator=g)
    scores[2] = 0.0  # one all-tie problem goes through the fill; the others converge
    batched = balanced_assignment(scores, solver)
    assert torch.equal(batched, torch.stack([balanced_assignment(s, solver) for s in scores]))
    assert (torch.stack([torch.bincount(b, minlength=4) for b in batched]) == 10).all()
