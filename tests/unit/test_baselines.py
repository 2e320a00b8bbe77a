"""Baselines of the sMLP comparison: Switch, GShard, HASH, Base Layers, dense Transformer
and dense gMLP, in one process: routers on hand-computed examples, causality of every family in
train and eval mode, incremental decoding, routing statistics. Side by side with
test_fair_baselines.py, which checks how each method starts its experts, Base Layers with E
experts in one process, and expert dropout. fairseq-train / fairseq-eval-lm end to end:
integration/test_baselines_commands.py."""
import math

import pytest
import torch

from conftest import tiny_dictionary

from fairseq_smlp.models.factory import build_model
from fairseq_smlp.moe.dispatch import dispatch_to_experts
from fairseq_smlp.moe.experts import ExpertFFN
from fairseq_smlp.moe.router import (
    HashRouter,
    Top1Router,
    Top2Router,
    balanced_hash_table,
    expert_capacity,
    random_hash_table,
    switch_aux_loss,
)
from fairseq_smlp.moe.feed_forward_moe import FeedForwardMoE, MoEArgs

VOCAB = 40
SEQ = 16
NO_DROPOUT = ["--dropout", "0.0"]
TRANSFORMER_NO_DROPOUT = NO_DROPOUT + ["--attention-dropout", "0.0"]
FAMILIES = {
    "switch": ("switch_lm_tiny", TRANSFORMER_NO_DROPOUT),
    "gshard": ("gshard_lm_tiny", TRANSFORMER_NO_DROPOUT + ["--moe-train-capacity-factor", "0"]),
    "hash": ("hash_lm_tiny", TRANSFORMER_NO_DROPOUT),
    "base": ("base_lm_tiny", TRANSFORMER_NO_DROPOUT),
    "transformer": ("transformer_lm_tiny", TRANSFORMER_NO_DROPOUT),
    "gmlp": ("gmlp_lm_tiny", NO_DROPOUT + ["--spatial-init-eps", "1.0"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch, args=(), seed=0):
    """A CPU model of `arch` built as fairseq-train builds it, zero-initialised output
    weights of experts made non-zero so that a leak through them would show."""
    dictionary = tiny_dictionary(VOCAB)
    for i in range(len(dictionary)):
        dictionary.count[i] = 1 + (i * 7919) % 97  # varied counts for the balanced hash
    task = type("Task", (), {"source_dictionary": dictionary, "target_dictionary": dictionary, "scores_partial_prediction": True})
    torch.manual_seed(seed)
    model, _ = build_model(arch, list(args), seq_len=SEQ, vocab=VOCAB, device="cpu", task=task)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("fc2_weight", "ff2.weight")):
                p.normal_(0, 0.3)
    return model


def tokens(seed=0, batch=2, length=SEQ):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, length), generator=g)


def logits(model, x, seed=0):
    torch.manual_seed(seed)  # GShard's second-expert sampling draws the same noise
    return model(x)[0]


# ---------------------------------------------------------------- capacity, routers
def test_capacity_formula():
    assert expert_capacity(10, 4, 1.25) == 4  # ceil(1.25 * ceil(10 / 4)) = ceil(3.75)
    assert expert_capacity(12, 4, 1.25) == 4  # 1.25 * 12 / 4 = 3.75
    assert expert_capacity(16, 4, 1.0) == 4
    assert expert_capacity(10, 4, 2.0) == 6  # GShard: 2 * ceil(S / E)
    assert expert_capacity(10, 4, 0) == 10  # no limit
    assert expert_capacity(10, 4, -1) == 10


def gate_router(cls, logit_rows, **kwargs):
    """A router whose logits are exactly the given rows (gate = identity, x = rows)."""
    x = torch.tensor(logit_rows, dtype=torch.float)
    router = cls(x.size(1), x.size(1), **kwargs)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(x.size(1)))
    return router, x


def test_top1_drops_overflow_in_token_order_and_counts_it():
    # first choices: 0, 0, 0, 1, 0; capacity = ceil(0.5 * ceil(5 / 3)) = 1
    rows = [[2.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0], [1.0, 0.5, 0]]
    router, x = gate_router(Top1Router, rows, train_capacity_factor=0.5, eval_capacity_factor=0)
    router.train()
    index, weight, stats = router(x)
    assert index.squeeze(1).tolist() == [0, -1, -1, 1, -1]
    probs = torch.softmax(x, -1)
    assert torch.allclose(weight.squeeze(1), torch.tensor([probs[0, 0], 0, 0, probs[3, 1], 0]))
    assert stats.dropped.item() == 3 and stats.total.item() == 5
    assert stats.expert_counts.tolist() == [1, 1, 0]
    # aux = E * sum_e f_e P_e with f = first-choice fractions (before dropping)
    f = torch.tensor([4, 1, 0]) / 5
    assert math.isclose(stats.aux_loss.item(), 3 * float((f * probs.mean(0)).sum()), rel_tol=1e-6)
    router.eval()  # eval capacity 0: nothing dropped
    index, _, stats = router(x)
    assert index.squeeze(1).tolist() == [0, 0, 0, 1, 0] and stats.dropped.item() == 0


def test_aux_loss_is_one_when_routing_is_uniform():
    probs = torch.full((8, 4), 0.25)
    assert math.isclose(switch_aux_loss(probs, torch.arange(8) % 4).item(), 1.0, rel_tol=1e-6)


def test_router_z_loss_adds_mean_squared_logsumexp():
    rows = [[2.0, 0.0], [0.0, 1.0]]
    plain, x = gate_router(Top1Router, rows, train_capacity_factor=0, eval_capacity_factor=0)
    with_z, _ = gate_router(Top1Router, rows, train_capacity_factor=0, eval_capacity_factor=0, z_loss_weight=0.1)
    z = torch.logsumexp(x, -1).pow(2).mean()
    assert torch.allclose(with_z(x)[2].aux_loss, plain(x)[2].aux_loss + 0.1 * z)


def test_top2_renormalises_over_kept_experts():
    rows = [[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]
    router, x = gate_router(Top2Router, rows, train_capacity_factor=0, eval_capacity_factor=0, second_expert_policy="all")
    index, weight, stats = router(x)
    probs = torch.softmax(x, -1)
    assert index.tolist() == [[0, 1], [2, 1]]
    for n, (a, b) in enumerate(index.tolist()):
        denom = probs[n, a] + probs[n, b]
        assert torch.allclose(weight[n], torch.stack([probs[n, a], probs[n, b]]) / denom)
    assert torch.allclose(weight.sum(1), torch.ones(2))
    assert stats.expert_counts.tolist() == [1, 2, 1] and stats.dropped.item() == 0


def test_top2_queue_is_token_order_by_default():
    # token 0: first 0, second 1; token 1: first 1, second 0. capacity 1: token 0 keeps both
    # experts, token 1 (a later position) gets none
    rows = [[2.0, 1.0, -5.0], [1.0, 2.0, -5.0]]
    router, x = gate_router(Top2Router, rows, train_capacity_factor=0.5, eval_capacity_factor=0, second_expert_policy="all")
    router.train()
    index, weight, stats = router(x)
    assert index.tolist() == [[0, 1], [-1, -1]]
    assert stats.dropped.item() == 1


def test_top2_gshard_queue_puts_first_choices_before_second_choices():
    # the same tokens with --moe-second-expert-queue gshard: token 1's first choice takes
    # expert 1 although token 0 comes first (GShard's order)
    rows = [[2.0, 1.0, -5.0], [1.0, 2.0, -5.0]]
    router, x = gate_router(Top2Router, rows, train_capacity_factor=0.5, eval_capacity_factor=0, second_expert_policy="all",
                            queue="gshard")
    router.train()
    index, weight, stats = router(x)  # capacity = ceil(0.5 * ceil(2 / 3)) = 1
    assert index.tolist() == [[0, -1], [1, -1]]
    assert torch.allclose(weight, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # renormalised: the kept expert gets 1
    assert stats.dropped.item() == 0  # every token kept at least one expert
    assert stats.expert_counts.tolist() == [1, 1, 0]


def test_top2_token_with_no_kept_expert_is_dropped():
    rows = [[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]]  # all: first 0, second 1
    router, x = gate_router(Top2Router, rows, train_capacity_factor=0.5, eval_capacity_factor=0, second_expert_policy="all")
    router.train()
    index, weight, stats = router(x)  # capacity = ceil(0.5 * ceil(3 / 2)) = 1
    # expert 0: token 0's first choice; expert 1: token 0's second (no first choice queued there)
    assert index.tolist() == [[0, 1], [-1, -1], [-1, -1]]
    g = torch.softmax(x[0], -1)
    assert torch.allclose(weight, torch.tensor([[g[0], g[1]], [0.0, 0.0], [0.0, 0.0]]))
    assert stats.dropped.item() == 2 and stats.total.item() == 3


@pytest.mark.parametrize("policy", ["sampling", "random"])
def test_top2_policies_only_act_in_training(policy):
    torch.manual_seed(0)
    router = Top2Router(8, 4, 0, 0, second_expert_policy=policy)
    x = torch.randn(64, 8)
    router.eval()
    runner_up = torch.softmax(router.score(x, router.gate.weight), -1).topk(2).indices
    assert torch.equal(router(x)[0], runner_up)
    router.train()
    index = router(x)[0]
    assert torch.equal(index[:, 0], runner_up[:, 0])
    assert (index[:, 1] != index[:, 0]).all()
    if policy == "random":  # some second experts are skipped, the rest are the runner-up
        assert (index[:, 1] == -1).any()
        kept = index[:, 1] >= 0
        assert torch.equal(index[kept, 1], runner_up[kept, 1])


def test_balanced_hash_table_by_greedy_bin_packing():
    # most frequent first, each to the least loaded expert (ties: lowest index)
    table = balanced_hash_table([10, 1, 1, 5, 3, 0], 2)
    assert table.tolist() == [0, 1, 1, 1, 1, 0]  # loads 10 and 10


def test_random_hash_table_is_fixed_by_its_seed():
    assert torch.equal(random_hash_table(100, 4, seed=3), random_hash_table(100, 4, seed=3))
    assert not torch.equal(random_hash_table(100, 4, seed=3), random_hash_table(100, 4, seed=4))


def test_hash_router_routes_by_token_id_and_needs_the_ids():
    router = HashRouter(torch.tensor([0, 1, 2, 0, 1]), 3)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="token ids"):
        router(x)
    router.set_token_ids(torch.tensor([3, 1, 4, 4]))
    index, weight, stats = router(x)
    assert index.squeeze(1).tolist() == [0, 1, 1, 1]
    assert torch.equal(weight, torch.ones(4, 1)) and stats.expert_counts.tolist() == [1, 3, 0]


def test_dropped_tokens_get_nothing_from_the_moe():
    torch.manual_seed(0)
    args = MoEArgs(router="top1", num_experts=2, embed_dim=8, ffn_dim=16, expert_norm=False, train_capacity_factor=0.5, eval_capacity_factor=0)
    moe = FeedForwardMoE(args).train()
    router = moe.router
    torch.nn.init.normal_(moe.experts.fc2_weight)
    x = torch.randn(1, 12, 8)
    out, _ = moe(x)
    index = router(x.reshape(-1, 8))[0].squeeze(1)
    assert (index == -1).any()
    assert torch.all(out.reshape(-1, 8)[index == -1] == 0)
    assert torch.all(out.reshape(-1, 8)[index >= 0].abs().sum(-1) > 0)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_grouped_experts_equal_padded_slots(pre_norm, monkeypatch):
    """Uneven loads run on exactly the routed rows (grouped_mm): same outputs and gradients
    as the padded (E, capacity, H) slots, an expert with no token included."""
    torch.manual_seed(0)
    experts = ExpertFFN(3, 8, 16, pre_norm=pre_norm)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(10, 8)
    assert experts.can_run_grouped(x)
    index = torch.tensor([[0], [2], [0], [0], [-1], [2], [0], [0], [2], [0]])  # expert 1: none, one dropped
    weight = torch.rand(10, 1)

    def outputs_and_grads():
        experts.zero_grad()
        xg = x.clone().requires_grad_()
        out = dispatch_to_experts(xg, index, weight, experts)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin())
        return [out.detach(), xg.grad] + [p.grad.clone() for p in experts.parameters()]

    grouped = outputs_and_grads()
    monkeypatch.setattr(ExpertFFN, "can_run_grouped", lambda self, x: False)
    padded = outputs_and_grads()
    for a, b in zip(grouped, padded):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [Top1Router, Top2Router])
def test_routing_stays_fp32_under_bf16_autocast(cls):
    router = cls(8, 4, 0, 0)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weight, stats = router(x.bfloat16())
    assert weight.dtype == torch.float32 and stats.aux_loss.dtype == torch.float32


def test_bad_expert_count_names_the_flag():
    with pytest.raises(ValueError, match="--moe-experts"):
        Top1Router(8, 0, 1.0, 0)
    with pytest.raises(ValueError, match="--moe-experts must be at least 2"):
        build("gshard_lm_tiny", ["--moe-experts", "1"])
    with pytest.raises(ValueError, match="--moe-second-expert-policy"):
        Top2Router(8, 4, 1.0, 0, second_expert_policy="best")


# ---------------------------------------------------------------- causality, decoding
def assert_causal(model, train: bool):
    model.train(train)
    x = tokens(0)
    with torch.set_grad_enabled(train):  # fairseq's BaseLayer reads training from requires_grad
        for t in (2, 9):
            other = x.clone()
            other[:, t + 1 :] = tokens(t + 1)[:, t + 1 :]
            a, b = logits(model, x), logits(model, other)
            assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5), f"position <= {t} changed by a later token"
            assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-3)  # the perturbation is seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_causal(family, train):
    arch, args = FAMILIES[family]
    if family == "base" and train:  # balanced assignment couples a batch's tokens: one expert here,
        args = args + ["--base-experts", "1"]  # E experts given the assignment: test_fair_baselines.py
    assert_causal(build(arch, args), train)


def test_switch_capacity_dropping_stays_causal_in_training():
    """Switch fills capacity in fairseq's time-major token order: a token only competes with
    tokens at earlier (or equal) positions, so dropping never depends on the future."""
    model = build("switch_lm_tiny", TRANSFORMER_NO_DROPOUT + ["--moe-train-capacity-factor", "0.5"])
    model.train()
    stats = model(tokens(0))[1]["moe_stats"]
    assert all(s.dropped > 0 for s in stats)
    assert_causal(model, train=True)


@pytest.mark.parametrize("family", ["switch", "gshard", "hash", "base", "transformer"])
def test_incremental_decoding_equals_full_forward(family):
    arch, args = FAMILIES[family]
    model = build(arch, args).eval()
    x = tokens(1)
    with torch.no_grad():
        full = model(x)[0]
        state = {}
        steps = [model.decoder(x[:, : i + 1], incremental_state=state)[0][:, -1] for i in range(x.size(1))]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-4)


@pytest.mark.parametrize("family", ["switch", "gshard", "hash", "base"])
def test_routing_statistics_reach_the_criterion(family):
    arch, args = FAMILIES[family]
    model = build(arch, args).train()
    stats = model(tokens(0))[1]["moe_stats"]
    assert len(stats) == (1 if family == "base" else 2)
    for s in stats:
        assert s.layer.startswith("layers.") and s.expert_counts.sum() > 0
        assert (s.aux_loss is not None) == (family in ("switch", "gshard"))


def test_hash_routing_is_deterministic_and_survives_save_and_load(tmp_path):
    a = build("hash_lm_tiny", TRANSFORMER_NO_DROPOUT + ["--hash-type", "random", "--hash-seed", "1"], seed=0)
    again = build("hash_lm_tiny", TRANSFORMER_NO_DROPOUT + ["--hash-type", "random", "--hash-seed", "1"], seed=5)
    key = "decoder.layers.1.fc1.router.table"
    assert torch.equal(a.state_dict()[key], again.state_dict()[key])  # fixed by the flag, not the init seed
    torch.save(a.state_dict(), tmp_path / "model.pt")
    other = build("hash_lm_tiny", TRANSFORMER_NO_DROPOUT + ["--hash-type", "random", "--hash-seed", "2"], seed=1)
    assert not torch.equal(other.state_dict()[key], a.state_dict()[key])
    other.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert torch.equal(other.state_dict()[key], a.state_dict()[key])
    a.eval(), other.eval()
    assert torch.equal(logits(a, tokens(2)), logits(other, tokens(2)))


def test_balanced_hash_spreads_the_dictionary_counts():
    model = build("hash_lm_tiny", TRANSFORMER_NO_DROPOUT)
    router = model.decoder.layers[1].fc1.router
    counts = torch.tensor(model.decoder.dictionary.count, dtype=torch.float)
    load = torch.zeros(router.num_experts).index_add_(0, router.table, counts)
    assert load.max() - load.min() <= counts.max()  # greedy packing: within one token's count


def test_base_layer_in_one_process_is_fairseqs_maths():
    """fairseq's BaseLayer (--base-experts 0) in one worker: every token goes to the one
    expert, mixed in by sigmoid(x . c). E experts in one process: test_fair_baselines.py."""
    model = build("base_lm_tiny", TRANSFORMER_NO_DROPOUT + ["--base-experts", "0"]).eval()
    layer = next(m for m in model.modules() if type(m).__name__ == "FairseqBaseLayer")
    x = torch.randn(5, 2, layer.expert_centroids.size(1))
    with torch.no_grad():
        out = layer(x)[0]
        alpha = torch.sigmoid(x @ layer.expert_centroids[0]).unsqueeze(-1)
        expected = alpha * layer.expert_network(x) + (1 - alpha) * x
    assert torch.allclose(out, expected, atol=1e-5)
    assert layer.last_stats.expert_counts.tolist() == [10.0]


def test_moe_layers_sit_every_moe_freq_layers_and_experts_are_marked():
    model = build("switch_lm_tiny", ["--moe-freq", "2", "--decoder-layers", "4"])
    moe = [i for i, layer in enumerate(model.decoder.layers) if type(layer).__name__ == "MoETransformerDecoderLayer"]
    assert moe == [1, 3]
    assert all(layer.normalize_before for layer in model.decoder.layers)  # pre-norm, as fairseq's transformer_lm
    experts = [n for n, p in model.named_parameters() if getattr(p, "expert", False)]
    assert experts and all(".fc1.experts." in n for n in experts)

