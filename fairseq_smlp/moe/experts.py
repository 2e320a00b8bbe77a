"""E feed-forward experts with stacked weights, computed as batched matmuls.

Written by hand rather than with fairscale's MOELayer: MOELayer needs a process group
and a fixed capacity; tMoE's balanced assignment needs neither, and evaluation-time
greedy routing has uneven loads that a capacity would drop.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sharding import shard_stacked


class ExpertFFN(nn.Module):
    """expert_e(x) = W2_e act(W1_e LN_e(x) + b1_e) + b2_e, for E experts at once.

    Weights are stacked (E, ...): built with all E experts; expert parallelism
    (distributed/expert_parallel.py, parallelize_experts) keeps E_local = E / W of them, rank
    r holding experts r*E_local .. (r+1)*E_local - 1 (`shard_experts`, sharding.py).
    The per-expert LayerNorm (pre_norm) is Base Layers' (the expert owns its norm).
    `dropout`: expert dropout on the hidden activations (--expert-dropout).

    init (--expert-init): "dense" (default) starts every expert as torch's nn.Linear starts a
    dense FFN (weights and biases uniform in +-1/sqrt(fan_in)): Switch, GShard, HASH and
    fairseq's MoE experts start like the FFN they replace. "zero_output": the same with W2 = 0,
    fairseq's BaseSublayer (Base Layers): the expert starts as the zero function (plus its
    bias), so a residual sublayer starts as the identity.
    """

    INITS = ("dense", "zero_output")

    def compile_targets(self) -> list:
        """What --moe-compile compiles (moe/compile.py): the batched expert forward."""
        return ["forward"]

    def __init__(
        self, num_experts: int, embed_dim: int, ffn_dim: int, pre_norm: bool = True, activation: str = "gelu",
        init: str = "dense", dropout: float = 0.0,
    ):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"--expert-init must be one of {self.INITS}, got {init!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"--expert-dropout must be in [0, 1), got {dropout}")
        self.num_experts, self.embed_dim = num_experts, embed_dim  # num_experts: all ranks together
        self.norm_weight = nn.Parameter(torch.ones(num_experts, 1, embed_dim)) if pre_norm else None
        self.norm_bias = nn.Parameter(torch.zeros(num_experts, 1, embed_dim)) if pre_norm else None

        def uniform(shape, fan_in):  # nn.Linear's init of weight and bias: U(+-1/sqrt(fan_in))
            return nn.Parameter(torch.empty(num_experts, *shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5))

        self.fc1_weight = uniform((embed_dim, ffn_dim), embed_dim)
        self.fc1_bias = uniform((1, ffn_dim), embed_dim)
        self.fc2_weight = uniform((ffn_dim, embed_dim), ffn_dim)
        self.fc2_bias = uniform((1, embed_dim), ffn_dim)
        if init == "zero_output":
            nn.init.zeros_(self.fc2_weight)
        self.init, self.dropout = init, dropout
        self.activation = getattr(F, activation)
        for p in self.parameters():
            p.expert = True  # fairseq's legacy_ddp skips these in the gradient all-reduce
        self.world_size, self.num_local_experts = 1, num_experts  # until shard_experts

    def shard_experts(self, world_size: int, rank: int) -> None:
        """Keep rank `rank`'s E / W experts of `world_size` workers (parallelize_experts calls
        this once, after the model is built: the experts were initialised for all E, so a
        sharded model starts with exactly the experts of the unsharded one)."""
        if self.world_size > 1:
            raise RuntimeError(f"the experts are already sharded over {self.world_size} workers")
        flag = "--tmoe-experts / --moe-experts"
        self.num_local_experts = shard_stacked(self, self.num_experts, world_size, rank, flag)
        self.world_size = world_size

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Refuse, with the fix, a checkpoint whose experts were sharded differently."""
        saved = state_dict.get(prefix + "fc1_weight")
        if saved is not None and saved.size(0) != self.num_local_experts:
            raise ValueError(
                f"{prefix}fc1_weight holds {saved.size(0)} experts but this process needs {self.num_local_experts} "
                f"({self.num_experts} experts over {self.world_size} workers): the checkpoint was saved by an "
                "expert-parallel run with another world size; convert it with "
                f"`python -m fairseq_smlp.checkpoints reshard CKPT --to-world-size {self.world_size} --out NEW.pt`"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (E_local, K, H), K rows per expert -> (E_local, K, H)."""
        if self.norm_weight is not None:
            # per-expert affine in one op (norm_bias + x_hat * norm_weight): one pass less than * then +
            x = torch.addcmul(self.norm_bias, F.layer_norm(x, (self.embed_dim,)), self.norm_weight)
        h = self.activation(torch.baddbmm(self.fc1_bias, x, self.fc1_weight))
        h = F.dropout(h, self.dropout, self.training)
        return torch.baddbmm(self.fc2_bias, h, self.fc2_weight)

    def input_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the experts' first op reads x in: the autocast dtype when that op is the
        fc1 matmul (no pre-norm) under CPU autocast, else x's own."""
        return _compute_dtype(x) if self.norm_weight is None and x.device.type == "cpu" else x.dtype

    def can_run_grouped(self, x: torch.Tensor) -> bool:
        """torch's grouped_mm runs on CPU (fp32/bf16) for rows whose byte strides are multiples
        of 16; on CUDA it needs bf16 and SM >= 80. Not under CPU autocast: grouped_mm is not
        in autocast's cast lists, and in bf16 its small per-expert products measured slower
        than the padded batched matmul (benchmarks/layer_microbench.py, Switch/GShard/HASH)."""
        grouped_mm = getattr(F, "grouped_mm", None)
        aligned = all(d * x.element_size() % 16 == 0 for d in (self.embed_dim, self.fc1_weight.size(-1)))
        return (
            grouped_mm is not None and x.device.type == "cpu" and aligned and x.dtype == self.fc1_weight.dtype
            and not torch.is_autocast_enabled("cpu")
        )

    def forward_grouped(
        self, x: torch.Tensor, row_expert: Optional[torch.Tensor], counts: torch.Tensor
    ) -> torch.Tensor:
        """x: (M, H) rows grouped by local expert (counts: (E_local,) rows per expert;
        row_expert: (M,) their experts, or None to derive it) -> (M, H).

        forward() on exactly the routed rows: each expert multiplies only its own rows, so
        an uneven load costs no FLOPs on padding slots. Biases are added to each expert's
        block of rows in place (no (M, F) copy of the bias rows)."""
        offs = torch.cumsum(counts, 0).to(torch.int32)
        sizes = counts.tolist()
        if self.norm_weight is not None:
            if row_expert is None:
                row_expert = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)

            def per_row(p):  # (E, 1, D) -> (M, D): each row's expert's vector
                return p.squeeze(1).index_select(0, row_expert)

            x = torch.addcmul(per_row(self.norm_bias), F.layer_norm(x, (self.embed_dim,)), per_row(self.norm_weight))
        h = self.activation(_AddBlockBias.apply(F.grouped_mm(x, self.fc1_weight, offs=offs), self.fc1_bias, sizes))
        h = F.dropout(h, self.dropout, self.training)
        return _AddBlockBias.apply(F.grouped_mm(h, self.fc2_weight, offs=offs), self.fc2_bias, sizes)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's on the CPU when it is on, else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


class _AddBlockBias(torch.autograd.Function):
    """y (M, D) rows in blocks of sizes[e] rows per expert; y[block e] += bias[e], in place.

    bias: (E, 1, D). The gradient of bias[e] is the sum of the gradient over block e."""

    @staticmethod
    def forward(ctx, y, bias, sizes):
        ctx.mark_dirty(y)
        ctx.sizes, ctx.bias_dtype = sizes, bias.dtype
        for block, b in zip(y.split(sizes), bias.to(y.dtype)):
            block.add_(b)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad_bias = None
        if ctx.needs_input_grad[1]:
            blocks = grad.split(ctx.sizes)
            grad_bias = torch.stack([block.sum(0, keepdim=True, dtype=torch.float32) for block in blocks])
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad, grad_bias, None
