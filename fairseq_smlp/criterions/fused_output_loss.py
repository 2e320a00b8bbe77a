"""Output projection and cross-entropy in one autograd function.

On the tiny CPU models the output layer (vocabulary 8k, width 128) is ~64% of a training
step (benchmarks/results/profile_step.md), a third of it in log_softmax forward + backward,
which writes and reads (N, V) tensors several times. Here the backward turns the saved
logits into softmax - one_hot in place: one (N, V) buffer, no log-probability tensor, no
zero-filled NLL gradient. Written by hand: neither torch nor fairseq ships a fused
linear + cross-entropy for CPU.
"""
import torch


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows with target != ignore_index of -log softmax(x W^T)[target].

    x: (N, H), weight: (V, H), target: (N,) long. Logits and softmax in fp32 (also under
    autocast); gradients come back in the dtypes of x and weight.
    """

    @staticmethod
    def forward(ctx, x, weight, target, ignore_index: int):
        logits = torch.mm(x, weight.t()).float()  # (N, V)
        scored = target.ne(ignore_index)
        safe_target = target.masked_fill(~scored, 0)
        picked = logits.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        # logsumexp by hand, in place: the buffer becomes exp(logits - row max), which the
        # backward turns into softmax with one multiply (torch.logsumexp would allocate an
        # (N, V) temporary, and the backward would then redo the subtract and the exp)
        row_max = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(row_max).exp_()
        sum_exp = exp.sum(dim=-1)  # (N,)
        lse = row_max.squeeze(1) + sum_exp.log()
        ctx.save_for_backward(x, weight, exp, sum_exp, safe_target, scored)
        # the backward runs outside autocast: remember the forward's matmul dtype, so that its
        # two (N, V) x (V, H) products run in bf16 too (2/3 of the output layer's FLOPs)
        autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        ctx.matmul_dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        return ((lse - picked) * scored).sum()

    @staticmethod
    def backward(ctx, grad):
        x, weight, exp, sum_exp, safe_target, scored = ctx.saved_tensors
        # d loss / d logits = grad * (softmax - one_hot) on scored rows, built in the saved
        # buffer (the graph is used once: fairseq never backpropagates twice through a loss)
        row_grad = scored.to(exp.dtype) * grad  # (N,)
        probs = exp.mul_((row_grad / sum_exp).unsqueeze(1))
        probs[torch.arange(probs.size(0), device=probs.device), safe_target] -= row_grad
        dtype = ctx.matmul_dtype
        probs = probs.to(dtype)
        grad_x = torch.mm(probs, weight.to(dtype)).to(x.dtype)
        return grad_x, torch.mm(probs.t(), x.to(dtype)).to(weight.dtype), None, None


def fused_output_weight(model):
    """The output projection weight if the loss may be fused for this model, else None
    (adaptive softmax, a bias, or a model without a plain output projection)."""
    projection = getattr(getattr(model, "decoder", None), "output_projection", None)
    if isinstance(projection, torch.nn.Linear) and projection.bias is None:
        return projection.weight
    return None
