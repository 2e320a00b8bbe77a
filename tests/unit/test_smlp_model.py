"""Behaviour of the sMLP model: causality, incremental decoding, equivalences, routing balance."""
import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_smlp

T = 24
CONFIGS = {
    "dense_gmlp": dict(sparse_every=0),
    "deterministic_gate": dict(),
    "deterministic_all": dict(smoe_chunk="all"),
    "partial_assignment": dict(smoe_routing="partial", partial_prefix_ratio=0.25),
    "partial_aux_loss": dict(smoe_routing="partial", partial_prefix_ratio=0.25, partial_balance="aux_loss"),
}


def tokens(bsz=3, length=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 40, (bsz, length), generator=g)


def first_checked_position(model):
    """Positions < score_from fed the partial-prediction router and carry no guarantee."""
    return model.decoder.score_from


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_in_eval_mode(name):
    model = build_tiny_smlp(**CONFIGS[name]).eval()
    x = tokens()
    start = first_checked_position(model)
    with torch.no_grad():
        base = model(x)[0]
        for t in range(start, T - 1):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randint(4, 40, changed[:, t + 1 :].shape)
            out = model(changed)[0]
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6), f"position <= {t} saw the future"
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :]), "perturbation had no effect"


class ReplayAssignments:
    """Records the balanced assignments of one forward and replays them in the next."""

    def __init__(self, real):
        self.real, self.saved, self.replay = real, [], False

    def __call__(self, scores, *args):
        if self.replay:
            return self.saved.pop(0)
        out = self.real(scores, *args)
        self.saved.append(out)
        return out


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_in_training_mode_given_the_assignment(name, monkeypatch):
    """Balanced assignment couples the tokens of a batch (documented exception): with the
    assignment held fixed, no information reaches an earlier position."""
    import fairseq_smlp.moe.router as token_routers

    model = build_tiny_smlp(**CONFIGS[name]).train()
    replay = ReplayAssignments(token_routers.balanced_assignment)
    monkeypatch.setattr(token_routers, "balanced_assignment", replay)
    x = tokens()
    t = T // 2
    base = model(x)[0]
    changed = x.clone()
    changed[:, t + 1 :] = torch.randint(4, 40, changed[:, t + 1 :].shape)
    replay.replay = True
    out = model(changed)[0]
    assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)


def test_partial_prefix_positions_do_see_the_prefix():
    """The documented limit of partial prediction: positions inside the prefix depend on
    later prefix tokens (through the routing), which is why they are never scored."""
    model = build_tiny_smlp(**CONFIGS["partial_assignment"]).eval()
    prefix = model.decoder.score_from
    assert prefix == 6  # ceil(0.25 * 24)
    x = tokens()
    changed = x.clone()
    changed[:, prefix - 1] = (changed[:, prefix - 1] + 1) % 36 + 4
    with torch.no_grad():
        a, b = model(x)[0], model(changed)[0]
    assert not torch.allclose(a[:, 0], b[:, 0])


@pytest.mark.parametrize("name", CONFIGS)
def test_incremental_decoding_equals_full_forward(name):
    model = build_tiny_smlp(**CONFIGS[name]).eval()
    x = tokens(bsz=2)
    start = first_checked_position(model)
    state = {}
    with torch.no_grad():
        full = model(x)[0]
        steps = [model.decoder(x[:, : t + 1], incremental_state=state)[0] for t in range(T)]
    incremental = torch.cat(steps, dim=1)
    assert incremental.shape == full.shape
    assert torch.allclose(incremental[:, start:], full[:, start:], atol=1e-5)


def naive_gmlp_block(block, x):
    """gMLP block written out position by position, from the block's own weights."""
    z = F.gelu(block.proj_in(block.norm(x)))
    value, gate_in = z.chunk(2, dim=-1)
    u = block.gate.norm(gate_in)
    w, b = block.gate.mixing.weight, block.gate.mixing.bias  # (E, Tmax, Tmax), (E, Tmax)
    experts = w.size(0)
    chunk = u.size(-1) // experts
    gate = torch.zeros_like(u)
    for t in range(x.size(1)):
        for e in range(experts):
            cols = slice(e * chunk, (e + 1) * chunk)
            gate[:, t, cols] = b[e, t] + sum(w[e, t, s] * u[:, s, cols] for s in range(t + 1))
    return x + block.proj_out(value * gate)


@pytest.mark.parametrize("experts", [1, 4])
def test_deterministic_smoe_equals_per_chunk_spatial_gating(experts):
    """Deterministic sMoE = expert e owns channel chunk e; one expert = the dense gMLP block."""
    model = build_tiny_smlp(smoe_experts=experts, decoder_layers=2).eval()
    block = model.decoder.layers[1].token_mixing
    assert block.gate.num_experts == experts
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        out, _ = block(x)
        assert torch.allclose(out, naive_gmlp_block(block, x), atol=1e-5)
    if experts == 1:
        dense = model.decoder.layers[0]
        dense.load_state_dict(block.state_dict())
        with torch.no_grad():
            assert torch.allclose(dense(x)[0], out, atol=1e-6)


def test_balanced_assignment_gives_every_expert_the_same_tokens():
    model = build_tiny_smlp().train()
    x = tokens(bsz=4)  # 96 tokens, 4 experts
    _, extra = model(x)
    feature_stats = [s for s in extra["moe_stats"] if "feature_moe" in s.layer]
    assert feature_stats
    for s in feature_stats:
        assert s.expert_counts.tolist() == [24.0] * 4


def test_balanced_assignment_with_tokens_not_divisible_by_experts():
    from fairseq_smlp.moe.balanced_assignment import balanced_assignment

    scores = torch.randn(10, 4)
    expert = balanced_assignment(scores)
    assert sorted(torch.bincount(expert, minlength=4).tolist()) == [2, 2, 3, 3]


def test_greedy_routing_in_eval_is_top1():
    model = build_tiny_smlp().eval()
    router = model.decoder.layers[1].feature_moe.router
    x = torch.randn(30, 16)
    expert, weight, _ = router(x)
    scores = x @ router.centroids.t()
    assert torch.equal(expert.squeeze(1), scores.argmax(-1))
    assert torch.allclose(weight.squeeze(1), torch.sigmoid(scores.max(-1).values))


@pytest.mark.parametrize("balance", ["assignment", "aux_loss"])
def test_partial_router_gives_each_expert_its_share_of_channels_per_sequence(balance):
    from fairseq_smlp.moe.router import PrefixChannelRouter

    torch.manual_seed(0)
    router = PrefixChannelRouter(max_positions=20, prefix_ratio=0.2, num_experts=4, balance=balance)
    z = torch.randn(5, 20, 32)
    z[:, :, :16] += 3.0  # make half the channels prefer the same experts, forcing spill-over
    order, weight, stats = router(z)
    for row in order:
        assert sorted(row.tolist()) == list(range(32))  # a permutation of the channels
    assert stats.expert_counts.tolist() == [40.0] * 4
    assert (stats.aux_loss is not None) == (balance == "aux_loss")
    assert ((weight > 0) & (weight <= 1)).all()


def test_first_choice_with_spill_keeps_the_most_confident():
    from fairseq_smlp.moe.router import _first_choice_with_spill

    # 4 channels, 2 experts (2 slots each); channels 0, 1, 2 prefer expert 0
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]]])
    assert _first_choice_with_spill(probs).tolist() == [[0, 1, 0, 1]]


def test_router_logits_and_moe_weights_stay_fp32_under_bf16_autocast():
    model = build_tiny_smlp().eval()
    router = model.decoder.layers[1].feature_moe.router
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weight, _ = router(torch.randn(8, 16))
        out = model(tokens())[0]
    assert weight.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_expert_parameters_are_marked():
    model = build_tiny_smlp()
    expert = {n for n, p in model.named_parameters() if getattr(p, "expert", False)}
    assert expert and all("feature_moe.experts" in n for n in expert)
    assert not any(getattr(p, "expert", False) for n, p in model.named_parameters() if "centroids" in n)


# ------------------------------------------------------------------ bad input
def test_sequence_longer_than_spatial_matrix_is_refused():
    model = build_tiny_smlp().eval()
    with pytest.raises(ValueError, match=r"--tokens-per-sample.*24"):
        model(tokens(length=T + 1))


def test_smoe_experts_must_divide_channels():
    with pytest.raises(ValueError, match=r"--smoe-experts 3 must divide the 16 channels"):
        build_tiny_smlp(smoe_experts=3)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_prefix_ratio_outside_open_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=r"--partial-prefix-ratio must be in \(0, 1\)"):
        build_tiny_smlp(smoe_routing="partial", partial_prefix_ratio=ratio)


def test_missing_libbase_is_reported(monkeypatch):
    import sys

    from fairseq_smlp.moe.balanced_assignment import balanced_assignment

    monkeypatch.setitem(sys.modules, "fairseq.libbase", None)
    monkeypatch.delattr("fairseq.libbase", raising=False)
    with pytest.raises(ImportError, match=r"fairseq.libbase.*--tmoe-experts"):
        balanced_assignment(torch.randn(8, 2), "libbase")


def test_partial_routing_needs_the_smlp_task():
    from types import SimpleNamespace

    from conftest import tiny_dictionary
    from fairseq_smlp.models.smlp_lm import SmlpConfig, SmlpLanguageModel

    d = tiny_dictionary()
    cfg = SmlpConfig(smoe_routing="partial", max_target_positions=24, tokens_per_sample=24)
    with pytest.raises(ValueError, match="--task smlp_language_modeling"):
        SmlpLanguageModel.build_model(cfg, SimpleNamespace(source_dictionary=d, target_dictionary=d))


def test_bad_sparse_layers_flag():
    with pytest.raises(ValueError, match="--sparse-layers"):
        build_tiny_smlp(sparse_layers="0,7")
