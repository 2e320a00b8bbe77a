"""The fused output projection + cross-entropy (criterions/fused_output_loss.py) gives the
loss and gradients of the unfused path, for sMLP (both routings) and a Transformer baseline,
with padding and partial-prediction masking."""
import pytest
import torch

from fairseq_smlp.criterions.fused_output_loss import LinearCrossEntropy
from fairseq_smlp.criterions.moe_cross_entropy import MoECrossEntropyCriterion
from fairseq_smlp.models.factory import build_model, offline_task

VOCAB, T, B = 60, 16, 3
MODELS = {
    "smlp": ("smlp_lm_tiny", ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "16",
                              "--dropout", "0"]),
    "smlp_partial": ("smlp_lm_tiny", ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "16",
                                      "--dropout", "0", "--smoe-routing", "partial"]),
    "switch": ("switch_lm_tiny", ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
                                  "--dropout", "0"]),
}


def sample(pad):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, VOCAB, (B, T + 1), generator=g)
    target = tokens[:, 1:].clone()
    target[0, -5:] = pad  # a padded tail
    return {"net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((B,), T)}, "target": target, "ntokens": B * T}


def loss_and_grads(model, criterion, s):
    model.zero_grad()
    loss, sample_size, log = criterion(model, s)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, log


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_equals_unfused(name):
    arch, args = MODELS[name]
    task = offline_task(VOCAB)
    torch.manual_seed(0)
    model, _ = build_model(arch, args, seq_len=T, vocab=VOCAB, device="cpu", task=task)
    with torch.no_grad():  # the output weights are tied to the embeddings: give the logits some spread
        model.decoder.embed_tokens.weight.normal_(0, 1.0)
    model.train()
    s = sample(task.target_dictionary.pad())
    fused, unfused = (MoECrossEntropyCriterion(task, 0.01, no_fused_output_loss=flag) for flag in (False, True))
    loss_f, grads_f, log_f = loss_and_grads(model, fused, s)
    loss_u, grads_u, log_u = loss_and_grads(model, unfused, s)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-5)
    assert log_f["sample_size"] == log_u["sample_size"] < B * T  # padding (and the prefix) not scored
    assert grads_f.keys() == grads_u.keys()
    # float rounding differs between the paths: tolerance relative to each tensor's scale, and
    # to the largest gradient (attention key biases have a zero gradient up to rounding)
    largest = max(g.abs().max().item() for g in grads_u.values())
    for n in grads_f:
        scale = grads_u[n].abs().max().item()
        torch.testing.assert_close(grads_f[n], grads_u[n], rtol=1e-4, atol=1e-5 * scale + 1e-7 * largest, msg=n)


def test_function_against_log_softmax_with_ignored_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, requires_grad=True)
    w = torch.randn(11, 5, generator=g, requires_grad=True)
    target = torch.tensor([1, 2, -100, 4, 10, 0, -100])
    loss = LinearCrossEntropy.apply(x, w, target, -100)
    gx, gw = torch.autograd.grad(3 * loss, (x, w))
    ref = torch.nn.functional.cross_entropy(x @ w.t(), target, ignore_index=-100, reduction="sum")
    rx, rw = torch.autograd.grad(3 * ref, (x, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_bf16_autocast_keeps_the_softmax_in_fp32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    target = torch.randint(50, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy.apply(x, w, target, -100)
    assert loss.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy((x @ w.t()).float(), target, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)  # bf16 logits, fp32 softmax
    loss.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_bf16_autocast_backward_matches_autocast_linear():
    """Under autocast the backward's two matmuls run in bf16, as autocast's own linear +
    cross-entropy does: gradients match that reference to bf16 precision."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    target = torch.randint(50, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy.apply(x, w, target, -100)
    gx, gw = torch.autograd.grad(loss, (x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w).float(), target, reduction="sum")
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, rx, rtol=2e-2, atol=2e-2 * rx.abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-2 * rw.abs().max().item())
