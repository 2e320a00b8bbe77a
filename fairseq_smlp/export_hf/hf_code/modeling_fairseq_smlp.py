"""Language models trained with fairseq-smlp, for Hugging Face transformers.

sMLP (Yu et al. 2022, "Efficient Language Modeling with Sparse all-MLP"), dense gMLP and the
Transformer-MoE baselines (Switch, GShard, HASH Layers, Base Layers), as exported by
`python -m fairseq_smlp.export_hf`. Standalone: torch and transformers only.

The model is a stack of blocks named in `config.blocks`:

    "gmlp"       dense gMLP block:  Z = GELU(LN(X) U);  Y = X + (Z1 * SGU(Z2)) V
    "smlp"       sparse sMLP block: the gMLP block with an sMoE gate (token mixing experts),
                 then Y = H + tMoE(H) (feature mixing experts, Base-layer routing)
    "attention"  pre-norm Transformer layer with a dense FFN
    "moe"        pre-norm Transformer layer whose FFN is a token-routed MoE
                 (config.moe_router: "top1" Switch, "top2" GShard, "hash" HASH Layers)
    "base"       a Base layer (Lewis et al. 2021): residual FFN experts, greedy routing

Routing is fairseq-smlp's evaluation routing, in training mode as well (fine-tuning here does
not rebalance experts and adds no auxiliary loss): tMoE and Base layers greedy top-1;
Switch/GShard top-1/top-2 with the evaluation capacity (config.moe_eval_capacity_factor,
<= 0: no limit); HASH by the token-id table carried over from the checkpoint; partial-prediction
sMoE by its balanced assignment over channels, read from the first `score_from` positions,
which the loss then leaves out.

Shapes: B batch, T new positions, S all positions (cached + new), H hidden, F FFN width,
C gate channels, E experts, V vocabulary.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5: init functions that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = nn.init
# the output field generate() reads the cache from (renamed from past_key_values in transformers 5.x)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class FairseqSmlpConfig(PretrainedConfig):
    """Everything the blocks need; written by the exporter from the fairseq checkpoint."""

    model_type = "fairseq_smlp"

    def __init__(
        self,
        vocab_size: int = 50264,
        hidden_size: int = 512,
        blocks=("gmlp",),
        max_position_embeddings: int = 1024,
        # embeddings and output
        embed_scale: float = 1.0,  # fairseq multiplies token embeddings by sqrt(H) in Transformers
        # "none" (sMLP: the spatial matrices carry position) | "sinusoidal" | "learned"
        position_embedding: str = "none",
        input_dim: Optional[int] = None,  # token embedding width (projected to H when different)
        output_dim: Optional[int] = None,  # width the output layer reads (projected from H when different)
        layernorm_embedding: bool = False,
        final_norm: bool = True,
        # dropout (training only)
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        # gMLP / sMLP
        ffn_dim: int = 2048,  # gMLP width F, or the Transformer's dense FFN width
        smoe_experts: int = 1,
        smoe_chunk: str = "gate",  # sMoE chunks the gate half Z2 ("gate") or all of Z ("all")
        smoe_routing: str = "deterministic",  # "deterministic" (chunk e -> expert e) | "partial"
        partial_prefix_length: int = 0,  # P: positions the partial-prediction router reads
        partial_balance: str = "assignment",  # "assignment" | "aux_loss"
        tmoe_experts: int = 1,
        tmoe_ffn_dim: int = 2048,
        # Transformer
        num_attention_heads: int = 8,
        activation_function: str = "relu",
        moe_router: str = "none",  # "moe" blocks: "top1" | "top2" | "hash"
        moe_experts: int = 1,
        moe_expert_ffn_dim: int = 2048,
        moe_eval_capacity_factor: float = 0.0,  # <= 0: no capacity limit
        moe_second_expert_queue: str = "causal",  # top2 capacity queue: "causal" | "gshard"
        base_experts: int = 1,
        base_sublayers: int = 1,
        # loss
        score_from: int = 0,  # positions < score_from are not scored (partial prediction)
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        unk_token_id: int = 3,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.blocks = list(blocks)
        self.num_hidden_layers = len(self.blocks)
        self.max_position_embeddings = max_position_embeddings
        self.embed_scale, self.position_embedding = embed_scale, position_embedding
        self.input_dim = input_dim or hidden_size
        self.output_dim = output_dim or hidden_size
        self.layernorm_embedding, self.final_norm = layernorm_embedding, final_norm
        self.dropout, self.attention_dropout, self.activation_dropout = dropout, attention_dropout, activation_dropout
        self.ffn_dim = ffn_dim
        self.smoe_experts, self.smoe_chunk, self.smoe_routing = smoe_experts, smoe_chunk, smoe_routing
        self.partial_prefix_length, self.partial_balance = partial_prefix_length, partial_balance
        self.tmoe_experts, self.tmoe_ffn_dim = tmoe_experts, tmoe_ffn_dim
        self.num_attention_heads, self.activation_function = num_attention_heads, activation_function
        self.moe_router, self.moe_experts, self.moe_expert_ffn_dim = moe_router, moe_experts, moe_expert_ffn_dim
        self.moe_eval_capacity_factor, self.moe_second_expert_queue = moe_eval_capacity_factor, moe_second_expert_queue
        self.base_experts, self.base_sublayers = base_experts, base_sublayers
        self.score_from = score_from
        self.unk_token_id = unk_token_id
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )


# ----------------------------------------------------------------------------- helpers
def gelu(x):
    """fairseq's gelu: exact (erf), computed in fp32."""
    return F.gelu(x.float()).type_as(x)


def gelu_accurate(x):
    """fairseq's gelu_accurate (tanh approximation)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


ACTIVATIONS = {
    "relu": F.relu, "gelu": gelu, "gelu_accurate": gelu_accurate, "gelu_fast": gelu_accurate,
    "tanh": torch.tanh, "silu": F.silu, "linear": lambda x: x, "relu_squared": lambda x: F.relu(x).pow(2),
}


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-5)  # fairseq's LayerNorm


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> torch.Tensor:
    """fairseq's sinusoidal positions (tensor2tensor layout: sin half, then cos half);
    row padding_idx is zero, real positions start at padding_idx + 1."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float).unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[padding_idx] = 0
    return table


class SinusoidalPositions(nn.Module):
    """positions (B, T) in fairseq's numbering -> (B, T, H). No weights: computed on the fly."""

    def __init__(self, dim: int, padding_idx: int):
        super().__init__()
        self.dim, self.padding_idx = dim, padding_idx

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        table = sinusoidal_table(int(positions.max()) + 1, self.dim, self.padding_idx).to(positions.device)
        return table[positions]


# ----------------------------------------------------------------------------- experts and routers
class ExpertFFN(nn.Module):
    """E feed-forward experts with stacked weights: expert e maps (N, H) -> (N, H) as
    W2_e act(W1_e LN_e(x) + b1_e) + b2_e, with a per-expert LayerNorm when pre_norm (tMoE)."""

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, pre_norm: bool, activation: str):
        super().__init__()
        self.num_experts, self.dim = num_experts, dim
        self.norm_weight = nn.Parameter(torch.ones(num_experts, 1, dim)) if pre_norm else None
        self.norm_bias = nn.Parameter(torch.zeros(num_experts, 1, dim)) if pre_norm else None
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))  # (E, H, F)
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, 1, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.zeros(num_experts, ffn_dim, dim))  # (E, F, H)
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, 1, dim))
        self.activation = ACTIVATIONS[activation]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x: (N, H) tokens routed to expert e -> (N, H)."""
        if self.norm_weight is not None:
            x = F.layer_norm(x, (self.dim,)) * self.norm_weight[e] + self.norm_bias[e]
        h = self.activation(x @ self.fc1_weight[e] + self.fc1_bias[e])
        return h @ self.fc2_weight[e] + self.fc2_bias[e]


def combine_experts(
    x: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor, experts: ExpertFFN
) -> torch.Tensor:
    """x: (N, H); expert_index: (N, k), -1 = dropped; weight: (N, k) -> sum_k w_k expert_{e_k}(x), (N, H).
    A token no expert kept gets 0 (it passes through the caller's residual)."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = (expert_index == e).nonzero(as_tuple=True)
        if token.numel():
            y = experts.expert(e, x[token])
            out.index_add_(0, token, y * weight[token, slot].unsqueeze(1).to(y.dtype))
    return out


class BaseRouter(nn.Module):
    """tMoE routing of sMLP at evaluation: the token's best centroid, weight sigmoid(x . c_e)."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.centroids = nn.Parameter(torch.empty(num_experts, dim))  # (E, H)

    def forward(self, x: torch.Tensor, token_ids=None):
        """x: (N, H) -> expert_index (N, 1), weight (N, 1) fp32."""
        scores = x.float() @ self.centroids.float().t()  # (N, E), fp32 like fairseq
        expert = scores.argmax(-1, keepdim=True)
        return expert, torch.sigmoid(scores.gather(1, expert))


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(factor * ceil(N / E)); factor <= 0: no limit."""
    if capacity_factor <= 0:
        return num_tokens
    return int(math.ceil(capacity_factor * math.ceil(num_tokens / num_experts)))


def within_capacity(expert: torch.Tensor, capacity: int, num_experts: int, offset=None) -> torch.Tensor:
    """expert: (N,) in priority order (earlier tokens first) -> kept (N,) bool: first come, first served."""
    one_hot = F.one_hot(expert, num_experts)
    position = (torch.cumsum(one_hot, dim=0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)
    if offset is not None:
        position = position + offset[expert]
    return position < capacity


class Top1Router(nn.Module):
    """Switch routing at evaluation: most probable expert, weight its probability; tokens beyond
    the evaluation capacity are dropped."""

    def __init__(self, dim: int, num_experts: int, capacity_factor: float):
        super().__init__()
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor, token_ids=None):
        """x: (N, H) in priority order -> expert_index (N, 1) (-1 = dropped), weight (N, 1)."""
        probs = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)
        gate, first = probs.max(dim=-1)
        capacity = expert_capacity(x.size(0), self.num_experts, self.capacity_factor)
        kept = within_capacity(first, capacity, self.num_experts)
        return torch.where(kept, first, -1).unsqueeze(1), (gate * kept).unsqueeze(1)


class Top2Router(Top1Router):
    """GShard routing at evaluation: the two most probable experts; weights renormalised over
    the kept experts. Capacity queue (config.moe_second_expert_queue): "causal", tokens in
    order, each one's first choice just before its second; "gshard", all first choices
    before any second choice."""

    def __init__(self, dim: int, num_experts: int, capacity_factor: float, queue: str = "causal"):
        super().__init__(dim, num_experts, capacity_factor)
        self.queue = queue

    def forward(self, x: torch.Tensor, token_ids=None):
        """x: (N, H) -> expert_index (N, 2) (-1 = dropped), weight (N, 2)."""
        logits = F.linear(x.float(), self.gate.weight.float())
        probs = torch.softmax(logits, dim=-1)
        first = probs.argmax(dim=-1)
        second = logits.scatter(1, first.unsqueeze(1), float("-inf")).argmax(dim=-1)
        capacity = expert_capacity(x.size(0), self.num_experts, self.capacity_factor)
        experts = torch.stack([first, second], dim=1)
        if self.queue == "causal":
            kept = within_capacity(experts.reshape(-1), capacity, self.num_experts).view_as(experts)
        else:
            keep1 = within_capacity(first, capacity, self.num_experts)
            firsts = torch.bincount(first, minlength=self.num_experts)
            keep2 = within_capacity(second, capacity, self.num_experts, offset=firsts)
            kept = torch.stack([keep1, keep2], dim=1)
        gates = torch.stack([probs.gather(1, first[:, None])[:, 0], probs.gather(1, second[:, None])[:, 0]], dim=1)
        gates = gates * kept
        weight = gates / gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).tiny)
        return torch.where(kept, experts, -1), weight


class HashRouter(nn.Module):
    """HASH Layers routing: expert = table[token id], weight 1. The table is a saved buffer."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.register_buffer("table", torch.zeros(vocab_size, dtype=torch.long))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor):
        """x: (N, H), token_ids: (N,) -> expert_index (N, 1), weight (N, 1) ones."""
        return self.table[token_ids].unsqueeze(1), torch.ones(x.size(0), 1, device=x.device)


class FeedForwardMoE(nn.Module):
    """A router and its experts: x -> sum_k w_k expert_{e_k}(x) (the caller adds the residual)."""

    def __init__(self, router: nn.Module, experts: ExpertFFN):
        super().__init__()
        self.router, self.experts = router, experts

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (A, B', H) -> same shape; tokens take priority in the order of the flattened (A, B')."""
        flat = x.reshape(-1, x.size(-1))
        ids = token_ids.reshape(-1) if token_ids is not None else None
        expert_index, weight = self.router(flat, ids)
        return combine_experts(flat, expert_index, weight, self.experts).view_as(x)


# ----------------------------------------------------------------------------- sMLP / gMLP
class CausalTokenMixing(nn.Module):
    """Per-expert causal spatial projection (the T x T matrices of gMLP's gate):
    y[b, t, e, :] = sum_{s <= t} W[e, t, s] x[b, s, e, :] + bias[e, t]. Positions are absolute."""

    def __init__(self, num_experts: int, max_positions: int):
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(num_experts, max_positions, max_positions))  # (E, T_max, T_max)
        self.bias = nn.Parameter(torch.ones(num_experts, max_positions))  # (E, T_max)

    def forward(self, x: torch.Tensor, first_output: int = 0) -> torch.Tensor:
        """x: (B, S, E, c) all positions -> (B, S - first_output, E, c), rows first_output..S-1."""
        bsz, n, num_experts, c = x.shape
        if n > self.max_positions:
            raise ValueError(
                f"sequence of {n} tokens is longer than the spatial matrices of this model "
                f"(config.max_position_embeddings = {self.max_positions}, the training length)"
            )
        weight = torch.tril(self.weight[:, first_output:n, :n], diagonal=first_output)
        x_e = x.permute(2, 1, 0, 3).reshape(num_experts, n, bsz * c)  # (E, S, B*c)
        y_e = torch.baddbmm(self.bias[:, first_output:n].unsqueeze(-1).to(x.dtype), weight.to(x.dtype), x_e)
        return y_e.view(num_experts, n - first_output, bsz, c).permute(2, 1, 0, 3)


class PrefixChannelRouter(nn.Module):
    """Partial-prediction sMoE routing: assigns the C channels of each sequence to E experts
    (C/E each) from the first P positions only: score[b, c, e] = sum_{t<P} z[b, t, c] R[t, e]."""

    def __init__(self, prefix_length: int, num_experts: int, balance: str):
        super().__init__()
        self.balance = balance
        self.weight = nn.Parameter(torch.empty(prefix_length, num_experts))  # (P, E)

    def forward(self, z: torch.Tensor):
        """z: (B, S, C) -> order (B, C) channels listed expert by expert, weight (B, C) of each."""
        prefix = z[:, : self.weight.size(0)].float()
        scores = torch.einsum("bpc,pe->bce", prefix, self.weight[: prefix.size(1)].float())  # (B, C, E)
        if self.balance == "assignment":
            expert = balanced_assignment(scores)
            weight = torch.sigmoid(scores.gather(2, expert.unsqueeze(-1)).squeeze(-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            expert = first_choice_with_spill(probs)
            weight = probs.gather(2, expert.unsqueeze(-1)).squeeze(-1)
        order = torch.argsort(expert, dim=1, stable=True)
        return order, weight.gather(1, order)


class SpatialGatingUnit(nn.Module):
    """u: (B, T, C) -> gate (B, T, C) = W LN(u) + b, the C channels cut into E chunks each
    mixed by its own causal matrix (E = 1: gMLP's gate; E > 1: sMoE)."""

    def __init__(self, channels: int, max_positions: int, num_experts: int, router: Optional[PrefixChannelRouter]):
        super().__init__()
        self.num_experts = num_experts
        self.norm = layer_norm(channels)
        self.mixing = CausalTokenMixing(num_experts, max_positions)
        self.router = router
        self.cache_index = None  # set by the model: this gate keeps its inputs in the cache

    def forward(self, u: torch.Tensor, cache=None) -> torch.Tensor:
        z = self.norm(u)  # (B, T, C)
        new = z.size(1)
        if cache is not None:  # the mixing reads every past position: keep them (as one-head "keys")
            z = cache.update(z.unsqueeze(1), z[..., :0].unsqueeze(1), self.cache_index)[0].squeeze(1)  # (B, S, C)
        bsz, n, channels = z.shape
        first_output = n - new
        if self.router is None:  # deterministic: chunk e -> expert e
            groups = z.view(bsz, n, self.num_experts, channels // self.num_experts)
            return self.mixing(groups, first_output).reshape(bsz, new, channels)
        order, weight = self.router(z)
        by_expert = z.gather(2, order.unsqueeze(1).expand(-1, n, -1))
        groups = by_expert.view(bsz, n, self.num_experts, channels // self.num_experts)
        mixed = self.mixing(groups, first_output).reshape(bsz, new, channels) * weight.unsqueeze(1).to(z.dtype)
        return torch.empty_like(mixed).scatter_(2, order.unsqueeze(1).expand(-1, new, -1), mixed)


class GatedMLPBlock(nn.Module):
    """gMLP block: Z = GELU(LN(X) U); Y = X + (Z1 * gate(Z2)) V (split), or X + (Z * gate(Z)) V."""

    def __init__(self, config: FairseqSmlpConfig, gate: SpatialGatingUnit, split_gate: bool = True):
        super().__init__()
        dim, ffn_dim = config.hidden_size, config.ffn_dim
        self.norm = layer_norm(dim)
        self.proj_in = nn.Linear(dim, ffn_dim)  # U
        self.gate = gate
        self.split_gate = split_gate
        self.proj_out = nn.Linear(ffn_dim // 2 if split_gate else ffn_dim, dim)  # V
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache=None, **unused) -> torch.Tensor:
        """x: (B, T, H) -> (B, T, H)."""
        z = gelu(self.proj_in(self.norm(x)))  # (B, T, F)
        value, gate_in = z.chunk(2, dim=-1) if self.split_gate else (z, z)
        return x + self.dropout(self.proj_out(value * self.gate(gate_in, cache)))


class SparseBlock(nn.Module):
    """sMLP sparse block: H = gMLP block with an sMoE gate (token mixing); Y = H + tMoE(H)."""

    def __init__(self, config: FairseqSmlpConfig):
        super().__init__()
        split_gate = config.smoe_chunk == "gate"
        channels = config.ffn_dim // 2 if split_gate else config.ffn_dim
        router = None
        if config.smoe_routing == "partial":
            router = PrefixChannelRouter(config.partial_prefix_length, config.smoe_experts, config.partial_balance)
        gate = SpatialGatingUnit(channels, config.max_position_embeddings, config.smoe_experts, router)
        self.token_mixing = GatedMLPBlock(config, gate, split_gate)
        experts = ExpertFFN(
            config.tmoe_experts, config.hidden_size, config.tmoe_ffn_dim, pre_norm=True, activation="gelu"
        )
        self.feature_moe = FeedForwardMoE(BaseRouter(config.hidden_size, config.tmoe_experts), experts)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache=None, **unused) -> torch.Tensor:
        h = self.token_mixing(x, cache)
        return h + self.dropout(self.feature_moe(h))


def dense_gmlp_block(config: FairseqSmlpConfig) -> GatedMLPBlock:
    gate = SpatialGatingUnit(config.ffn_dim // 2, config.max_position_embeddings, 1, None)
    return GatedMLPBlock(config, gate)


# ----------------------------------------------------------------------------- Transformer
class SelfAttention(nn.Module):
    """fairseq's multi-head self-attention: q scaled by head_dim^-0.5 after its projection."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.cache_index = None  # set by the model

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cache=None) -> torch.Tensor:
        """x: (B, T, H); allowed: (B, 1, T, S) bool, which keys each query may read -> (B, T, H)."""
        bsz, new, dim = x.shape

        def heads(t):  # (B, T, H) -> (B, heads, T, head_dim)
            return t.view(bsz, new, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x) * self.head_dim ** -0.5)
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)  # (B, heads, S, head_dim)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, torch.finfo(q.dtype).min)  # (B, heads, T, S)
        probs = self.dropout(torch.softmax(scores.float(), dim=-1).type_as(scores))
        return self.out_proj((probs @ v).transpose(1, 2).reshape(bsz, new, dim))


class TransformerLayer(nn.Module):
    """fairseq's pre-norm decoder layer: x + Attn(LN(x)), then x + FFN(LN(x)).
    FFN: dense fc2(act(fc1(.))), or a token MoE ("moe" blocks)."""

    def __init__(self, config: FairseqSmlpConfig, moe: bool):
        super().__init__()
        dim = config.hidden_size
        self.self_attn = SelfAttention(dim, config.num_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = layer_norm(dim)
        self.final_layer_norm = layer_norm(dim)
        self.activation = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        if moe:
            router = build_token_router(config)  # built first: the order of random initialisation
            experts = ExpertFFN(
                config.moe_experts, dim, config.moe_expert_ffn_dim, pre_norm=False,
                activation=config.activation_function,
            )
            self.moe = FeedForwardMoE(router, experts)
        else:
            self.moe = None
            self.fc1, self.fc2 = nn.Linear(dim, config.ffn_dim), nn.Linear(config.ffn_dim, dim)

    def forward(self, x: torch.Tensor, allowed=None, cache=None, token_ids=None, **unused) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), allowed, cache))
        h = self.final_layer_norm(x)
        if self.moe is not None:  # fairseq's layers see (T, B, H): tokens queue time-major for capacity
            h = self.moe(h.transpose(0, 1), token_ids.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.fc2(self.activation_dropout(self.activation(self.fc1(h))))
        return x + self.dropout(h)


def build_token_router(config: FairseqSmlpConfig) -> nn.Module:
    if config.moe_router == "top1":
        return Top1Router(config.hidden_size, config.moe_experts, config.moe_eval_capacity_factor)
    if config.moe_router == "top2":
        return Top2Router(config.hidden_size, config.moe_experts, config.moe_eval_capacity_factor,
                          getattr(config, "moe_second_expert_queue", "causal"))
    if config.moe_router == "hash":
        return HashRouter(config.vocab_size)
    raise ValueError(f"config.moe_router must be top1, top2 or hash, got {config.moe_router!r}")


class BaseSublayer(nn.Module):
    """One residual FFN of a Base-layer expert: x + ff2(act(ff1(LN(x))))."""

    def __init__(self, config: FairseqSmlpConfig):
        super().__init__()
        self.norm = layer_norm(config.hidden_size)
        self.ff1 = nn.Linear(config.hidden_size, config.ffn_dim)
        self.ff2 = nn.Linear(config.ffn_dim, config.hidden_size)
        self.activation = ACTIVATIONS[config.activation_function]

    def forward(self, x):
        return x + self.ff2(self.activation(self.ff1(self.norm(x))))


class BaseLayer(nn.Module):
    """Base Layers at evaluation: each token goes to the expert of its best centroid;
    out = a * expert(x) + (1 - a) * x with a = sigmoid(x . c_e). An expert is a stack of
    residual FFN sublayers."""

    def __init__(self, config: FairseqSmlpConfig):
        super().__init__()
        self.centroids = nn.Parameter(torch.empty(config.base_experts, config.hidden_size))  # (E, H)
        self.experts = nn.ModuleList(
            nn.Sequential(*[BaseSublayer(config) for _ in range(config.base_sublayers)])
            for _ in range(config.base_experts)
        )

    def forward(self, x: torch.Tensor, **unused) -> torch.Tensor:
        """x: (B, T, H) -> (B, T, H)."""
        flat = x.reshape(-1, x.size(-1))
        scores = flat.float() @ self.centroids.float().t()  # (N, E), in fp32 as fairseq routes Base layers
        expert = scores.argmax(-1)
        out = torch.empty_like(flat)
        for e, network in enumerate(self.experts):
            token = (expert == e).nonzero(as_tuple=True)[0]
            if token.numel():
                routed = flat[token]
                alpha = torch.sigmoid(scores[token, e]).unsqueeze(1).to(flat.dtype)
                out[token] = alpha * network(routed) + (1 - alpha) * routed
        return out.view_as(x)


# ----------------------------------------------------------------------------- the model
BLOCKS = {
    "gmlp": dense_gmlp_block,
    "smlp": SparseBlock,
    "attention": lambda config: TransformerLayer(config, moe=False),
    "moe": lambda config: TransformerLayer(config, moe=True),
    "base": BaseLayer,
}


class FairseqSmlpPreTrainedModel(PreTrainedModel):
    config_class = FairseqSmlpConfig
    base_model_prefix = "model"
    _no_split_modules = ["GatedMLPBlock", "SparseBlock", "TransformerLayer", "BaseLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """A fresh model (not an export) starts as fairseq-smlp's does."""
        super()._init_weights(module)
        if isinstance(module, CausalTokenMixing):  # near zero, bias 1: each block starts as a plain FFN
            eps = 1e-3 / module.max_positions
            init.uniform_(module.weight, -eps, eps)
            init.ones_(module.bias)
        elif isinstance(module, ExpertFFN):
            bound = module.dim ** -0.5
            init.uniform_(module.fc1_weight, -bound, bound)
            for p in (module.fc1_bias, module.fc2_weight, module.fc2_bias, module.norm_bias):
                if p is not None:
                    init.zeros_(p)
            if module.norm_weight is not None:
                init.ones_(module.norm_weight)
        elif isinstance(module, (BaseRouter, BaseLayer)):
            init.orthogonal_(module.centroids, gain=0.1)
        elif isinstance(module, PrefixChannelRouter):
            init.normal_(module.weight, std=module.weight.size(0) ** -0.5)


class FairseqSmlpModel(FairseqSmlpPreTrainedModel):
    """tokens (B, T) -> features (B, T, output_dim)."""

    def __init__(self, config: FairseqSmlpConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.input_dim, config.pad_token_id)
        self.project_in = None
        if config.input_dim != config.hidden_size:
            self.project_in = nn.Linear(config.input_dim, config.hidden_size, bias=False)
        if config.position_embedding == "sinusoidal":
            self.embed_positions = SinusoidalPositions(config.hidden_size, config.pad_token_id)
        elif config.position_embedding == "learned":  # fairseq numbers positions from padding_idx + 1
            positions = config.max_position_embeddings + config.pad_token_id + 1
            self.embed_positions = nn.Embedding(positions, config.hidden_size, config.pad_token_id)
        else:
            self.embed_positions = None
        self.layernorm_embedding = layer_norm(config.hidden_size) if config.layernorm_embedding else None
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(BLOCKS[kind](config) for kind in config.blocks)
        self.final_norm = layer_norm(config.hidden_size) if config.final_norm else None
        self.project_out = None
        if config.output_dim != config.hidden_size:
            self.project_out = nn.Linear(config.hidden_size, config.output_dim, bias=False)
        cached = [m for m in self.modules() if isinstance(m, (SelfAttention, SpatialGatingUnit))]
        for index, module in enumerate(cached):
            module.cache_index = index  # one cache entry per attention / spatial gate, in order
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, cache=None
    ) -> torch.Tensor:
        """input_ids: (B, T) new tokens; attention_mask: (B, S) 1 = token, 0 = padding, over the
        cached and new positions; cache: a DynamicCache or None -> (B, T, output_dim)."""
        bsz, new = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            not_pad = attention_mask[:, -(past + new):].bool()  # (B, S)
        else:
            not_pad = torch.cat([input_ids.new_ones(bsz, past, dtype=torch.bool), input_ids.ne(self.padding_idx)], 1)
        x = self.config.embed_scale * self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.embed_positions is not None:  # fairseq's numbering: padding_idx + count of real tokens so far
            positions = (torch.cumsum(not_pad.long(), 1) * not_pad + self.padding_idx)[:, -new:]
            x = x + self.embed_positions(positions).to(x.dtype)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout(x)

        allowed = None
        if any(kind in ("attention", "moe") for kind in self.config.blocks):
            # query i (absolute past + i) reads key j <= past + i that is not padding: (B, 1, T, S)
            causal = torch.ones(new, past + new, dtype=torch.bool, device=x.device).tril(diagonal=past)
            allowed = (causal.unsqueeze(0) & not_pad.unsqueeze(1)).unsqueeze(1)
        elif attention_mask is not None and bool((not_pad[:, 1:] & ~not_pad[:, :-1]).any()):
            raise ValueError(
                "left padding (a 0 before a 1 in attention_mask) is not supported by sMLP/gMLP: their spatial "
                "matrices mix tokens by absolute position. Pad on the right, or generate for prompts of equal length"
            )
        for layer in self.layers:
            x = layer(x, allowed=allowed, cache=cache, token_ids=input_ids)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class FairseqSmlpForCausalLM(FairseqSmlpPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FairseqSmlpConfig):
        super().__init__(config)
        self.model = FairseqSmlpModel(config)
        self.lm_head = nn.Linear(config.output_dim, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own DynamicCache (spatial gates store inputs, not keys/values)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache=None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids: (B, T); labels: (B, T) (-100 = not scored), the usual shift inside ->
        loss, logits (B, T, V) (the last `logits_to_keep` positions if > 0), cache."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if use_cache is None:
            use_cache = cache is not None
        if use_cache and cache is None:
            cache = DynamicCache()
        features = self.model(input_ids, attention_mask, cache if use_cache else None)
        if logits_to_keep and labels is None:
            features = features[:, -logits_to_keep:]
        logits = self.lm_head(features)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.score_from, kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, score_from: int = 0, num_items_in_batch=None
) -> torch.Tensor:
    """Mean token cross-entropy of position t predicting labels[t + 1]. Positions t < score_from
    are left out: with partial-prediction routing they fed the router (fairseq-smlp scores the same)."""
    target = labels[:, 1:].clone()
    if score_from > 0:
        target[:, :score_from] = -100
    scores = logits[:, :-1].float().reshape(-1, logits.size(-1))
    nll = F.cross_entropy(scores, target.reshape(-1), ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else target.ne(-100).sum()
    return nll / count


# ----------------------------------------------------------------------------- balanced assignment
# The partial-prediction router assigns channels with fairseq-smlp's balanced assignment (its
# `torch` solver) at evaluation too; the same algorithm is repeated here so the routing is identical.
def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, N, E) -> expert (B, N): N/E items per expert (loads differ by at most one)
    maximising the total score; each of the B problems solved independently."""
    num_items, num_experts = scores.shape[-2:]
    capacity = torch.full((num_experts,), num_items // num_experts, dtype=torch.long, device=scores.device)
    capacity[num_experts - num_items % num_experts :] += num_items % num_experts > 0
    return _price_assignment(scores.detach().float(), capacity)


def _price_assignment(scores: torch.Tensor, capacity: torch.Tensor, max_sweeps: int = 50) -> torch.Tensor:
    """Expert prices by coordinate descent on the LP dual: each item takes its best expert under
    scores - prices; when every expert then holds its capacity the assignment is optimal.
    What is left unbalanced after max_sweeps is settled by _fill_by_preference."""
    *batch, num_items, num_experts = scores.shape
    if num_experts == 1:
        return scores.new_zeros(scores.shape[:-1], dtype=torch.long)
    slots = capacity.tolist()
    scores_t = scores.transpose(-1, -2).contiguous()  # (..., E, N)
    adjusted = scores_t.clone()
    for _ in range(max_sweeps):
        for e in range(num_experts):
            adjusted[..., e, :] = float("-inf")
            gain = scores_t[..., e, :] - adjusted.amax(-2)
            adjusted[..., e, :] = scores_t[..., e, :] - _clearing_price(gain, slots[e]).unsqueeze(-1)
        if torch.equal((adjusted == adjusted.amax(-2, keepdim=True)).sum(-1), capacity.expand(*batch, -1)):
            return adjusted.transpose(-1, -2).contiguous().argmax(-1)
    flat = adjusted.reshape(-1, num_experts, num_items)
    return torch.stack([_fill_by_preference(a.t(), capacity) for a in flat]).view(*batch, num_items)


def _clearing_price(gain: torch.Tensor, slots: int) -> torch.Tensor:
    """gain (..., N) -> (...): a price at which exactly `slots` items have a higher gain."""
    if slots == 0:
        return gain.amax(-1) + 1
    if slots >= gain.size(-1):
        return gain.amin(-1) - 1
    return gain.topk(slots + 1, dim=-1).values[..., -2:].mean(-1)


def _fill_by_preference(adjusted: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """(N, E) -> (N,): exactly capacity[e] items per expert, each as high on its preference list as
    possible; in round r the unplaced items ask for their r-th choice, largest regret first."""
    num_items, num_experts = adjusted.shape
    ranked, choices = adjusted.sort(dim=1, descending=True, stable=True)
    regret = ranked - torch.cat([ranked[:, 1:], ranked[:, -1:]], 1)
    expert = torch.full((num_items,), -1, dtype=torch.long, device=adjusted.device)
    free = capacity.clone()
    for r in range(num_experts):
        asking = (expert < 0).nonzero().squeeze(1)
        if asking.numel() == 0:
            break
        choice = choices[asking, r]
        by_regret = torch.argsort(regret[asking, r], descending=True, stable=True)
        order = by_regret[torch.argsort(choice[by_regret], stable=True)]
        counts = torch.bincount(choice, minlength=num_experts)
        rank = torch.arange(order.numel(), device=adjusted.device) - (torch.cumsum(counts, 0) - counts)[choice[order]]
        taken = order[rank < free[choice[order]]]
        expert[asking[taken]] = choice[taken]
        free -= torch.bincount(choice[taken], minlength=num_experts)
    return expert


def first_choice_with_spill(probs: torch.Tensor) -> torch.Tensor:
    """probs (B, C, E) -> expert (B, C), C/E channels per expert: each expert keeps its most
    confident first-choice channels; the rest fill the free slots, most confident first."""
    bsz, channels, num_experts = probs.shape
    per_expert = channels // num_experts
    top_prob, first = probs.max(-1)
    by_expert = torch.argsort(first.float() * 2 - top_prob, dim=1)
    sorted_first = first.gather(1, by_expert)
    expert_ids = torch.arange(num_experts, device=probs.device).expand(bsz, -1).contiguous()
    group_start = torch.searchsorted(sorted_first, expert_ids)
    rank_sorted = torch.arange(channels, device=probs.device) - group_start.gather(1, sorted_first)
    rank = torch.empty_like(rank_sorted).scatter_(1, by_expert, rank_sorted)
    kept = rank < per_expert
    slot = torch.where(kept, first * per_expert + rank, torch.full_like(first, -1))
    occupied = torch.zeros(bsz, channels + 1, dtype=torch.int8, device=probs.device)
    occupied.scatter_(1, torch.where(kept, slot, channels), 1)
    free_slots = torch.argsort(occupied[:, :channels], dim=1, stable=True)
    spill_order = torch.argsort(torch.where(kept, 2.0, 1.0 - top_prob), dim=1, stable=True)
    is_spill = torch.arange(channels, device=probs.device) < (~kept).sum(1, keepdim=True)
    slot = slot.scatter(1, spill_order, torch.where(is_spill, free_slots, slot.gather(1, spill_order)))
    return slot // per_expert
