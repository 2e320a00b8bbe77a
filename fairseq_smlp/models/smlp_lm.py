"""sMLP: a sparse all-MLP language model (Yu et al. 2022, arXiv 2203.06850).

A stack of gMLP blocks, no attention and no position embeddings. Blocks chosen by
--sparse-every / --sparse-layers are sparse: their spatial gate is an sMoE (token
mixing experts) and a tMoE (feature mixing experts, Base-layer routing) follows them.
With no sparse block it is a dense gMLP (the `gmlp_lm_*` archs).
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
)
from fairseq.models.transformer import Embedding
from fairseq.modules import LayerNorm
from omegaconf import II
from torch import Tensor

from ..distributed import expert_parallel
from ..modules.blocks import GatedMLPBlock, SparseBlock
from ..modules.spatial_gating import SpatialGateArgs, SpatialGatingUnit
from ..moe.compile import compile_moe
from ..moe.router import BatchLayout, batch_layout, check_expert_count, layout_routers, name_routers
from ..moe.feed_forward_moe import FeedForwardMoE, MoEArgs
from ..validation import check_config
from .archs import register_archs


@dataclass
class SmlpConfig(FairseqDataclass):
    decoder_embed_dim: int = field(default=512, metadata={"help": "hidden size H of the residual stream"})
    decoder_ffn_embed_dim: int = field(
        default=2048, metadata={"help": "gMLP width F (U: H -> F; the gate half has F/2 channels)"}
    )
    decoder_layers: int = field(default=6, metadata={"help": "number of blocks (dense + sparse)"})
    sparse_every: int = field(
        default=2, metadata={"help": "every k-th block is sparse (blocks k-1, 2k-1, ...); 0: all dense"}
    )
    sparse_layers: Optional[str] = field(
        default=None, metadata={"help": "comma-separated block indices that are sparse (overrides --sparse-every)"}
    )
    smoe_experts: int = field(
        default=4, metadata={"help": "spatial experts per sparse block (must divide the chunked channels)"}
    )
    smoe_routing: ChoiceEnum(["deterministic", "partial"]) = field(
        default="deterministic", metadata={"help": "sMoE routing of channel chunks to spatial experts"}
    )
    smoe_chunk: ChoiceEnum(["gate", "all"]) = field(
        default="gate",
        metadata={
            "help": "what sMoE chunks: the gate half Z2 (gMLP-style) or all of Z "
            "(no split; Z gated by its own token mixing)"
        },
    )
    partial_prefix_ratio: float = field(
        default=0.2,
        metadata={"help": "partial prediction: share of the positions the router reads; the loss covers the rest"},
    )
    partial_balance: ChoiceEnum(["assignment", "aux_loss"]) = field(
        default="assignment",
        metadata={"help": "partial prediction: balanced assignment, or first choice + Switch auxiliary loss"},
    )
    tmoe_experts: int = field(default=4, metadata={"help": "feature-mixing (tMoE) experts per sparse block"})
    tmoe_router: ChoiceEnum(["base", "top1", "top1_biased", "sinkhorn", "causal_balanced"]) = field(
        default="base",
        metadata={
            "help": "tMoE routing: base (the paper's: Base Layers' balanced assignment in training, "
            "greedy at evaluation, output mixed by sigmoid(x . c_e)), top1 (Switch: softmax gate, "
            "capacity factor --tmoe-train-capacity-factor in training filled position by position, none at evaluation, "
            "auxiliary loss weighted by --moe-aux-loss-weight) or top1_biased (auxiliary-loss-free "
            "balancing: top-1 of sigmoid score + a per-expert bias nudged after each update, same "
            "routing in training and evaluation, nothing dropped), sinkhorn (S-BASE: causal Sinkhorn "
            "balancing in training, greedy at evaluation) or causal_balanced (tokens in position order, "
            "each to its best expert with room left, same routing at evaluation); see docs/routers.md"
        },
    )
    tmoe_balance_scope: ChoiceEnum(["micro-batch", "global-batch"]) = field(
        default="micro-batch",
        metadata={
            "help": "--tmoe-router top1: the load share f_e of the balance loss counted over this micro-batch, or over "
            "every micro-batch of the update so far summed over the data-parallel workers (global-batch)"
        },
    )
    tmoe_train_capacity_factor: float = field(
        default=1.25,
        metadata={
            "help": "--tmoe-router top1: training capacity per expert, ceil(factor * ceil(tokens / experts)); "
            "<= 0: no limit (nothing dropped: training routes as evaluation does)"
        },
    )
    tmoe_bias_update_rate: float = field(
        default=0.001,
        metadata={"help": "--tmoe-router top1_biased: bias += rate * sign(mean load - load) after each update"},
    )
    tmoe_router_z_loss: float = field(
        default=0.0,
        metadata={
            "help": "--tmoe-router top1 / top1_biased: router z-loss (ST-MoE), added to the layer's aux loss, "
            "itself weighted by --moe-aux-loss-weight; 0: off"
        },
    )
    tmoe_ffn_embed_dim: int = field(default=2048, metadata={"help": "hidden width of each tMoE expert FFN"})
    expert_init: ChoiceEnum(["dense", "zero_output"]) = field(
        default="dense",
        metadata={
            "help": "tMoE experts: dense (start as a dense FFN: nn.Linear's init, as the Transformer "
            "MoE baselines' experts) or zero_output (output weight 0: the tMoE adds nothing at first)"
        },
    )
    expert_dropout: float = field(
        default=0.0, metadata={"help": "dropout on the hidden activations inside every tMoE expert"}
    )
    balanced_assignment: ChoiceEnum(["torch", "libbase"]) = field(
        default="torch",
        metadata={
            "help": "solver of the balanced assignments (tMoE training, --partial-balance assignment): "
            "torch (vectorised dual prices, exact optimum when prices converge) or fairseq's compiled libbase auction"
        },
    )
    smoe_expert_parallel: bool = field(
        default=False,
        metadata={
            "help": "shard the sMoE spatial experts over the data-parallel workers (deterministic routing; default: "
            "replicated on every worker)"
        },
    )
    moe_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the MoE hot paths (experts' batched forward, partial-prediction sMoE mixing); "
            "off by default, eager with one log line where the compiler cannot run"
        },
    )
    spatial_init_eps: float = field(
        default=1e-3, metadata={"help": "spatial matrices start uniform in +-eps/T_max (bias 1)"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and block outputs"})
    share_decoder_input_output_embed: bool = field(default=True, metadata={"help": "tie input and output embeddings"})
    max_target_positions: Optional[int] = II("task.max_target_positions")
    tokens_per_sample: int = II("task.tokens_per_sample")


def sparse_block_indices(cfg) -> List[int]:
    """Which blocks are sparse, from --sparse-layers or --sparse-every."""
    if cfg.sparse_layers:
        try:
            indices = sorted({int(i) for i in str(cfg.sparse_layers).split(",")})
        except ValueError:
            raise ValueError(f"--sparse-layers must be comma-separated integers, got {cfg.sparse_layers!r}")
        bad = [i for i in indices if not 0 <= i < cfg.decoder_layers]
        if bad:
            raise ValueError(
                f"--sparse-layers {bad} outside 0..{cfg.decoder_layers - 1} (--decoder-layers {cfg.decoder_layers})"
            )
        return indices
    if cfg.sparse_every < 0:
        raise ValueError(f"--sparse-every must be >= 0, got {cfg.sparse_every}")
    if cfg.sparse_every == 0:
        return []
    return [i for i in range(cfg.decoder_layers) if (i + 1) % cfg.sparse_every == 0]


@register_model("smlp_lm", dataclass=SmlpConfig)
class SmlpLanguageModel(FairseqLanguageModel):
    @classmethod
    def build_model(cls, cfg, task):
        check_config(cfg)  # ranges of every numeric flag (validation.py)
        if cfg.max_target_positions is None:
            cfg.max_target_positions = cfg.tokens_per_sample
        if cfg.smoe_routing == "partial" and not getattr(task, "scores_partial_prediction", False):
            raise ValueError(
                "--smoe-routing partial needs --task smlp_language_modeling (for fairseq-train and "
                "fairseq-eval-lm alike): positions inside the routing prefix saw the future and must "
                "not be scored, and only that task tells fairseq-eval-lm so"
            )
        embed_tokens = Embedding(len(task.source_dictionary), cfg.decoder_embed_dim, task.source_dictionary.pad())
        model = cls(SmlpDecoder(cfg, task.target_dictionary, embed_tokens))
        # built with all experts, then distributed over the data-parallel workers
        expert_parallel.parallelize_experts(model, *expert_parallel.data_parallel_layout())
        if cfg.moe_compile:
            compile_moe(model)
        return model


class SmlpDecoder(FairseqIncrementalDecoder):
    """tokens (B, T) -> logits (B, T, V), extra {"moe_stats": [...], "score_from": P}."""

    def __init__(self, cfg, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        self.max_target_positions = cfg.max_target_positions
        self.embed_tokens = embed_tokens
        self.dropout = nn.Dropout(cfg.dropout)
        sparse = set(sparse_block_indices(cfg))
        self.layers = nn.ModuleList(
            build_sparse_block(cfg) if i in sparse else build_dense_block(cfg) for i in range(cfg.decoder_layers)
        )
        self.final_norm = LayerNorm(cfg.decoder_embed_dim)
        self.output_projection = nn.Linear(cfg.decoder_embed_dim, len(dictionary), bias=False)
        if cfg.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, std=cfg.decoder_embed_dim**-0.5)
        name_routers(self)  # routers label their statistics with their place
        # positions before score_from were read by a partial-prediction router: not scored
        self.score_from = max((m.prefix_length for m in self.modules() if isinstance(m, SpatialGatingUnit)), default=0)

    def forward(
        self, prev_output_tokens: Tensor, encoder_out=None, incremental_state=None, features_only: bool = False,
        **kwargs,
    ):
        x, extra = self.extract_features(prev_output_tokens, incremental_state)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(self, tokens: Tensor, incremental_state=None, **kwargs):
        new_length = tokens.size(1)  # T_new: positions whose outputs the caller asks for, the newest
        if incremental_state is not None:
            done = self._advance(incremental_state, tokens.size(1))
            new_length = tokens.size(1) - done
            if 0 < done < self.score_from <= tokens.size(1):
                # the routing prefix is complete only now: every block's history of positions
                # < score_from was computed with a partial prefix's routing; recompute it all
                # with the final routing, as the full forward does (blocks after a partial one
                # mix those positions into scored ones)
                self._forget_history(incremental_state)
                done = 0
            tokens = tokens[:, done:]
        x = self.dropout(self.embed_tokens(tokens))  # (B, T, H)
        moe_stats = []
        # routers that balance position by position learn where each position starts
        start = done if incremental_state is not None else 0
        layout = BatchLayout(tokens.size(0), start=start, incremental_state=incremental_state)
        with batch_layout(layout_routers(self), layout):
            for layer in self.layers:
                x, stats = layer(x, incremental_state)
                moe_stats.extend(stats)
        # "attn": None because fairseq's SequenceGenerator reads it from every decoder
        extra = {"moe_stats": moe_stats, "score_from": self.score_from, "attn": None}
        return self.final_norm(x[:, -new_length:]), extra

    def _advance(self, incremental_state, length: int) -> int:
        """Number of positions already decoded; records that `length` are known now."""
        saved = self.get_incremental_state(incremental_state, "steps")
        done = int(saved["length"].item()) if saved is not None else 0
        self.set_incremental_state(incremental_state, "steps", {"length": torch.tensor(length)})
        return done

    def _forget_history(self, incremental_state) -> None:
        for module in self.modules():
            if isinstance(module, SpatialGatingUnit):
                module.forget_history(incremental_state)

    def output_layer(self, features: Tensor) -> Tensor:
        return self.output_projection(features)

    def max_positions(self) -> int:
        return self.max_target_positions

    def reorder_incremental_state(self, incremental_state, new_order):
        pass  # the spatial gating units reorder their own histories


def build_dense_block(cfg) -> GatedMLPBlock:
    args = SpatialGateArgs(
        channels=cfg.decoder_ffn_embed_dim // 2, max_positions=cfg.max_target_positions, init_eps=cfg.spatial_init_eps
    )
    gate = SpatialGatingUnit(args)
    return GatedMLPBlock(cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim, gate, split_gate=True, dropout=cfg.dropout)


def build_sparse_block(cfg) -> SparseBlock:
    check_expert_count(cfg.smoe_experts, "--smoe-experts")
    check_expert_count(cfg.tmoe_experts, "--tmoe-experts")
    split_gate = cfg.smoe_chunk == "gate"
    gate = SpatialGatingUnit(
        SpatialGateArgs(
            channels=cfg.decoder_ffn_embed_dim // 2 if split_gate else cfg.decoder_ffn_embed_dim,
            max_positions=cfg.max_target_positions,
            num_experts=cfg.smoe_experts,
            routing=str(cfg.smoe_routing),
            prefix_ratio=cfg.partial_prefix_ratio,
            balance=str(cfg.partial_balance),
            solver=str(cfg.balanced_assignment),
            init_eps=cfg.spatial_init_eps,
            expert_parallel=cfg.smoe_expert_parallel,
        )
    )
    token_mixing = GatedMLPBlock(cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim, gate, split_gate, cfg.dropout)
    router = str(getattr(cfg, "tmoe_router", "base"))
    tmoe = MoEArgs(
        router=router,
        num_experts=cfg.tmoe_experts,
        embed_dim=cfg.decoder_embed_dim,
        ffn_dim=cfg.tmoe_ffn_embed_dim,
        solver=str(cfg.balanced_assignment),
        expert_init=str(cfg.expert_init),
        expert_dropout=cfg.expert_dropout,
        bias_update_rate=getattr(cfg, "tmoe_bias_update_rate", 0.001),
        balance_scope=str(getattr(cfg, "tmoe_balance_scope", "micro-batch")),
        z_loss_weight=getattr(cfg, "tmoe_router_z_loss", 0.0),
        train_capacity_factor=getattr(cfg, "tmoe_train_capacity_factor", 1.25),
    )
    # base: the paper's routing, bit-for-bit (its training assignment sees the whole batch anyway)
    feature_moe = FeedForwardMoE(tmoe) if router == "base" else PositionMajorMoE(tmoe)
    return SparseBlock(token_mixing, feature_moe, cfg.dropout)


class PositionMajorMoE(FeedForwardMoE):
    """The tMoE on sMLP's batch-first (B, T, H) states, routed position-major: the router
    sees all sequences' position t before position t+1, so first-come-first-served capacity
    makes a token compete only with tokens at earlier or equal positions, never with later
    positions of other sequences (as fairseq's time-major Transformer layers do)."""

    def forward(self, x: torch.Tensor):
        if x.dim() != 3:
            return super().forward(x)
        out, stats = super().forward(x.transpose(0, 1))  # (T, B, H)
        return out.transpose(0, 1), stats


# ---------------------------------------------------------------- architectures
# blocks 1, 3, ... sparse (--sparse-every 2); a tMoE expert per GPU at large/9b scale
SIZES = {
    "tiny": dict(decoder_embed_dim=128, decoder_ffn_embed_dim=512, decoder_layers=4,
                 smoe_experts=4, tmoe_experts=4, tmoe_ffn_embed_dim=256),
    "base": dict(decoder_embed_dim=768, decoder_ffn_embed_dim=3072, decoder_layers=12,
                 smoe_experts=16, tmoe_experts=16, tmoe_ffn_embed_dim=3072),
    "large": dict(decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, decoder_layers=24,
                  smoe_experts=32, tmoe_experts=32, tmoe_ffn_embed_dim=4096),
    # the paper's scaled deterministic sMLP, about 9.4B parameters at 1,024 tokens and a 51k
    # vocabulary: 64 tMoE experts, one per GPU of a 64-GPU run
    "9b": dict(
        decoder_embed_dim=1024,
        decoder_ffn_embed_dim=4096,
        decoder_layers=32,
        smoe_experts=32,
        tmoe_experts=64,
        tmoe_ffn_embed_dim=4096,
        smoe_routing="deterministic",
    ),
}


def _describe(d: dict) -> str:
    sparse = d["decoder_layers"] // 2
    return (
        f"{d['decoder_layers']} blocks of width {d['decoder_embed_dim']} (FFN {d['decoder_ffn_embed_dim']}), "
        f"{sparse} sparse with {d['smoe_experts']} spatial and {d['tmoe_experts']} feature experts"
    )


register_archs("smlp_lm", "smlp_lm", {size: dict(d, sparse_every=2) for size, d in SIZES.items()}, describe=_describe)
