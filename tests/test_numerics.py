"""Numerics: a router that meets NaN/inf stops with its layer's name; half-precision autocast
keeps routing, auxiliary losses and the loss close to fp32."""
import pytest
import torch

from conftest import build_tiny_smlp
from fairseq_smlp.flops import build_model, dummy_task
from fairseq_smlp.modules.routing import switch_aux_loss

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
    model, _ = build_model(arch, args, seq_len=24, vocab=VOCAB, device="cpu", task=dummy_task(VOCAB))
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


def test_whole_model_under_bf16_autocast_is_close_to_fp32():
    model = build_tiny_smlp().eval()
    x = tokens()
    target = torch.roll(x, -1, 1)

    def loss():
        logits = model(x)[0].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))

    with torch.no_grad():
        fp32 = loss()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = loss()
    assert torch.isfinite(bf16)
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)
