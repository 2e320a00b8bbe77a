"""Fair baselines: experts start as each method starts them, Base Layers has E experts in
one process (and agrees with fairseq's BaseLayer where both apply), expert dropout. Side by side
with test_baselines.py, which checks the routers, causality and incremental decoding of every
baseline family; this file checks that the comparison is fair (initialisation, expert count,
dropout as each paper has them)."""
import pytest
import torch
import torch.nn.functional as F

from fairseq_smlp.flops import count_flops, count_params
from fairseq_smlp.models.factory import build_model, offline_task
from fairseq_smlp.moe.fairseq_base_layer import FairseqBaseLayer
from fairseq_smlp.moe import router as routers
from fairseq_smlp.moe.base_experts import BaseExpertsLayer
from fairseq_smlp.moe.experts import ExpertFFN

VOCAB, SEQ = 40, 16
SMALL = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
         "--dropout", "0", "--attention-dropout", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch, args=(), seed=0):
    torch.manual_seed(seed)
    return build_model(arch, list(args), seq_len=SEQ, vocab=VOCAB, device="cpu", task=offline_task(VOCAB))[0]


def tokens(seed=0, batch=2):
    return torch.randint(4, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- expert initialisation
def test_dense_init_is_nn_linears_init_for_every_expert():
    torch.manual_seed(0)
    experts = ExpertFFN(64, 32, 128, pre_norm=False, init="dense")
    for name, fan_in in [("fc1_weight", 32), ("fc1_bias", 32), ("fc2_weight", 128), ("fc2_bias", 128)]:
        p = getattr(experts, name)
        bound = fan_in ** -0.5  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases
        assert p.abs().max() <= bound
        assert p.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    assert not torch.equal(experts.fc1_weight[0], experts.fc1_weight[1])  # every expert its own draw


def test_zero_output_init_is_fairseqs_base_sublayer():
    """fairseq's BaseSublayer: nn.Linear init, then ff2.weight zeroed (its bias is not)."""
    torch.manual_seed(0)
    experts = ExpertFFN(4, 16, 32, init="zero_output")
    assert torch.count_nonzero(experts.fc2_weight) == 0
    assert torch.count_nonzero(experts.fc2_bias) == experts.fc2_bias.numel()
    assert torch.count_nonzero(experts.fc1_weight) == experts.fc1_weight.numel()
    with pytest.raises(ValueError, match="--expert-init"):
        ExpertFFN(4, 16, 32, init="xavier")


@pytest.mark.parametrize("arch", ["switch_lm_tiny", "gshard_lm_tiny", "hash_lm_tiny"])
def test_feed_forward_moe_experts_start_like_the_dense_ffn_they_replace(arch):
    """Expert W2 has the scale of a dense layer's fc2 (not zero), so the MoE layer adds to the
    residual stream from the first step and its W1 gets a gradient at once."""
    model = build(arch, SMALL + ["--moe-experts", "4"])
    dense_fc2 = model.decoder.layers[0].fc2.weight
    moe = model.decoder.layers[1].fc1
    experts = moe.experts
    assert experts.fc2_weight.std().item() == pytest.approx(
        (experts.fc2_weight.size(1) ** -0.5) / 3 ** 0.5, rel=0.15)
    if arch != "gshard_lm_tiny":  # same width as the dense FFN: same scale
        assert experts.fc2_weight.std().item() == pytest.approx(dense_fc2.std().item(), rel=0.15)
    model.train()
    x = tokens()
    model(x)[0].logsumexp(-1).sum().backward()
    assert experts.fc1_weight.grad.abs().sum() > 0
    assert moe.router.gate.weight.grad.abs().sum() > 0 if hasattr(moe.router, "gate") else True


def test_zero_output_experts_give_their_first_weight_no_gradient():
    """The handicap the dense init removes: with W2 = 0 the MoE adds nothing and W1 learns nothing at step 1."""
    model = build("switch_lm_tiny", SMALL + ["--moe-experts", "4", "--expert-init", "zero_output"]).train()
    model(tokens())[0].logsumexp(-1).sum().backward()
    experts = model.decoder.layers[1].fc1.experts
    assert torch.count_nonzero(experts.fc1_weight.grad) == 0
    assert experts.fc2_weight.grad.abs().sum() > 0


def test_smlp_tmoe_init_follows_the_flag():
    args = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "24", "--dropout", "0"]
    dense = build("smlp_lm_tiny", args).decoder.layers[1].feature_moe.experts
    zero = build("smlp_lm_tiny", args + ["--expert-init", "zero_output"]).decoder.layers[1].feature_moe.experts
    assert dense.fc2_weight.std().item() == pytest.approx(24 ** -0.5 / 3 ** 0.5, rel=0.15)
    assert torch.count_nonzero(zero.fc2_weight) == 0


def test_smlp_tmoe_router_top1_is_switch_routing_with_its_aux_loss():
    """--tmoe-router top1 (sparsity diagnosis): the sparse block's tMoE routes like Switch —
    softmax gate, one expert, its balance loss reaches the criterion — and evaluation is causal."""
    from fairseq_smlp.moe.router import Top1Router

    from conftest import build_tiny_smlp

    model = build_tiny_smlp(tmoe_router="top1")
    moe = model.decoder.layers[1].feature_moe
    assert isinstance(moe.router, Top1Router) and moe.router.num_experts == 4
    x = torch.randint(4, 40, (3, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    _, extra = model(x)
    aux = [s.aux_loss for s in extra["moe_stats"] if s.layer.endswith("feature_moe.router")]
    assert len(aux) == 1 and aux[0].requires_grad and aux[0].item() >= 1.0 - 1e-6  # Switch's loss is >= 1
    model.eval()
    with torch.no_grad():
        full = model(x)[0]
        cut = model(x[:, :10])[0]
    torch.testing.assert_close(full[:, :10], cut, rtol=1e-5, atol=1e-5)


def test_base_layer_experts_start_as_base_layers():
    model = build("base_lm_tiny", SMALL + ["--base-experts", "4"])
    layer = model.decoder.layers[1]
    assert isinstance(layer, BaseExpertsLayer)
    for sublayer in layer.experts.sublayers:
        assert torch.count_nonzero(sublayer.fc2_weight) == 0


# ---------------------------------------------------------------- expert dropout
def test_expert_dropout_acts_on_the_hidden_units_in_training_only():
    torch.manual_seed(0)
    experts = ExpertFFN(2, 8, 16, pre_norm=False, dropout=0.5)
    x = torch.randn(2, 5, 8)

    def by_hand(x, p):
        h = F.gelu(x @ experts.fc1_weight + experts.fc1_bias)
        return F.dropout(h, p, True) @ experts.fc2_weight + experts.fc2_bias

    experts.train()
    torch.manual_seed(1)
    out = experts(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, by_hand(x, 0.5))
    experts.eval()
    torch.testing.assert_close(experts(x), by_hand(x, 0.0))
    with pytest.raises(ValueError, match="--expert-dropout"):
        ExpertFFN(2, 8, 16, dropout=1.0)


def test_expert_dropout_flag_reaches_every_family():
    from conftest import build_tiny_smlp

    assert build_tiny_smlp(expert_dropout=0.3).decoder.layers[1].feature_moe.experts.dropout == 0.3
    assert build("switch_lm_tiny", SMALL + ["--expert-dropout", "0.3"]).decoder.layers[1].fc1.experts.dropout == 0.3
    base = build("base_lm_tiny", SMALL + ["--expert-dropout", "0.3"]).decoder.layers[1]
    assert all(s.dropout == 0.3 for s in base.experts.sublayers)


# ---------------------------------------------------------------- Base Layers with E experts
def fairseq_layer_with_weights_of(ours: BaseExpertsLayer, expert: int, args) -> FairseqBaseLayer:
    """fairseq's BaseLayer (one worker, one expert) holding expert `expert` of our layer."""
    theirs = FairseqBaseLayer(args)
    with torch.no_grad():
        theirs.expert_centroids.copy_(ours.router.centroids[expert : expert + 1])
        for sub, stacked in zip(theirs.expert_network, ours.experts.sublayers):
            sub.norm.weight.copy_(stacked.norm_weight[expert, 0])
            sub.norm.bias.copy_(stacked.norm_bias[expert, 0])
            sub.ff1.weight.copy_(stacked.fc1_weight[expert].t())
            sub.ff1.bias.copy_(stacked.fc1_bias[expert, 0])
            sub.ff2.weight.copy_(stacked.fc2_weight[expert].t())
            sub.ff2.bias.copy_(stacked.fc2_bias[expert, 0])
    return theirs


def base_args(sublayers=2):
    from argparse import Namespace

    return Namespace(decoder_embed_dim=16, decoder_ffn_embed_dim=24, base_sublayers=sublayers, base_shuffle=1, activation_fn="relu")


def base_layer(experts, sublayers=2, seed=0):
    torch.manual_seed(seed)
    layer = BaseExpertsLayer(16, 24, experts, sublayers, activation="relu")
    with torch.no_grad():  # experts that do something (W2 starts at zero)
        for sub in layer.experts.sublayers:
            sub.fc2_weight.normal_(0, 0.3)
        layer.router.centroids.normal_(0, 1.0)
    return layer


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_one_expert_equals_fairseqs_base_layer(train):
    """E = 1, where both apply: same weights -> same outputs and the same input and
    parameter gradients, in training (balanced) and evaluation (greedy) mode."""
    ours = base_layer(1).train(train)
    theirs = fairseq_layer_with_weights_of(ours, 0, base_args()).train(train)
    x = torch.randn(7, 3, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()  # fairseq reads training from requires_grad
    out1, out2 = ours(x1)[0], theirs(x2)[0]
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-5)
    (out1 ** 2).sum().backward()
    (out2 ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.router.centroids.grad, theirs.expert_centroids.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.experts.sublayers[0].fc1_weight.grad[0].t(), theirs.expert_network[0].ff1.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_token_gets_fairseqs_base_layer_of_its_expert(train):
    """E = 4: each token's output is what fairseq's BaseLayer computes with that token's expert
    (its weights copied into a one-expert BaseLayer), for the assignment the router made."""
    ours = base_layer(4).train(train)
    x = torch.randn(12, 2, 16)
    chosen = {}
    ours.router.register_forward_hook(lambda m, i, out: chosen.__setitem__("expert", out[0].squeeze(1)))
    with torch.no_grad():
        out = ours(x)[0].reshape(-1, 16)
    expert = chosen["expert"]
    flat = x.reshape(-1, 16)
    if train:  # balanced: every expert the same number of tokens
        assert torch.bincount(expert, minlength=4).tolist() == [6, 6, 6, 6]
    else:  # greedy
        assert torch.equal(expert, (flat @ ours.router.centroids.t()).argmax(-1))
    for e in range(4):
        theirs = fairseq_layer_with_weights_of(ours, e, base_args()).eval()
        mine = expert == e
        with torch.no_grad():
            torch.testing.assert_close(out[mine], theirs(flat[mine].unsqueeze(1))[0].squeeze(1), rtol=1e-5, atol=1e-5)


def test_balanced_assignment_maximises_affinity():
    """Training routes by the balanced assignment of the affinities x . c_e (the router's solver)."""
    ours = base_layer(4).train()
    x = torch.randn(16, 16)
    chosen = {}
    ours.router.register_forward_hook(lambda m, i, out: chosen.__setitem__("expert", out[0].squeeze(1)))
    ours(x.unsqueeze(1))
    expected = routers.balanced_assignment(x @ ours.router.centroids.t().detach())
    assert torch.equal(chosen["expert"], expected)


def test_base_lm_has_its_arch_expert_count_in_one_process():
    model = build("base_lm_tiny", SMALL)
    layer = model.decoder.layers[1]
    assert isinstance(layer, BaseExpertsLayer) and layer.router.num_experts == 4  # smlp_lm_tiny's tMoE count
    assert all(getattr(p, "expert", False) for p in layer.experts.parameters())
    stats = model.train()(tokens())[1]["moe_stats"]
    assert [s.layer for s in stats] == ["layers.1.base_layer"]
    assert stats[0].expert_counts.tolist() == [8.0] * 4  # 32 tokens, balanced
    # --base-experts 0: fairseq's BaseLayer, one expert per worker (one process: a single expert)
    assert isinstance(build("base_lm_tiny", SMALL + ["--base-experts", "0"]).decoder.layers[1], FairseqBaseLayer)


def test_several_workers_use_fairseqs_base_layer_with_one_expert_each():
    """Expert parallelism over W = E workers puts fairseq's BaseLayer in the Base layer's place,
    one expert per worker (distributed/expert_parallel.py; no process group needed to build it)."""
    layer = build_model("base_lm_tiny", SMALL, seq_len=SEQ, vocab=VOCAB, device="meta", world_size=4)[0].decoder.layers[1]
    assert isinstance(layer, FairseqBaseLayer) and layer.expert_centroids.size(0) == 4 and layer.num_workers == 4
    with pytest.raises(ValueError, match="--base-experts 8 with 4 data-parallel workers"):
        build_model("base_lm_tiny", SMALL + ["--base-experts", "8"], seq_len=SEQ, vocab=VOCAB, device="meta", world_size=4)


def test_base_flops_and_params_in_one_process_equal_the_worker_layout():
    """FLOP matching holds either way: one process with E experts counts what E workers do."""
    one = build_model("base_lm_tiny", [], seq_len=128, vocab=8000, device="meta")[0]
    workers = build_model("base_lm_tiny", [], seq_len=128, vocab=8000, device="meta", world_size=4)[0]
    assert isinstance(workers.decoder.layers[1], FairseqBaseLayer)
    assert count_flops(one, 128) == count_flops(workers, 128)
    assert count_params(one) == count_params(workers, world_size=4)


def test_base_training_is_causal_given_the_assignment(monkeypatch):
    """Balanced assignment couples the tokens of a batch (as in Base Layers, documented): with
    the assignment held fixed, a later token never changes an earlier output. Evaluation is greedy
    and strictly causal (test_baselines.py::test_causal)."""
    saved, replay = [], {"on": False}
    real = routers.balanced_assignment

    def recorded(scores, *args):
        if replay["on"]:
            return saved.pop(0)
        saved.append(real(scores, *args))
        return saved[-1]

    monkeypatch.setattr(routers, "balanced_assignment", recorded)
    model = build("base_lm_tiny", SMALL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("fc2_weight"):
                p.normal_(0, 0.3)
    model.train()
    x = tokens()
    t = SEQ // 2
    base = model(x)[0]
    changed = x.clone()
    changed[:, t + 1 :] = tokens(5)[:, t + 1 :]
    replay["on"] = True
    out = model(changed)[0]
    torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :], atol=1e-3)
