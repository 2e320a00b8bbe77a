"""Static-shape dispatch: the exact-balance path and the capacity-padded path give
the previous implementation's outputs and gradients (tests/moe_reference.py and the "grouped"
path), for every router, forward and backward, fp32 to 1e-5 and under CPU bf16 autocast."""
import pytest
import torch

import moe_reference as reference
from fairseq_smlp.moe import dispatch
from fairseq_smlp.moe.base_experts import BaseExpertsLayer
from fairseq_smlp.moe.dispatch import dispatch_path, dispatch_to_experts
from fairseq_smlp.moe.experts import ExpertFFN
from fairseq_smlp.moe.router import random_hash_table
from fairseq_smlp.moe.feed_forward_moe import FeedForwardMoE, MoEArgs

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(1.0, scale))


def random_experts(num_experts, hidden=8, ffn=16, pre_norm=True, seed=0):
    torch.manual_seed(seed)
    experts = ExpertFFN(num_experts, hidden, ffn, pre_norm=pre_norm)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_().mul_(0.5)
    return experts


def routing_case(kind, num_tokens, num_experts, seed=0):
    """expert_index (N, k) as the routers produce it."""
    g = torch.Generator().manual_seed(seed)
    if kind == "balanced":  # Base training / channel assignment: exactly N/E per expert
        return (torch.randperm(num_tokens, generator=g) % num_experts).unsqueeze(1)
    if kind == "uneven":  # HASH, greedy Base: all kept, loads differ, an expert may get none
        return torch.randint(max(1, num_experts - 1), (num_tokens, 1), generator=g)
    if kind == "dropped":  # Switch over capacity
        index = torch.randint(num_experts, (num_tokens, 1), generator=g)
        return index.masked_fill(torch.rand(num_tokens, 1, generator=g) < 0.3, -1)
    if kind == "top2":  # GShard: distinct experts, dropped assignments, a token with none
        first = torch.randint(num_experts, (num_tokens,), generator=g)
        second = (first + 1 + torch.randint(num_experts - 1, (num_tokens,), generator=g)) % num_experts
        index = torch.stack([first, second], 1).masked_fill(torch.rand(num_tokens, 2, generator=g) < 0.25, -1)
        index[0] = -1
        return index
    if kind == "all_dropped":
        return torch.full((num_tokens, 1), -1)
    raise ValueError(kind)


def outputs_and_grads(fn, x, weight, experts):
    experts.zero_grad()
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_() if weight is not None else None
    out = fn(x, weight)
    out.float().backward(torch.arange(out.numel(), dtype=torch.float32).view_as(out).sin())
    grads = [x.grad] + ([weight.grad] if weight is not None else [])
    grads += [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in experts.parameters()]
    return [out.detach().float()] + grads


CASES = [
    (kind, e, n)
    for kind in ("balanced", "uneven", "dropped", "top2", "all_dropped")
    for e in (1, 2, 4, 16)
    for n in (32, 37)
    if not (kind == "top2" and e < 2) and not (kind == "balanced" and n % e)
]


@pytest.mark.parametrize("kind, num_experts, num_tokens", CASES)
@pytest.mark.parametrize("pre_norm", [True, False])
def test_static_dispatch_equals_reference_and_grouped(kind, num_experts, num_tokens, pre_norm):
    experts = random_experts(num_experts, pre_norm=pre_norm)
    index = routing_case(kind, num_tokens, num_experts)
    x, weight = torch.randn(num_tokens, 8), torch.rand(num_tokens, index.size(1))
    static = outputs_and_grads(lambda x, w: dispatch_to_experts(x, index, w, experts, path="static"), x, weight, experts)
    grouped = outputs_and_grads(lambda x, w: dispatch_to_experts(x, index, w, experts, path="grouped"), x, weight, experts)
    for a, b in zip(static, grouped):
        assert_close(a, b)
    if kind != "all_dropped":
        plain = outputs_and_grads(lambda x, w: reference.dispatch_to_experts(x, index, w, experts), x, weight, experts)
        for a, b in zip(static, plain):
            assert_close(a, b)


@pytest.mark.parametrize("kind", ["balanced", "uneven", "dropped", "top2"])
def test_static_dispatch_without_weight_is_weight_one(kind):
    experts = random_experts(4)
    index = routing_case(kind, 24, 4)
    x = torch.randn(24, 8)
    ones = outputs_and_grads(lambda x, w: dispatch_to_experts(x, index, torch.ones(index.shape), experts, path="static"), x, None, experts)
    none = outputs_and_grads(lambda x, w: dispatch_to_experts(x, index, None, experts, path="static"), x, None, experts)
    for a, b in zip(ones, none):
        assert_close(a, b)


def test_each_path_is_taken_where_it_should(monkeypatch):
    taken = []
    for name in ("dispatch_balanced", "dispatch_padded", "dispatch_grouped"):
        original = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _f=original, _n=name: taken.append(_n) or _f(*a))
    experts = random_experts(4)
    x = torch.randn(32, 8)
    with dispatch_path("static"):
        for kind in ("balanced", "uneven", "dropped", "top2"):
            index = routing_case(kind, 32, 4)
            dispatch_to_experts(x, index, torch.rand(index.shape), experts)
    with dispatch_path("grouped"):
        dispatch_to_experts(x, routing_case("balanced", 32, 4), torch.rand(32, 1), experts)
    assert taken == ["dispatch_balanced"] + ["dispatch_padded"] * 3 + ["dispatch_grouped"]
    taken.clear()
    with dispatch_path("static"):
        dispatch_to_experts(x, routing_case("uneven", 32, 4), torch.rand(32, 1), experts)
    assert taken == ["dispatch_padded"]


def test_auto_path_takes_grouped_mm_for_uneven_fp32_and_padded_under_autocast(monkeypatch):
    """"auto" (the default): exact balance -> balanced; uneven -> grouped_mm where the experts
    can run it (fp32), else padded (bf16 autocast)."""
    taken = []
    for name in ("dispatch_balanced", "dispatch_padded", "dispatch_grouped"):
        original = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _f=original, _n=name: taken.append(_n) or _f(*a))
    experts = random_experts(4, hidden=16, ffn=32)
    x = torch.randn(32, 16)
    with dispatch_path("auto"):
        dispatch_to_experts(x, routing_case("balanced", 32, 4), torch.rand(32, 1), experts)
        dispatch_to_experts(x, routing_case("dropped", 32, 4), torch.rand(32, 1), experts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dispatch_to_experts(x, routing_case("dropped", 32, 4), torch.rand(32, 1), experts)
    grouped = "dispatch_grouped" if experts.can_run_grouped(x) else "dispatch_padded"
    assert taken == ["dispatch_balanced", grouped, "dispatch_padded"]
    with pytest.raises(ValueError, match="dispatch path"):
        dispatch.set_dispatch_path("fast")


def test_padded_slots_are_first_come_first_served():
    """slot = e * C + rank of the assignment among e's (assignment order); dropped: E * C."""
    key = torch.tensor([2, 0, 2, 3, 0, 2])  # E = 2 experts... key 3 = dropped with E = 3
    counts = torch.bincount(key, minlength=4)
    slot = dispatch.slot_positions(key, counts, capacity=3)
    assert slot.tolist() == [6, 0, 7, 9, 1, 8]


ROUTER_KINDS = ["base", "top1", "top2", "hash", "hash_capped"]


def build_moe(router, num_experts, hidden=16, ffn=32, seed=0):
    torch.manual_seed(seed)
    kwargs = {}
    if router.startswith("hash"):
        kwargs["hash_table"] = random_hash_table(50, num_experts)
    if router in ("top1", "top2"):
        kwargs.update(expert_norm=False, activation="relu", train_capacity_factor=1.0, eval_capacity_factor=1.0)
    moe = FeedForwardMoE(MoEArgs(router=router.split("_")[0], num_experts=num_experts, embed_dim=hidden, ffn_dim=ffn, **kwargs))
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_().mul_(0.3)
    return moe


def moe_outputs_and_grads(moe, x, path, token_ids=None, dtype=None):
    """Route once (the same decisions for both paths), then dispatch on `path`."""
    moe.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(3)  # GShard's sampled second expert
    if token_ids is not None:
        moe.router.set_token_ids(token_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        with dispatch_path(path):
            out, _ = moe(x)
    out.float().backward(torch.arange(out.numel(), dtype=torch.float32).view_as(out).cos())
    return [out.detach().float(), x.grad] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in moe.parameters()]


@pytest.mark.parametrize("router", ROUTER_KINDS)
@pytest.mark.parametrize("num_experts", [1, 2, 4, 16])
@pytest.mark.parametrize("train", [True, False])
def test_every_router_static_equals_grouped(router, num_experts, train):
    if router == "top2" and num_experts < 2:
        pytest.skip("top-2 needs two experts")
    moe = build_moe(router, num_experts).train(train)
    num_tokens = 64 if router == "base" and train else 61  # Base training needs E | N
    x = torch.randn(num_tokens, 16) * 2
    token_ids = torch.randint(50, (num_tokens,), generator=torch.Generator().manual_seed(5)) if router.startswith("hash") else None
    if router == "hash_capped":  # a load cap on HASH: what the router leaves, the dispatch drops
        table = moe.router.route

        def capped(z, _route=table):
            index, weight, stats = _route(z)
            return index.masked_fill(torch.arange(index.size(0)).unsqueeze(1) % 5 == 0, -1), weight, stats

        moe.router.route = capped
    static = moe_outputs_and_grads(moe, x, "static", token_ids)
    grouped = moe_outputs_and_grads(moe, x, "grouped", token_ids)
    auto = moe_outputs_and_grads(moe, x, "auto", token_ids)
    for a, b, c in zip(static, grouped, auto):
        assert_close(a, b)
        assert_close(c, b)
    bf16_static = moe_outputs_and_grads(moe, x, "static", token_ids, torch.bfloat16)
    bf16_grouped = moe_outputs_and_grads(moe, x, "grouped", token_ids, torch.bfloat16)
    for a, b in zip(bf16_static, bf16_grouped):
        torch.testing.assert_close(a, b, rtol=0.03, atol=0.03 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("train", [True, False])
def test_base_layer_static_equals_grouped(train):
    torch.manual_seed(0)
    layer = BaseExpertsLayer(16, 32, num_experts=4, sublayers=2).train(train)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_().mul_(0.3)
    x = torch.randn(8, 4, 16)

    def run(path):
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        with dispatch_path(path):
            out, _, _ = layer(xg)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin())
        return [out.detach(), xg.grad] + [p.grad.clone() for p in layer.parameters()]

    for a, b, c in zip(run("static"), run("grouped"), run("auto")):
        assert_close(a, b)
        assert_close(c, b)


@pytest.mark.parametrize("kind", ["balanced", "uneven", "dropped", "top2"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_static_dispatch_under_bf16_autocast_matches_reference(kind, pre_norm):
    experts = random_experts(4, hidden=16, ffn=32, pre_norm=pre_norm)
    index = routing_case(kind, 40, 4)
    x, weight = torch.randn(40, 16), torch.rand(40, index.size(1))

    def under_autocast(fn, **kw):
        def run(x, w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x, index, w, experts, **kw)
        return run

    fast = outputs_and_grads(under_autocast(dispatch_to_experts, path="static"), x, weight, experts)
    plain = outputs_and_grads(under_autocast(reference.dispatch_to_experts), x, weight, experts)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0.03, atol=0.03 * max(1.0, b.abs().max().item()))
