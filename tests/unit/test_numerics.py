"""Numerics: a router that meets NaN/inf stops with its layer's name; half-precision autocast
keeps routing, auxiliary losses and the loss close to fp32 (the routing side: which expert,
which weights, which aux loss). Whole models' losses and gradients in every half-precision mode
and fairseq's fp16 optimizers: test_half_precision.py, next to this file; the real commands
with --bf16 / --fp16: integration/test_half_precision_commands.py.

Also covered elsewhere: test_smlp_model.py::test_router_logits_and_moe_weights_stay_fp32_under_bf16_autocast
(tMoE combine weights), test_baselines.py::test_routing_stays_fp32_under_bf16_autocast (Top1/Top2 alone),
test_fused_loss.py::test_bf16_autocast_keeps_the_softmax_in_fp32.
"""
import pytest
import torch

from conftest import build_tiny_smlp
from fairseq_smlp.models.factory import build_model, offline_task
from fairseq_smlp.moe import fairseq_base_layer
from fairseq_smlp.moe import router as routers
from fairseq_smlp.moe.router import Router, Top1Router, Top2Router, switch_aux_loss

VOCAB = 40


def tokens(batch=2, length=24):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("routing", ["deterministic", "partial"])
def test_nan_reaching_a_router_is_reported_with_its_layer(routing):
    model = build_tiny_smlp(smoe_routing=routing).train()
    with torch.no_grad():
        model.decoder.embed_tokens.weight[5] = float("nan")  # one poisoned token
    x = tokens()
    x[0, 3] = 5
    with pytest.raises(FloatingPointError, match=r"non-finite router logits in layers\.1\.(feature_moe|token_mixing\.gate)\.router"):
        model(x)


@pytest.mark.parametrize("arch", ["switch_lm_tiny", "gshard_lm_tiny"])
def test_nan_in_a_baseline_router_is_reported_with_its_layer(arch):
    args = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2", "--dropout", "0"]
    model, _ = build_model(arch, args, seq_len=24, vocab=VOCAB, device="cpu", task=offline_task(VOCAB))
    with torch.no_grad():
        model.decoder.embed_tokens.weight[5] = float("inf")
    x = tokens()
    x[1, 0] = 5
    with pytest.raises(FloatingPointError, match=r"non-finite router logits in layers\.\d+\.fc1\.router"):
        model.train()(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_aux_loss_does_not_underflow_in_half_precision(dtype):
    """Tiny, nearly uniform router probabilities: E * sum f_e P_e is ~1 and must come out in
    fp32 with the fp32 value, not rounded through half precision."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(1e-4 * torch.randn(4096, 8, generator=g), -1)
    top1 = probs.argmax(-1)
    reference = switch_aux_loss(probs, top1)
    half = switch_aux_loss(probs.to(dtype), top1)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, rtol=2e-3, atol=0)


# ------------------------------------------------------------ every router routes in fp32
BASELINE_ARGS = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2", "--dropout", "0"]


def baseline(arch):
    return build_model(arch, BASELINE_ARGS, seq_len=24, vocab=VOCAB, device="cpu", task=offline_task(VOCAB))[0]


@pytest.fixture
def router_logits(monkeypatch):
    """{layer name: dtype of the logits it checked}: every call of routing.check_finite."""
    seen, check_finite = {}, routers.check_finite

    def spy(logits, layer):
        seen[layer] = logits.dtype
        check_finite(logits, layer)

    for module in (routers, fairseq_base_layer):
        monkeypatch.setattr(module, "check_finite", spy)
    return seen


def router_names(model):
    """Names of the modules that route on hidden states (HASH routes on token ids: no logits)."""
    return {m.name for m in model.modules() if (isinstance(m, Router) or isinstance(m, fairseq_base_layer.FairseqBaseLayer)) and not isinstance(m, routers.HashRouter)}


SMLP_ROUTINGS = {
    "deterministic": dict(smoe_routing="deterministic"),
    "partial, assignment": dict(smoe_routing="partial"),
    "partial, aux loss": dict(smoe_routing="partial", partial_balance="aux_loss"),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(SMLP_ROUTINGS))
def test_smlp_routers_are_checked_and_fp32_under_bf16_autocast(router_logits, case, train):
    model = build_tiny_smlp(**SMLP_ROUTINGS[case]).train(train)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, extra = model(tokens())
    assert set(router_logits) == router_names(model) != set()
    assert set(router_logits.values()) == {torch.float32}
    for stats in extra["moe_stats"]:
        assert stats.aux_loss is None or stats.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("arch", ["switch_lm_tiny", "gshard_lm_tiny", "base_lm_tiny"])
def test_baseline_routers_are_checked_under_bf16_autocast(router_logits, arch):
    """Switch / GShard and Base Layers in one process (BaseRouter) route in fp32. fairseq's own
    BaseLayer (several workers) computes its affinities in the autocast dtype (its code):
    only checked for NaN/inf there."""
    model = baseline(arch).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens())
    assert set(router_logits) == router_names(model) != set()
    assert set(router_logits.values()) == {torch.float32}


def test_hash_router_weights_are_fp32_under_bf16_autocast():
    model = baseline("hash_lm_tiny").train()
    router = model.decoder.layers[1].fc1.router
    router.set_token_ids(torch.arange(8) % VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weight, _ = router(torch.randn(8, 16, dtype=torch.bfloat16))
        logits = model(tokens())[0]
    assert weight.dtype == torch.float32 and torch.isfinite(logits).all()


# ---------------------------------------------------- NaN/inf in a router's own weights
def poison(parameter):
    with torch.no_grad():
        parameter.view(-1)[0] = float("nan")


@pytest.mark.parametrize("where,layer", [
    ("token_mixing.gate.router.weight", r"layers\.1\.token_mixing\.gate\.router"),
    ("feature_moe.router.centroids", r"layers\.1\.feature_moe\.router"),
])
def test_nan_in_a_smlp_router_weight_names_the_layer(where, layer):
    model = build_tiny_smlp(smoe_routing="partial").train()
    poison(model.decoder.layers[1].get_parameter(where))
    with pytest.raises(FloatingPointError, match=rf"non-finite router logits in {layer}:"):
        model(tokens())


@pytest.mark.parametrize("arch,where,layer", [
    ("switch_lm_tiny", "layers.3.fc1.router.gate.weight", r"layers\.3\.fc1\.router"),
    ("gshard_lm_tiny", "layers.1.fc1.router.gate.weight", r"layers\.1\.fc1\.router"),
    ("base_lm_tiny", "layers.1.router.centroids", r"layers\.1\.base_layer"),
])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nan_in_a_baseline_router_weight_names_the_layer(arch, where, layer, train):
    model = baseline(arch).train(train)
    poison(model.decoder.get_parameter(where))
    with torch.set_grad_enabled(train):  # fairseq's BaseLayer reads training mode from requires_grad
        with pytest.raises(FloatingPointError, match=rf"non-finite router logits in {layer}:"):
            model(tokens())


# --------------------------------------- auxiliary losses (Switch loss + z-loss) in fp32
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [Top1Router, Top2Router])
def test_router_aux_and_z_loss_equal_fp32_for_tiny_half_inputs(cls, dtype):
    """Inputs of magnitude 1e-3 give logits ~1e-5: in half precision logsumexp^2 and the
    probabilities would round; the router computes both from fp32 upcasts."""
    torch.manual_seed(0)
    router = cls(16, 4, 0, 0, z_loss_weight=1e-3).eval()
    x = 1e-3 * torch.randn(64, 16)
    half = x.to(dtype)
    _, _, reference = router(half.float())  # same (rounded) input, fp32 all the way
    with torch.autocast("cpu", dtype=dtype):
        _, _, stats = router(half)
    assert stats.aux_loss.dtype == torch.float32
    torch.testing.assert_close(stats.aux_loss, reference.aux_loss, rtol=1e-6, atol=0)


def test_partial_router_aux_loss_is_fp32_for_tiny_bf16_inputs():
    router = routers.PrefixChannelRouter(24, 0.25, 4, balance="aux_loss")
    z = (1e-3 * torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(0))).bfloat16()
    _, _, reference = router(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weight, stats = router(z)
    assert weight.dtype == stats.aux_loss.dtype == torch.float32
    torch.testing.assert_close(stats.aux_loss, reference.aux_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("routing_name", ["deterministic", "partial"])
def test_whole_model_bf16_loss_close_to_fp32(routing_name):
    model = build_tiny_smlp(smoe_routing=routing_name).eval()
    x = tokens()
    target = torch.roll(x, -1, 1)
    start = model.decoder.score_from  # partial routing: positions before it are not predictions

    def loss():
        logits = model(x)[0].float()[:, start:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target[:, start:].reshape(-1))

    with torch.no_grad():
        fp32_loss = loss()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss = loss()
    assert torch.isfinite(bf16_loss)
    torch.testing.assert_close(bf16_loss, fp32_loss, rtol=2e-2, atol=0)
