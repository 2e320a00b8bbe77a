"""Routers: causality of every router in sMLP's tMoE and in the Transformer MoE, incremental
decoding, balance, training == evaluation routing where a router claims it, and top1_biased
(auxiliary-loss-free balancing, Wang et al. 2024).

Causality: perturbing the tokens at positions > t of ANY sequence of a batch changes no
output at positions <= t of any sequence, in training and in evaluation, with one sequence
and with several, and with a capacity small enough that experts drop tokens (so that the
order in which slots fill matters). The paper's `base` routing is excepted in training: its
balanced assignment looks at the whole batch by design (docs/routers.md, "Causality"), which
test_base_training_assignment_looks_ahead shows.
"""
import math

import pytest
import torch

from fairseq_smlp.models.factory import build_model, offline_task
from fairseq_smlp.moe.router import (
    BatchLayout, CausalBalancedRouter, LearnedGateRouter, Router, SinkhornRouter, Top1BiasedRouter, batch_layout,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, BATCH = 40, 16, 4
TOL = 1e-5  # float noise: experts run as batches of other sizes when other tokens change
TRANSFORMER = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
               "--dropout", "0", "--attention-dropout", "0"]
# smlp_lm_tiny's 4 + 4 experts, narrower; one sparse block of two; spatial weights of real size
SMLP = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "16",
        "--decoder-layers", "2", "--dropout", "0", "--spatial-init-eps", "1.0"]


def _built(arch, args):
    """A tiny model parsed and built as fairseq-train does (models/factory), with expert output
    weights of real size so that a leak shows."""
    torch.manual_seed(0)
    model, _ = build_model(arch, args, seq_len=SEQ, vocab=VOCAB, device="cpu", task=offline_task(VOCAB))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("fc2_weight", "ff2.weight")):
                p.normal_(0, 0.3)
    return model


def _baseline(arch, *extra):
    return _built(arch, [*TRANSFORMER, *extra])


def _smlp(router, *extra):
    return _built("smlp_lm_tiny", [*SMLP, "--tmoe-router", router, *extra])


def _switch(*extra):
    return _baseline("switch_lm_tiny", "--moe-experts", "4", *extra)


FAMILIES = {
    "smlp_top1": lambda: _smlp("top1"),
    "smlp_top1_global": lambda: _smlp("top1", "--tmoe-balance-scope", "global-batch"),
    "smlp_top1_dropless": lambda: _smlp("top1", "--tmoe-train-capacity-factor", "0"),
    "smlp_top1_biased": lambda: _smlp("top1_biased"),
    "smlp_sinkhorn": lambda: _smlp("sinkhorn"),
    "smlp_causal_balanced": lambda: _smlp("causal_balanced"),
    "smlp_base": lambda: _smlp("base"),  # evaluation only
    "switch": lambda: _switch(),
    "switch_global": lambda: _switch("--moe-balance-scope", "global-batch"),
    "switch_dropless": lambda: _switch("--moe-train-capacity-factor", "0"),
    "gshard": lambda: _baseline("gshard_lm_tiny", "--moe-experts", "4", "--moe-second-expert-policy", "all"),
    "hash": lambda: _baseline("hash_lm_tiny", "--moe-experts", "4"),
    "switch_biased": lambda: _switch("--moe-router", "top1_biased"),
    "switch_sinkhorn": lambda: _switch("--moe-router", "sinkhorn"),
    "switch_causal_balanced": lambda: _switch("--moe-router", "causal_balanced"),
}
SAME_ROUTING = ["smlp_top1_dropless", "smlp_top1_biased", "smlp_causal_balanced", "switch_dropless", "switch_biased", "switch_causal_balanced"]


def _tight_capacity(model, factor=0.5):
    """A capacity small enough that experts drop tokens, in training and in evaluation."""
    routers = [m for m in model.modules() if isinstance(m, LearnedGateRouter)]
    for router in routers:
        router.train_capacity_factor = router.eval_capacity_factor = factor
    return routers


def _tokens(seed=0, batch=BATCH):
    return torch.randint(4, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _outputs(model, x):
    with torch.no_grad():
        torch.manual_seed(1)
        return model(x)[0]


def _max_leak(model, training: bool, batch: int = BATCH) -> float:
    """Largest change of an output at positions <= t when positions > t change, over t."""
    model.train(training)
    x = _tokens(batch=batch)
    reference = _outputs(model, x)
    worst = 0.0
    for t in (2, 7, 11):
        perturbed = x.clone()
        perturbed[:, t + 1 :] = _tokens(seed=t + 1, batch=batch)[:, t + 1 :]
        out = _outputs(model, perturbed)
        worst = max(worst, (out[:, : t + 1] - reference[:, : t + 1]).abs().max().item())
    return worst


def _dropped(model, training: bool) -> float:
    model.train(training)
    with torch.no_grad():
        torch.manual_seed(1)
        stats = model(_tokens())[1]["moe_stats"]
    return sum(float(s.dropped) for s in stats if s.dropped is not None)


@pytest.mark.parametrize("batch", [1, BATCH], ids=["one_sequence", "several"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_position_sees_a_later_position_of_any_sequence(family, training, batch):
    if family == "smlp_base" and training:
        pytest.skip("base: the paper's balanced assignment couples the training batch by design")
    torch.manual_seed(0)
    model = FAMILIES[family]()
    if _tight_capacity(model) and batch > 1:
        assert _dropped(model, training) > 0, "the capacity must be tight enough to drop tokens"
    assert _max_leak(model, training, batch) < TOL


def test_base_training_assignment_looks_ahead():
    """The documented exception: Base Layers' balanced assignment in training sees the whole batch."""
    torch.manual_seed(0)
    assert _max_leak(_smlp("base"), training=True) > 0.1


def test_gshard_queue_looks_ahead_in_training():
    """Why the default top-2 queue is in token order: GShard's own order (--moe-second-expert-queue
    gshard, kept for comparison) queues every first choice before any second choice and lets a
    later position take an earlier position's second slot wherever a capacity drops tokens."""
    torch.manual_seed(0)
    model = _baseline("gshard_lm_tiny", "--moe-experts", "4", "--moe-second-expert-policy", "all",
                      "--moe-second-expert-queue", "gshard")
    _tight_capacity(model)
    assert _max_leak(model, training=True) > 0.1


def test_sequence_major_capacity_would_leak():
    """The check above has teeth: sMLP's top1 tMoE filling its capacity sequence by sequence
    (the order it had before) lets an early position see later positions of earlier sequences."""
    from fairseq_smlp.moe.feed_forward_moe import FeedForwardMoE

    torch.manual_seed(0)
    model = _smlp("top1")
    _tight_capacity(model)
    for module in model.modules():
        if isinstance(module, FeedForwardMoE):
            module.forward = FeedForwardMoE.forward.__get__(module)  # flatten (B, T) as it comes: sequence-major
    assert _max_leak(model, training=True) > 0.1


def _decoder_output(model, x, incremental: bool):
    with torch.no_grad():
        if not incremental:
            return model.decoder(x)[0]
        state = {}
        return torch.cat([model.decoder(x[:, : t + 1], incremental_state=state)[0][:, -1:] for t in range(x.size(1))], dim=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_incremental_decoding_equals_the_full_forward(family):
    """Evaluation with the default evaluation capacity (none): position by position, carrying
    fairseq's incremental state, gives the full forward's outputs."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = _tokens()
    full = _decoder_output(model, x, incremental=False)
    assert torch.allclose(_decoder_output(model, x, incremental=True), full, atol=1e-5)


def _first_choices(model, x, training: bool):
    """{router name: (N,) first choice of every token} of one forward."""
    choices, handles = {}, []
    for router in (m for m in model.modules() if isinstance(m, Router) and m.remembers_choices):
        handles.append(router.register_forward_hook(lambda m, i, out: choices.__setitem__(m.name, out[0][:, 0].clone())))
    model.train(training)
    _outputs(model, x)
    for handle in handles:
        handle.remove()
    return choices


@pytest.mark.parametrize("family", SAME_ROUTING)
def test_training_and_evaluation_route_alike(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    x = _tokens()
    train, evaluation = _first_choices(model, x, True), _first_choices(model, x, False)
    assert train and train.keys() == evaluation.keys()
    for name in train:
        assert torch.equal(train[name], evaluation[name]), f"{name}: training and evaluation routing differ"


@pytest.mark.parametrize("family", ["smlp_sinkhorn", "switch_sinkhorn"])
def test_sinkhorn_routes_greedily_in_evaluation(family):
    """S-BASE's documented difference: balanced top-1 in training, greedy top-1 in evaluation."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    routers = [m for m in model.modules() if isinstance(m, SinkhornRouter)]
    for router in routers:
        with torch.no_grad():
            router.gate.weight.normal_(0, 1.0)  # confident, skewed logits
    x = _tokens()
    train, evaluation = _first_choices(model, x, True), _first_choices(model, x, False)
    assert any(not torch.equal(train[r.name], evaluation[r.name]) for r in routers)


# ------------------------------------------------------------------ balance
def _skewed_logits(tokens=64, experts=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, experts, generator=generator) + torch.tensor([3.0, 1.0, 0.0, 0.0])  # expert 0 wanted most


def _router_on_logits(router_class, logits, sequences, **kwargs):
    """A router whose gate reproduces `logits` from one-hot inputs."""
    tokens, experts = logits.shape
    router = router_class(tokens, experts, **kwargs)
    with torch.no_grad():
        router.gate.weight.copy_(logits.t())
    with batch_layout([router], BatchLayout(sequences)):
        return router, router(torch.eye(tokens))


@pytest.mark.parametrize("sequences", [1, 4])
def test_causal_balanced_keeps_every_prefix_within_capacity(sequences):
    logits = _skewed_logits()
    _, (index, weight, stats) = _router_on_logits(CausalBalancedRouter, logits, sequences)
    expert = index.squeeze(1)
    assert (expert >= 0).all() and stats.dropped.item() == 0
    experts = logits.size(1)
    for t in range(logits.size(0) // sequences):
        n = (t + 1) * sequences
        assert torch.bincount(expert[:n], minlength=experts).max().item() <= math.ceil(n / experts)
    # each token took its best expert among those with room when its turn came
    counts = [0] * experts
    for i, e in enumerate(expert.tolist()):
        room = math.ceil((i // sequences + 1) * sequences / experts)
        best = max((c for c in range(experts) if counts[c] < room), key=lambda c: logits[i, c].item())
        assert e == best
        counts[e] += 1
    assert torch.allclose(weight.squeeze(1), torch.sigmoid(logits.gather(1, index).squeeze(1)))


def test_causal_balanced_decodes_step_by_step_from_its_state():
    logits = _skewed_logits(tokens=24)
    router, (full, _, _) = _router_on_logits(CausalBalancedRouter, logits, sequences=3)
    router.eval()
    state, steps = {}, []
    for t in range(8):
        with batch_layout([router], BatchLayout(3, start=t, incremental_state=state)):
            steps.append(router(torch.eye(24)[3 * t : 3 * t + 3])[0])
    assert torch.equal(torch.cat(steps), full)
    with pytest.raises(RuntimeError, match="position by position"):
        with batch_layout([router], BatchLayout(3, start=5, incremental_state={})):
            router(torch.eye(24)[:3])


def test_sinkhorn_balances_better_than_greedy_and_stays_causal():
    logits = _skewed_logits(tokens=256)
    router, (index, weight, stats) = _router_on_logits(SinkhornRouter, logits, sequences=4)
    greedy = torch.bincount(logits.argmax(1), minlength=4).float()
    assert stats.expert_counts.max().item() < 0.5 * greedy.max().item()
    assert stats.dropped.item() == 0
    assert torch.allclose(weight.squeeze(1), torch.sigmoid(logits.gather(1, index).squeeze(1)))  # the unbiased gate
    # a prefix of positions routes alike whatever follows it
    _, (prefix_index, _, _) = _router_on_logits(SinkhornRouter, logits[:40], sequences=4)
    assert torch.equal(prefix_index, index[:40])


@pytest.mark.parametrize("family", ["switch", "gshard", "smlp_top1"])
def test_capacity_routers_keep_loads_within_capacity(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    routers = _tight_capacity(model)
    model.train()
    with torch.no_grad():
        stats = model(_tokens())[1]["moe_stats"]
    tokens = BATCH * SEQ
    for router, s in zip(routers, [s for s in stats if s.aux_loss is not None]):
        assert s.expert_counts.max().item() <= router.capacity(tokens)


# ------------------------------------------------------------------ global-batch balance
def _gate_router(scope, experts=4):
    from fairseq_smlp.moe.router import Top1Router

    torch.manual_seed(0)
    return Top1Router(8, experts, 0, 0, balance_scope=scope).train()


def test_global_batch_balance_counts_every_micro_batch_of_the_update(monkeypatch):
    from fairseq_smlp.moe import router as router_module
    from fairseq_smlp.moe.router import switch_aux_loss

    monkeypatch.setattr(router_module, "all_reduce_counts", lambda counts: counts * 2)  # two identical workers
    router, local = _gate_router("global-batch"), _gate_router("micro-batch")
    first, second = torch.randn(32, 8), torch.randn(16, 8) + torch.tensor([2.0] + [0.0] * 7)
    aux = [router(first)[2].aux_loss, router(second)[2].aux_loss]
    assert aux[0].item() == pytest.approx(local(first)[2].aux_loss.item())  # one micro-batch: the same share f
    probs = torch.softmax(second @ router.gate.weight.t(), dim=1)
    counts = torch.bincount(torch.cat([(first @ router.gate.weight.t()).argmax(1), probs.argmax(1)]), minlength=4)
    assert aux[1].item() == pytest.approx(switch_aux_loss(probs, probs.argmax(1), counts).item())  # f over both
    with torch.no_grad():
        router.gate.weight.add_(1e-3)  # an optimizer update: the next micro-batch starts a new count
    probs = torch.softmax(second @ router.gate.weight.t(), dim=1)
    assert router(second)[2].aux_loss.item() == pytest.approx(switch_aux_loss(probs, probs.argmax(1)).item())
    router.eval()
    assert router(second)[2].aux_loss.item() == pytest.approx(local.eval()(second)[2].aux_loss.item())


def test_balance_scope_is_checked():
    with pytest.raises(ValueError, match="balance-scope"):
        _gate_router("per-update")


@pytest.mark.parametrize("router", ["sinkhorn", "causal_balanced", "top1_biased"])
def test_hf_export_refuses_routers_it_cannot_run(router):
    from omegaconf import OmegaConf

    from fairseq_smlp.export_hf.convert import ExportError, check_transformer_options

    with pytest.raises(ExportError, match=router):
        check_transformer_options(OmegaConf.create({"moe_router": router}))


# ------------------------------------------------------------------ top1_biased
def _skewed_router(rate=0.01):
    torch.manual_seed(0)
    router = Top1BiasedRouter(8, 4, bias_update_rate=rate)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 5.0  # expert 0 wins every token with x[:, 0] > 0
    return router


def test_biased_router_bias_moves_toward_balance_over_updates():
    router = _skewed_router()
    x = torch.randn(256, 8)
    x[:, 0] = x[:, 0].abs() + 0.1  # every token prefers expert 0
    optimizer = torch.optim.SGD(router.parameters(), lr=1e-3)
    loads = []
    for _ in range(60):
        router.train()
        index, weight, stats = router(x)
        loads.append(stats.expert_counts.max().item() / x.size(0))
        optimizer.zero_grad()
        weight.sum().backward()  # the gate learns only through the unbiased score of its choice
        optimizer.step()  # the next training forward applies this update's loads to the bias
    bias = router.expert_bias
    assert bias[0] < 0 and (bias[1:] > 0).all()  # the overloaded expert is pushed down, the others up
    assert loads[0] == 1.0 and loads[-1] < 0.6
    assert stats.bias_range.item() == pytest.approx((bias.max() - bias.min()).item())


def test_biased_router_counts_the_whole_update():
    """Several forwards (micro-batches) before one optimizer step: one bias step of `rate`,
    from the loads summed over all of them; no step at all without an optimizer update."""
    router = _skewed_router(rate=0.5).train()
    x = torch.randn(32, 8)
    x[:, 0] = x[:, 0].abs() + 0.1
    for _ in range(3):
        router(x)
    assert torch.equal(router.expert_bias, torch.zeros(4))  # no update yet
    with torch.no_grad():
        router.gate.weight[1, 1] += 1e-3  # what an optimizer step does
    router(x)
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    router.eval()(x)
    with torch.no_grad():
        router.gate.weight[1, 1] += 1e-3
    router.eval()(x)  # evaluation neither counts nor updates
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]


def test_biased_router_counts_updates_when_its_gate_stops_moving():
    """A saturated sigmoid gate gets zero gradient and stops moving; the bias must still step
    after each update. Under fairseq the update count does it: the model hands it to every
    module (BaseFairseqModel.set_num_updates) before each training forward."""
    model = _smlp("top1_biased").train()
    routers = [m for m in model.modules() if isinstance(m, Top1BiasedRouter)]
    for router in routers:
        router.bias_update_rate = 0.5
    expected, steps = [torch.zeros(4) for _ in routers], 0
    for update in range(1, 4):
        loads = [r._pending.clone() if r._pending is not None else None for r in routers]
        model.set_num_updates(update)  # what fairseq's task.train_step does; no weight changes
        with torch.no_grad():
            model(_tokens(seed=update))
        for i, load in enumerate(loads):
            if load is not None:  # the loads of the previous update, applied at this update's first forward
                expected[i] += 0.5 * torch.sign(load.mean() - load)
                steps += 1
            assert torch.equal(routers[i].expert_bias, expected[i])
    assert steps == 2 * len(routers)  # updates 2 and 3 each applied the previous update's loads
    model.set_num_updates(3)  # another micro-batch of the same update: no step
    with torch.no_grad():
        model(_tokens())
    assert all(torch.equal(e, r.expert_bias) for e, r in zip(expected, routers))


def test_biased_router_z_loss_keeps_routing_and_penalises_large_logits():
    """--tmoe-router-z-loss: the biased router's aux loss is w * mean logsumexp(logits)^2 in
    training (no balance term); routing and gate values are those of the router without it."""
    from fairseq_smlp.moe.router import router_z_loss

    torch.manual_seed(0)
    plain, with_z = Top1BiasedRouter(8, 4), Top1BiasedRouter(8, 4, z_loss_weight=0.1)
    with_z.load_state_dict(plain.state_dict())
    x = torch.randn(64, 8) * 3
    index, weight, stats = with_z.train()(x)
    ref_index, ref_weight, ref_stats = plain.train()(x)
    assert torch.equal(index, ref_index) and torch.equal(weight, ref_weight) and ref_stats.aux_loss is None
    logits = x @ with_z.gate.weight.t()
    assert stats.aux_loss.item() == pytest.approx(0.1 * torch.logsumexp(logits, 1).pow(2).mean().item(), rel=1e-5)
    stats.aux_loss.backward()
    assert with_z.gate.weight.grad.abs().sum() > 0  # pulls the logits toward zero
    assert router_z_loss(torch.zeros(4, 3)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    with torch.no_grad():
        assert with_z.eval()(x)[2].aux_loss is None  # evaluation: no loss


def test_z_loss_flags_reach_the_biased_router():
    smlp = _smlp("top1_biased", "--tmoe-router-z-loss", "0.1")
    switch = _switch("--moe-router", "top1_biased", "--moe-router-z-loss", "0.2")
    assert {m.z_loss_weight for m in smlp.modules() if isinstance(m, Top1BiasedRouter)} == {0.1}
    assert {m.z_loss_weight for m in switch.modules() if isinstance(m, Top1BiasedRouter)} == {0.2}


def test_biased_router_routes_alike_in_training_and_evaluation():
    torch.manual_seed(0)
    router = Top1BiasedRouter(8, 4)
    router.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.0, 0.05]))
    x = torch.randn(500, 8)
    train_index, train_weight, train_stats = router.train()(x)
    eval_index, eval_weight, _ = router.eval()(x)
    assert torch.equal(train_index, eval_index)  # zero mismatch
    assert torch.equal(train_weight, eval_weight)
    assert train_stats.dropped.item() == 0 and (train_index >= 0).all()
    # the gate value is the unbiased score of the chosen expert
    scores = torch.sigmoid(x @ router.gate.weight.t())
    assert torch.allclose(train_weight.squeeze(1), scores.gather(1, train_index).squeeze(1))
    assert not torch.equal(train_index.squeeze(1), scores.argmax(1))  # the bias did steer selection


def test_biased_router_bias_is_in_the_checkpoint():
    model = _smlp("top1_biased")
    biases = {k: v for k, v in model.state_dict().items() if k.endswith("router.expert_bias")}
    assert biases and all(v.shape == (4,) for v in biases.values())
    assert not any(n.endswith("expert_bias") for n, _ in model.named_parameters())
    key = next(iter(biases))
    state = model.state_dict()
    state[key] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    fresh = _smlp("top1_biased")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state_dict()[key], state[key])


def test_biased_router_incremental_decoding_equals_full_forward():
    model = _smlp("top1_biased")
    for module in model.modules():
        if isinstance(module, Top1BiasedRouter):
            module.expert_bias.copy_(torch.tensor([0.2, -0.3, 0.1, 0.0]))
    model.eval()
    x = _tokens()
    with torch.no_grad():
        full = model.decoder(x)[0]
        state = {}
        steps = [model.decoder(x[:, : t + 1], incremental_state=state)[0] for t in range(SEQ)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_bias_range_reaches_the_log():
    from fairseq_smlp.criterions.moe_cross_entropy import routing_log

    model = _smlp("top1_biased")
    for i, module in enumerate(m for m in model.modules() if isinstance(m, Top1BiasedRouter)):
        module.expert_bias.copy_(torch.tensor([0.25, -0.25, 0.0, 0.0]))
    with torch.no_grad():
        stats = model(_tokens())[1]["moe_stats"]
    log = routing_log(stats)
    assert log["moe_bias_range"] == pytest.approx(0.5)
    assert log["moe_dropped"] == 0


def test_bias_update_rate_flag_is_checked():
    from fairseq_smlp.validation import FlagError, check_value

    check_value("--tmoe-bias-update-rate", 0.001)
    check_value("--moe-bias-update-rate", 0.0)
    with pytest.raises(FlagError):
        check_value("--tmoe-bias-update-rate", -0.1)
