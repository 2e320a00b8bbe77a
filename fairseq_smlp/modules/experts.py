"""Expert FFNs computed batched, and the one dispatch path every token-routed MoE uses.

Written by hand rather than with fairscale's MOELayer: MOELayer needs a process group
and a fixed capacity; tMoE's balanced assignment needs neither, and evaluation-time
greedy routing has uneven loads that a capacity would drop.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import expert_parallel


class ExpertFFN(nn.Module):
    """E feed-forward experts with stacked weights, run as batched matmuls.

    x: (E_local, C, H) slots per expert -> (E_local, C, H); E_local = E / data-parallel
    world size (all E in one process; rank r holds experts r*E_local .. (r+1)*E_local - 1).
    expert(x) = W2 dropout(act(W1 LN_e(x))) with a per-expert LayerNorm when pre_norm (as in
    Base Layers, where the expert owns its norm); `dropout` is expert dropout (--expert-dropout).

    init (--expert-init): "dense" (default) starts every expert as torch's nn.Linear starts a
    dense FFN (weights and biases uniform in +-1/sqrt(fan_in)): Switch, GShard, HASH and
    fairseq's MoE experts start like the FFN they replace. "zero_output": the same with W2 = 0,
    fairseq's BaseSublayer (Base Layers): the expert starts as the zero function, so a residual
    sublayer starts as the identity.
    """

    INITS = ("dense", "zero_output")

    def __init__(
        self, num_experts: int, embed_dim: int, ffn_dim: int, pre_norm: bool = True, activation: str = "gelu",
        init: str = "dense", dropout: float = 0.0,
    ):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"--expert-init must be one of {self.INITS}, got {init!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"--expert-dropout must be in [0, 1), got {dropout}")
        # expert parallelism: with W data-parallel workers this rank holds E / W experts
        self.world_size, self.rank = expert_parallel.world_size(), expert_parallel.rank()
        if num_experts % self.world_size != 0:
            raise ValueError(
                f"the expert count ({num_experts}, --tmoe-experts / --moe-experts) must be a multiple of "
                f"the number of data-parallel workers ({self.world_size}, --distributed-world-size): "
                "experts are sharded across workers"
            )
        self.num_experts, self.embed_dim = num_experts, embed_dim  # num_experts: all ranks together
        local = self.num_local_experts = num_experts // self.world_size
        self.norm_weight = nn.Parameter(torch.ones(local, 1, embed_dim)) if pre_norm else None
        self.norm_bias = nn.Parameter(torch.zeros(local, 1, embed_dim)) if pre_norm else None
        # initialise all E experts and keep this rank's slice: same RNG use as one process,
        # so a sharded model starts with exactly the experts of the unsharded one
        mine = slice(self.rank * local, (self.rank + 1) * local)

        def uniform(shape, fan_in):  # nn.Linear's init of weight and bias: U(+-1/sqrt(fan_in))
            full = torch.empty(num_experts, *shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5)
            return nn.Parameter(full if self.world_size == 1 else full[mine].clone())

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
            p.expert_sharded = self.world_size > 1  # read by distributed/checkpointing.py
        if self.world_size > 1:
            expert_parallel.scale_expert_grads(self.parameters(), self.world_size)
            from ..distributed import checkpointing  # imports fairseq's trainer: only when sharded

            checkpointing.install()  # every rank saves its own experts (see its docstring)

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
        if self.norm_weight is not None:
            x = F.layer_norm(x, (self.embed_dim,)) * self.norm_weight + self.norm_bias
        h = self.activation(torch.baddbmm(self.fc1_bias, x, self.fc1_weight))
        h = F.dropout(h, self.dropout, self.training)
        return torch.baddbmm(self.fc2_bias, h, self.fc2_weight)

    # ---- single process, uneven loads: no padding slots (see _run_in_slots)
    def can_run_grouped(self, x: torch.Tensor) -> bool:
        """torch's grouped_mm runs on CPU (fp32/bf16) for rows whose byte strides are multiples
        of 16; on CUDA it needs bf16 and SM >= 80, and it is not in autocast's cast lists."""
        grouped_mm = getattr(F, "grouped_mm", None)
        aligned = all(d * x.element_size() % 16 == 0 for d in (self.embed_dim, self.fc1_weight.size(-1)))
        return (
            grouped_mm is not None and x.device.type == "cpu" and aligned and x.dtype == self.fc1_weight.dtype
            and not torch.is_autocast_enabled("cpu")
        )

    def forward_grouped(self, x: torch.Tensor, row_expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (M, H) rows grouped by local expert (row_expert: (M,) sorted; counts: (E_local,)) -> (M, H).
        Used by one process, and by a worker on the rows it received (expert_parallel).

        forward() on exactly the routed rows: each expert multiplies only its own rows, so
        an uneven load costs no FLOPs on padding slots (Switch/GShard capacity, HASH, greedy
        evaluation spent up to max(counts) * E rows there)."""
        offs = torch.cumsum(counts, 0).to(torch.int32)

        def per_row(p):  # (E, 1, D) -> (M, D): each row's expert's vector
            return p.squeeze(1).index_select(0, row_expert)

        if self.norm_weight is not None:
            x = F.layer_norm(x, (self.embed_dim,)) * per_row(self.norm_weight) + per_row(self.norm_bias)
        h = self.activation(F.grouped_mm(x, self.fc1_weight, offs=offs) + per_row(self.fc1_bias))
        h = F.dropout(h, self.dropout, self.training)
        return F.grouped_mm(h, self.fc2_weight, offs=offs) + per_row(self.fc2_bias)


def dispatch_to_experts(x: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor, experts: ExpertFFN) -> torch.Tensor:
    """Send each token to its experts, run them batched, and sum the weighted outputs.

    x: (N, H); expert_index: (N, k) long, -1 where an assignment was dropped;
    weight: (N, k) combine weight of each assignment. Returns (N, H): sum_k w_k f_{e_k}(x),
    zero for a token with no kept assignment (it passes through the caller's residual).
    """
    num_tokens, k = expert_index.shape
    flat_expert = expert_index.reshape(-1)
    token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)
    kept = flat_expert >= 0
    flat_expert, token, flat_weight = flat_expert[kept], token[kept], weight.reshape(-1)[kept]

    # assignments grouped by expert (stable: token order inside each expert)
    order = torch.argsort(flat_expert, stable=True)
    flat_expert, token, flat_weight = flat_expert[order], token[order], flat_weight[order]
    counts = torch.bincount(flat_expert, minlength=experts.num_experts)  # (E,)
    routed = x.index_select(0, token)  # (M, H), grouped by expert
    if experts.world_size > 1:  # experts on other ranks: exactly the routed rows travel
        out = expert_parallel.run_sharded_experts(experts, routed, counts)  # (M, H), same order
    else:
        out = _run_in_slots(experts, routed, flat_expert, counts)
    out = out * flat_weight.unsqueeze(-1).to(out.dtype)  # (M, H)
    return out.new_zeros(x.shape).index_add_(0, token, out).to(x.dtype)


def _run_in_slots(experts: ExpertFFN, routed: torch.Tensor, flat_expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """routed (M, H) grouped by expert -> expert outputs (M, H), run batched on (E, C, H) slots."""
    # slot of each assignment inside its expert: rank among the assignments to that expert;
    # flat slot e * C + i. index_select / index_copy are the fast CPU paths (2-D advanced
    # indexing is several times slower, forward and backward)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(flat_expert.numel(), device=routed.device) - starts[flat_expert]
    capacity = int(counts.max()) if flat_expert.numel() else 0
    num_experts, hidden = experts.num_experts, routed.size(-1)  # explicit shapes: capacity may be 0
    if flat_expert.numel() == num_experts * capacity:  # balanced: slots are already in order
        return experts(routed.view(num_experts, capacity, hidden)).reshape(-1, hidden)
    if experts.can_run_grouped(routed):  # uneven: no padding slots to compute
        return experts.forward_grouped(routed, flat_expert, counts)
    flat_slot = flat_expert * capacity + slot
    buffer = routed.new_zeros(num_experts * capacity, hidden).index_copy(0, flat_slot, routed)
    out = experts(buffer.view(num_experts, capacity, hidden))
    return out.reshape(-1, hidden).index_select(0, flat_slot)
