"""The fast MoE paths equal the plain implementations they replaced
(tests/moe_reference.py): outputs, gradients and routing decisions, in fp32 to 1e-6."""
import pytest
import torch

import moe_reference as reference
from fairseq_smlp.moe.dispatch import dispatch_to_experts, group_by_expert
from fairseq_smlp.moe.experts import ExpertFFN


def assert_close_fp32(actual, expected):
    """Equal to fp32 rounding: 1e-6, relative to the tensor's scale (a fused multiply-add or a
    different blocking of a matmul moves the last bits, and cancellation makes that large
    relative to a small element)."""
    scale = expected.abs().max().item() if expected.is_floating_point() and expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * max(1.0, scale))


pytestmark = pytest.mark.usefixtures("one_thread")


def random_experts(num_experts, hidden=8, ffn=16, pre_norm=True, seed=0):
    torch.manual_seed(seed)
    experts = ExpertFFN(num_experts, hidden, ffn, pre_norm=pre_norm)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    return experts


def outputs_and_grads(fn, x, weight, experts):
    """fn(x, weight) -> out; returns out and the gradients of x, weight and every expert parameter."""
    experts.zero_grad()
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_() if weight is not None else None
    out = fn(x, weight)
    out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin())
    grads = [x.grad] + ([weight.grad] if weight is not None else []) + [p.grad.clone() for p in experts.parameters()]
    return [out.detach()] + grads


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert_close_fp32(a, b)


def routing_case(kind, num_tokens, num_experts, seed=0):
    """expert_index (N, k) of the kinds the routers produce."""
    g = torch.Generator().manual_seed(seed)
    if kind == "balanced":  # tMoE training: a permutation, N/E per expert
        return (torch.randperm(num_tokens, generator=g) % num_experts).unsqueeze(1)
    if kind == "uneven":  # HASH, greedy tMoE: every token kept, loads differ (an expert may get none)
        return torch.randint(max(1, num_experts - 1), (num_tokens, 1), generator=g)
    if kind == "dropped":  # Switch over capacity
        index = torch.randint(num_experts, (num_tokens, 1), generator=g)
        return index.masked_fill(torch.rand(num_tokens, 1, generator=g) < 0.3, -1)
    if kind == "top2":  # GShard: two distinct experts, some assignments dropped, a token with none
        first = torch.randint(num_experts, (num_tokens,), generator=g)
        second = (first + 1 + torch.randint(num_experts - 1, (num_tokens,), generator=g)) % num_experts
        index = torch.stack([first, second], 1)
        index = index.masked_fill(torch.rand(num_tokens, 2, generator=g) < 0.25, -1)
        index[0] = -1
        return index
    raise ValueError(kind)


DISPATCH_CASES = [(kind, e) for kind in ("balanced", "uneven", "dropped", "top2") for e in (1, 3, 4) if not (kind == "top2" and e < 2)]


@pytest.mark.parametrize("kind, num_experts", DISPATCH_CASES)  # top-2 needs two experts
@pytest.mark.parametrize("pre_norm", [True, False])
def test_dispatch_equals_reference(kind, pre_norm, num_experts):
    num_tokens = 24
    experts = random_experts(num_experts, pre_norm=pre_norm)
    index = routing_case(kind, num_tokens, num_experts)
    x = torch.randn(num_tokens, 8)
    weight = torch.rand(num_tokens, index.size(1))
    fast = outputs_and_grads(lambda x, w: dispatch_to_experts(x, index, w, experts), x, weight, experts)
    plain = outputs_and_grads(lambda x, w: reference.dispatch_to_experts(x, index, w, experts), x, weight, experts)
    assert_all_close(fast, plain)


@pytest.mark.parametrize("kind", ["balanced", "uneven"])
def test_dispatch_without_weight_is_weight_one(kind):
    """weight=None (HASH) gives what weight 1 gives, gradients included."""
    experts = random_experts(4, pre_norm=False)
    index = routing_case(kind, 20, 4)
    x = torch.randn(20, 8)
    fast = outputs_and_grads(lambda x, w: dispatch_to_experts(x, index, None, experts), x, None, experts)
    plain = outputs_and_grads(lambda x, w: reference.dispatch_to_experts(x, index, torch.ones(20, 1), experts), x, None, experts)
    assert_all_close(fast, plain)


def test_grouping_is_stable_and_puts_dropped_last():
    flat = torch.tensor([2, -1, 0, 2, 1, 0, -1, 2])
    order, position, counts, num_kept = group_by_expert(flat, 3)
    assert order.tolist() == [2, 5, 4, 0, 3, 7, 1, 6]
    assert counts.tolist() == [2, 1, 3] and num_kept == 6
    assert torch.equal(order[position], torch.arange(8))


# ------------------------------------------------------------------ Switch and GShard routers
def gate_router(cls, num_experts, policy=None, z_loss=0.0, capacity_factor=1.0, seed=0):
    torch.manual_seed(seed)
    kwargs = {"second_expert_policy": policy} if policy else {}
    router = cls(8, num_experts, capacity_factor, 0.0, z_loss_weight=z_loss, **kwargs).train()
    torch.nn.init.normal_(router.gate.weight)  # spread logits: uneven loads, drops
    return router


def route_and_grads(route, router, x):
    """route(router, x) -> (index, weight, aux, (counts, dropped, total)) and the gradients of x
    and the gate from sum(weight * r) + aux."""
    router.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # the same noise for sampling / random policies
    index, weight, aux, (counts, dropped, total) = route(router, x)
    (weight * torch.rand(weight.shape, generator=torch.Generator().manual_seed(2))).sum().add(aux).backward()
    return index, [weight.detach(), aux.detach(), counts, dropped, total, x.grad, router.gate.weight.grad.clone()]


def fast_route(router, x):
    index, weight, stats = router(x)
    return index, weight, stats.aux_loss, (stats.expert_counts, stats.dropped, stats.total)


@pytest.mark.parametrize("num_experts", [2, 3, 8])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.25, 0.0])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_top1_router_equals_reference(num_experts, capacity_factor, z_loss):
    from fairseq_smlp.moe.router import Top1Router

    router = gate_router(Top1Router, num_experts, z_loss=z_loss, capacity_factor=capacity_factor)
    x = torch.randn(64, 8)
    index, fast = route_and_grads(fast_route, router, x)
    ref_index, plain = route_and_grads(reference.top1_route, router, x)
    assert torch.equal(index, ref_index)
    assert_all_close(fast, plain)


@pytest.mark.parametrize("num_experts", [2, 3, 8])
@pytest.mark.parametrize("policy", ["sampling", "all", "random"])
@pytest.mark.parametrize("train", [True, False])
def test_top2_router_equals_reference(num_experts, policy, train):
    from fairseq_smlp.moe.router import Top2Router

    router = gate_router(Top2Router, num_experts, policy=policy, z_loss=0.01, capacity_factor=1.0).train(train)
    x = torch.randn(64, 8)
    index, fast = route_and_grads(fast_route, router, x)
    ref_index, plain = route_and_grads(reference.top2_route, router, x)
    assert torch.equal(index, ref_index)
    assert_all_close(fast, plain)


# ------------------------------------------------------------------ balanced assignment
@pytest.mark.parametrize("shape,scale", [
    ((512, 4), 1.0), ((600, 8), 3.0), ((480, 16), 1.0), ((257, 2), 5.0), ((7, 4), 1.0),
    ((6, 64, 4), 1.0), ((5, 48, 8), 2.0), ((3, 40, 16), 1.0), ((4, 9, 3), 0.1),
])
def test_price_assignment_equals_reference(shape, scale):
    """Same assignment as sweeping every problem together to the end: a problem set aside
    once balanced is a fixed point, and the unsorted topk picks the same two gains."""
    from fairseq_smlp.moe.balanced_assignment import _capacities, _price_assignment

    torch.manual_seed(0)
    scores = torch.randn(*shape) * scale
    capacity = _capacities(shape[-2], shape[-1], "cpu")
    assert torch.equal(_price_assignment(scores, capacity), reference.price_assignment(scores, capacity))


def test_price_assignment_with_ties_falls_back_like_reference():
    """Identical items straddling a clearing price never balance: those problems go to the
    fill after max_sweeps, exactly as before, while the others are solved on the way."""
    from fairseq_smlp.moe.balanced_assignment import _capacities, _price_assignment

    torch.manual_seed(0)
    scores = torch.randn(4, 12, 3)
    scores[1] = torch.tensor([1.0, 0.0, 0.0]).repeat(12, 1)  # every item identical
    scores[3, :6] = scores[3, 0]
    capacity = _capacities(12, 3, "cpu")
    assert torch.equal(_price_assignment(scores, capacity, max_sweeps=5), reference.price_assignment(scores, capacity, max_sweeps=5))


@pytest.mark.parametrize("shape,scale", [((2048, 16), 1.0), ((2048, 32), 3.0), ((4096, 64), 0.3), ((2, 2048, 16), 1.0)])
def test_warm_started_prices_reach_the_reference_assignment(shape, scale):
    """Many items and experts: the sweeps start from the smoothed dual's prices, and must end on
    the very assignment the sweeps from zero prices reach (the certified optimum is unique)."""
    from fairseq_smlp.moe import balanced_assignment as solver

    assert shape[-2] >= solver.WARM_START_ITEMS and shape[-1] >= solver.WARM_START_EXPERTS  # the warm path runs
    torch.manual_seed(0)
    scores = torch.randn(*shape[:-1], 32) @ (torch.randn(32, shape[-1]) * scale)  # a linear router's scores
    capacity = solver._capacities(shape[-2], shape[-1], "cpu")
    flat = scores.reshape(-1, *shape[-2:])
    prices = solver._smoothed_prices(flat, capacity)
    assert not torch.equal(prices, torch.zeros_like(prices))
    expected = reference.price_assignment(scores, capacity)
    assert torch.equal(solver._price_assignment(scores, capacity), expected)


def test_warm_start_certifies_where_the_sweeps_from_zero_prices_end_in_the_fill():
    """2,048 tokens over 128 experts: 50 sweeps from zero prices never balance (the greedy fill
    ends them); the smoothed dual's prices certify the optimum, a strictly higher total score."""
    from fairseq_smlp.moe import balanced_assignment as solver

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2048, 64, generator=g) @ (torch.randn(64, 128, generator=g) * 0.3)
    capacity = solver._capacities(2048, 128, "cpu")
    flat = scores.unsqueeze(0)
    cold, solved = solver._sweep_prices(flat, capacity, None, 50)
    assert not bool(solved.any())
    prices = solver._smoothed_prices(flat, capacity)
    assert bool(solver._certified(flat, prices, capacity).all())
    warm = solver.balanced_assignment(scores)
    assert torch.equal(warm, (scores - prices).argmax(-1))  # the certified first choices
    assert torch.equal(torch.bincount(warm, minlength=128), capacity)

    def total(expert):
        return scores.gather(1, expert.view(-1, 1)).sum().item()

    assert total(warm) > total(cold[0])


def test_warm_start_certifies_a_router_that_prefers_some_experts_for_every_token():
    """Early in training a router's scores differ more between experts than between tokens:
    starting from each expert's mean score, the smoothed dual's prices still certify the
    optimum (a start at zero prices leaves them short), and the assignment is the reference's."""
    from fairseq_smlp.moe import balanced_assignment as solver

    g = torch.Generator().manual_seed(0)
    scores = 0.03 * torch.randn(2048, 16, generator=g) + torch.linspace(0, 0.3, 16)  # expert biases >> spread
    capacity = solver._capacities(2048, 16, "cpu")
    flat = scores.unsqueeze(0)
    assert bool(solver._certified(flat, solver._smoothed_prices(flat, capacity), capacity).all())
    assert torch.equal(solver.balanced_assignment(scores), reference.price_assignment(scores, capacity))


def test_warm_start_that_cannot_certify_falls_back_to_zero_prices():
    """Identical items straddle every clearing price: no prices certify them, so those problems
    are solved again from zero prices and filled exactly as the reference fills them."""
    from fairseq_smlp.moe import balanced_assignment as solver

    torch.manual_seed(0)
    scores = torch.randn(3, 2048, 16)
    scores[1] = torch.randn(16).repeat(2048, 1)  # every item identical
    capacity = solver._capacities(2048, 16, "cpu")
    _, solved = solver._sweep_prices(scores, capacity, solver._smoothed_prices(scores, capacity), max_sweeps=50)
    assert solved.tolist() == [True, False, True]
    got = solver._price_assignment(scores, capacity)
    assert torch.equal(got, reference.price_assignment(scores, capacity))
    assert (torch.stack([torch.bincount(g, minlength=16) for g in got]) == 128).all()


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("kind", ["balanced", "uneven", "top2"])
def test_dispatch_under_bf16_autocast_matches_reference(pre_norm, kind):
    """Under CPU bf16 autocast the fast dispatch (rows cast before grouping when the experts
    start with a matmul; output left in bf16) matches the previous path to bf16 precision,
    gradients included."""
    experts = random_experts(4, hidden=16, ffn=32, pre_norm=pre_norm)
    with torch.no_grad():
        for p in experts.parameters():
            p.mul_(0.3)
    index = routing_case(kind, 40, 4)
    x = torch.randn(40, 16)
    weight = torch.rand(40, index.size(1))

    def under_autocast(fn):
        def run(x, w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x, index, w, experts).float()
        return run

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not experts.can_run_grouped(x.bfloat16())  # uneven loads: padded slots in bf16
    fast = outputs_and_grads(under_autocast(dispatch_to_experts), x, weight, experts)
    plain = outputs_and_grads(under_autocast(reference.dispatch_to_experts), x, weight, experts)
    for a, b in zip(fast, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0.03, atol=0.03 * max(1.0, b.abs().max().item()))


# ------------------------------------------------------------------ --moe-compile
def _reset_compile_warning():
    from fairseq_smlp.moe import compile as moe_compile

    moe_compile._WARNED["fallback"] = False


@pytest.mark.skipif(not __import__("fairseq_smlp.moe.compile", fromlist=["x"]).compiler_available(), reason="no C++ compiler for torch.compile")
def test_compiled_hot_paths_equal_eager():
    """--moe-compile: the whole feed-forward MoE layer (router, dispatch, experts, combine) and the
    partial sMoE mixing give eager's outputs and gradients to fp32 rounding (tiny graphs: tens of seconds)."""
    from conftest import build_tiny_smlp
    from fairseq_smlp.moe.compile import CompiledOrEager, compile_moe

    model = build_tiny_smlp(smoe_routing="partial", decoder_layers=2).train()
    tokens = torch.randint(4, 40, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits_and_grads():
        model.zero_grad()
        out = model(tokens)[0]
        out.float().pow(2).mean().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager = logits_and_grads()
    assert compile_moe(model) == 2  # the tMoE layer whole (not its experts again) and the partial sMoE of block 1
    assert_all_close(logits_and_grads(), eager)
    block = model.decoder.layers[1]
    assert block.feature_moe.forward.compiled is not None and block.token_mixing.gate.mix_routed.compiled is not None
    assert not isinstance(block.feature_moe.experts.forward, CompiledOrEager)


def test_moe_compile_without_compiler_runs_eager_with_one_log_line(monkeypatch, caplog):
    from conftest import build_tiny_smlp
    from fairseq_smlp.moe import compile as moe_compile

    _reset_compile_warning()
    monkeypatch.setattr(moe_compile, "compiler_available", lambda: False)
    tokens = torch.randint(4, 40, (2, 24), generator=torch.Generator().manual_seed(0))
    eager = build_tiny_smlp().eval()(tokens)[0]
    with caplog.at_level("WARNING"):
        model = build_tiny_smlp(moe_compile=True).eval()
        out = model(tokens)[0]
    assert torch.equal(out, eager)
    warnings = [r for r in caplog.records if "--moe-compile" in r.getMessage()]
    assert len(warnings) == 1 and "running eager" in warnings[0].getMessage()


def test_compile_failure_at_first_call_falls_back_to_eager(monkeypatch, caplog):
    from fairseq_smlp.moe import compile as moe_compile

    _reset_compile_warning()

    def failing_compile(fn):
        def run(*args, **kwargs):
            raise RuntimeError("compiler exploded")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    wrapped = moe_compile.CompiledOrEager(lambda x: x * 2, "double")
    with caplog.at_level("WARNING"):
        assert torch.equal(wrapped(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(wrapped(torch.ones(3)), torch.full((3,), 2.0))
    assert wrapped.compiled is None
    assert sum("compiler exploded" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_checks_still_catch_every_non_finite_value(bad):
    """The checks look at the sum first (one reduction): any NaN/inf makes it non-finite."""
    from fairseq_smlp.moe.balanced_assignment import balanced_assignment
    from fairseq_smlp.moe.router import check_finite

    scores = torch.randn(16, 4)
    scores[5, 2] = bad
    with pytest.raises(FloatingPointError, match="non-finite router logits in here"):
        check_finite(scores, "here")
    with pytest.raises(FloatingPointError, match="non-finite routing scores"):
        balanced_assignment(scores)


def test_finite_checks_accept_large_finite_values_whose_sum_overflows():
    from fairseq_smlp.moe.balanced_assignment import balanced_assignment
    from fairseq_smlp.moe.router import check_finite

    scores = torch.full((8, 2), 3e38)
    check_finite(scores, "here")
    assert torch.bincount(balanced_assignment(scores), minlength=2).tolist() == [4, 4]
