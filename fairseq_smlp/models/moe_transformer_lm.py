"""Transformer-MoE baselines of the sMLP paper, in fairseq's own Transformer LM.

One model, `moe_transformer_lm`, a subclass of fairseq's `transformer_lm`: every
--moe-freq-th layer (layers k-1, 2k-1, ...) has its FFN replaced by a token-routed MoE
(FeedForwardMoE: a router + ExpertFFN, the dispatch path shared with sMLP's tMoE):

    --moe-router top1   Switch (Fedus et al. 2021)       archs switch_lm_*
    --moe-router top2   GShard (Lepikhin et al. 2020)    archs gshard_lm_*
    --moe-router hash   HASH Layers (Roller et al. 2021) archs hash_lm_*
    --moe-router none   no token MoE; with --base-layers N: Base Layers (Lewis et al.
                        2021) with --base-experts E experts   archs base_lm_*

Base layers: built with all E experts in one BaseExpertsLayer (moe/base_experts.py); with
several data-parallel workers, expert parallelism puts fairseq's own BaseLayer in its place
(one expert per worker, E = W). --base-experts 0: fairseq's BaseLayer, one expert per worker.

The dense baselines `transformer_lm_*` are fairseq's `transformer_lm` with matched sizes.
The decoder returns the routing statistics of every MoE layer in extra["moe_stats"] for
the `moe_cross_entropy` criterion.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from fairseq.models.transformer import TransformerConfig, TransformerDecoder
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from ..distributed import expert_parallel
from ..moe.base_experts import BaseExpertsLayer
from ..moe.fairseq_base_layer import FairseqBaseLayer, check_base_layer_layout
from ..moe.router import (
    BatchLayout, HashRouter, balanced_hash_table, batch_layout, check_expert_count, layout_routers, name_routers,
    random_hash_table,
)
from ..moe.compile import compile_moe
from ..moe.feed_forward_moe import FeedForwardMoE, MoEArgs
from ..validation import check_config
from .archs import register_archs


def build_base_layer(cfg, args):
    """One Base layer. cfg: fairseq's TransformerConfig; args: the model's arguments (our own
    fields). --base-experts E >= 1: all E experts in one BaseExpertsLayer (with W = E workers,
    parallelize_experts gives rank r fairseq's BaseLayer holding expert r); 0: fairseq's
    BaseLayer, one expert per worker."""
    experts = args.base_experts or 0
    if experts >= 1:
        return BaseExpertsLayer(
            cfg.decoder.embed_dim, cfg.decoder.ffn_embed_dim, experts, cfg.base_sublayers,
            activation=str(cfg.activation_fn), dropout=args.expert_dropout or 0.0, shuffle=bool(cfg.base_shuffle),
        )
    return FairseqBaseLayer(cfg)


@dataclass
class MoETransformerLanguageModelConfig(TransformerLanguageModelConfig):
    moe_router: ChoiceEnum(["top1", "top2", "hash", "top1_biased", "sinkhorn", "causal_balanced", "none"]) = field(
        default="top1",
        metadata={
            "help": "token MoE routing: top1 (Switch), top2 (GShard), hash (HASH Layers), top1_biased "
            "(auxiliary-loss-free balancing), sinkhorn (S-BASE: causal Sinkhorn balancing in training, greedy "
            "in evaluation), causal_balanced (tokens in position order, each to its best expert with room left; "
            "same routing in evaluation), none (dense FFNs; Base Layers come from --base-layers); docs/routers.md"
        },
    )
    moe_balance_scope: ChoiceEnum(["micro-batch", "global-batch"]) = field(
        default="micro-batch",
        metadata={
            "help": "top1/top2: the load share f_e of the balance loss counted over this micro-batch, or over every "
            "micro-batch of the update so far summed over the data-parallel workers (global-batch); docs/routers.md"
        },
    )
    moe_bias_update_rate: float = field(
        default=0.001,
        metadata={"help": "--moe-router top1_biased: bias += rate * sign(mean load - load) after each update"},
    )
    moe_freq: int = field(
        default=2, metadata={"help": "every k-th layer (layers k-1, 2k-1, ...) has an MoE FFN; 0: none"}
    )
    moe_experts: int = field(default=4, metadata={"help": "experts per MoE layer"})
    moe_expert_ffn_dim: int = field(
        default=0, metadata={"help": "hidden width of each expert FFN; 0: --decoder-ffn-embed-dim"}
    )
    moe_train_capacity_factor: float = field(
        default=1.25,
        metadata={
            "help": "top1/top2 training capacity per expert: ceil(factor * ceil(tokens / experts)); <= 0: no limit"
        },
    )
    moe_eval_capacity_factor: float = field(
        default=0.0,
        metadata={
            "help": "capacity factor in evaluation; <= 0 (default): no limit, so routing is per token and incremental "
            "decoding matches"
        },
    )
    moe_second_expert_policy: ChoiceEnum(["sampling", "all", "random"]) = field(
        default="sampling",
        metadata={
            "help": "top2, training only: second expert sampled from the softmax, always the runner-up, or the "
            "runner-up kept with probability 2*g2/(g1+g2)"
        },
    )
    moe_second_expert_queue: ChoiceEnum(["causal", "gshard"]) = field(
        default="causal",
        metadata={
            "help": "top2 capacity queue: causal (token order, each token's first choice just before "
            "its second) or gshard (all first choices before any second: in training a later token "
            "can take an earlier token's slot, so the LM sees the future when tokens are dropped)"
        },
    )
    moe_router_z_loss: float = field(
        default=0.0,
        metadata={
            "help": "top1/top2/top1_biased: router z-loss weight relative to the balance loss "
            "(added to the layer's aux loss, itself weighted by --moe-aux-loss-weight; 0: off)"
        },
    )
    hash_type: ChoiceEnum(["balanced", "random"]) = field(
        default="balanced",
        metadata={
            "help": "hash: token-id -> expert table, balanced by the dictionary's token counts or uniform at random"
        },
    )
    hash_seed: int = field(default=0, metadata={"help": "hash: seed of the random table"})
    expert_init: ChoiceEnum(["dense", "zero_output"]) = field(
        default="dense",
        metadata={
            "help": "top1/top2/hash experts: dense (each expert starts as the dense FFN it replaces, "
            "as Switch, GShard, HASH and fairseq's MoE do) or zero_output (output weight 0, "
            "Base Layers' convention). Base layers always start as Base Layers do"
        },
    )
    expert_dropout: float = field(
        default=0.0,
        metadata={
            "help": "dropout on the hidden activations inside every expert (top1/top2/hash experts and the Base "
            "layer's experts; Switch's 'expert dropout')"
        },
    )
    base_experts: int = field(
        default=0,
        metadata={
            "help": "experts of each Base layer. In one process: all of them in the process "
            "(BaseExpertsLayer); with W workers: fairseq's BaseLayer, one expert per worker, "
            "so it must be W. 0: one per worker (one process: a single expert)"
        },
    )
    moe_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the MoE hot paths (experts' batched forward, partial-prediction sMoE mixing); "
            "off by default, eager with one log line where the compiler cannot run"
        },
    )


def is_moe_layer(index: int, moe_freq: int) -> bool:
    return moe_freq > 0 and (index + 1) % moe_freq == 0


def check_moe_args(args) -> None:
    """Clear errors for flags that cannot work, before anything is built."""
    if args.moe_freq < 0:
        raise ValueError(f"--moe-freq must be >= 0, got {args.moe_freq}")
    if args.moe_router != "none" and args.moe_freq > 0:
        check_expert_count(args.moe_experts, "--moe-experts", per_item=2 if args.moe_router == "top2" else 1)
        if args.scale_fc:
            raise ValueError("--scale-fc (a LayerNorm inside the FFN) is not supported in MoE layers")
        if (args.activation_dropout or 0) > 0 or (args.relu_dropout or 0) > 0:
            raise ValueError(
                "--activation-dropout / --relu-dropout (dropout inside the FFN) is not supported in MoE layers; "
                "use --expert-dropout"
            )
        if (args.quant_noise_pq or 0) > 0:
            raise ValueError("--quant-noise-pq is not supported in MoE layers")
    if args.character_embeddings or args.adaptive_input:
        raise ValueError(
            "moe_transformer_lm supports plain token embeddings only (no --character-embeddings / --adaptive-input)"
        )


# ----------------------------------------------------------------- token MoE layers
class MoEFeedForward(FeedForwardMoE):
    """A FeedForwardMoE that fits where fairseq's fc1 goes: returns the output only and keeps
    its RoutingStats in `last_stats` for the decoder to collect."""

    last_stats = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, B, H) time-major, as fairseq's layers see it -> (T, B, H)."""
        out, self.last_stats = super().forward(x)
        return out


def build_moe_ffn(args, dictionary) -> MoEFeedForward:
    activation = str(args.activation_fn)
    if not hasattr(torch.nn.functional, activation):
        raise ValueError(
            f"--activation-fn {activation} is not available for expert FFNs (use relu, gelu, silu or tanh)"
        )
    router, num_experts = str(args.moe_router), args.moe_experts
    table = None
    if router == "hash":
        balanced = str(args.hash_type) == "balanced"
        if balanced:
            table = balanced_hash_table(dictionary.count, num_experts)
        else:
            table = random_hash_table(len(dictionary), num_experts, args.hash_seed)
    return MoEFeedForward(
        MoEArgs(
            router=router,
            num_experts=num_experts,
            embed_dim=args.decoder_embed_dim,
            ffn_dim=args.moe_expert_ffn_dim or args.decoder_ffn_embed_dim,
            expert_norm=False,  # the layer's own final_layer_norm already normalises the FFN input
            activation=activation,
            train_capacity_factor=args.moe_train_capacity_factor,
            eval_capacity_factor=args.moe_eval_capacity_factor,
            z_loss_weight=args.moe_router_z_loss,
            second_expert_policy=str(args.moe_second_expert_policy),
            hash_table=table,
            second_expert_queue=str(getattr(args, "moe_second_expert_queue", "causal")),
            expert_init=str(args.expert_init),
            expert_dropout=args.expert_dropout or 0.0,
            bias_update_rate=getattr(args, "moe_bias_update_rate", 0.001),
            balance_scope=str(getattr(args, "moe_balance_scope", "micro-batch")),
        )
    )


class MoETransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's pre-norm decoder layer with its FFN replaced by a token MoE.

    fairseq computes x + dropout(fc2(act(fc1(LN(x))))). Here fc1 is the whole MoE
    (H -> H) and act / its dropout / fc2 are identities, so fairseq's own forward
    (attention, norms, dropout, residual) runs unchanged: x + dropout(MoE(LN(x))).
    A token the MoE dropped gets 0 from it and passes through the residual.
    """

    def __init__(self, cfg: TransformerConfig, moe_ffn: MoEFeedForward, no_encoder_attn: bool = True):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)  # fc1, fc2: placeholders, see below
        self.fc1 = moe_ffn
        self.activation_fn = _identity
        self.activation_dropout_module = nn.Identity()

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()  # no dense FFN is ever allocated; the MoE takes its place

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()


def _identity(x):
    return x


# ----------------------------------------------------------------- decoder and model
class MoETransformerDecoder(TransformerDecoder):
    """fairseq's TransformerDecoder with MoE FFNs every --moe-freq layers and Base
    Layers that run in one process. extract_features returns
    (B, T, H) features and extra {"attn", "inner_states", "moe_stats": [RoutingStats]}."""

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=True):
        self._layers_built = 0  # build_decoder_layer is called once per layer, in order
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        name_routers(self)  # routers label their statistics with their place
        for name, module in self.named_modules():
            if isinstance(module, FairseqBaseLayer):
                module.name = f"{name}.base_layer"
            elif isinstance(module, BaseExpertsLayer):  # logged as moe_L<i>_base_layer_*, as fairseq's
                module.router.name = f"{name}.base_layer"
        self.hash_routers = [m for m in self.modules() if isinstance(m, HashRouter)]

    @property
    def moe_modules(self) -> list:
        """The layers that report RoutingStats (looked up each time: expert parallelism may
        put fairseq's BaseLayer in the place of a Base layer after the decoder is built)."""
        return [m for m in self.modules() if isinstance(m, (MoEFeedForward, FairseqBaseLayer, BaseExpertsLayer))]

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        index, self._layers_built = self._layers_built, self._layers_built + 1
        if self.args.moe_router == "none" or not is_moe_layer(index, self.args.moe_freq):
            return super().build_decoder_layer(cfg, no_encoder_attn)
        cfg = TransformerConfig.from_namespace(cfg)
        layer = MoETransformerDecoderLayer(cfg, build_moe_ffn(self.args, self.dictionary), no_encoder_attn)
        if cfg.checkpoint_activations:
            layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
        return layer

    def build_output_projection(self, args, dictionary, embed_tokens):
        """fairseq inserts its BaseLayers here; ours go at the same places (layer
        ((i + 1) * L) // (N + 1) for the i-th of N), built by build_base_layer."""
        cfg = TransformerConfig.from_namespace(args)
        num_base_layers = cfg.base_layers
        cfg.base_layers = 0  # fairseq's own BaseLayer would need a process group
        try:
            super().build_output_projection(cfg, dictionary, embed_tokens)
        finally:
            cfg.base_layers = num_base_layers
        for i in range(num_base_layers):
            place = ((i + 1) * cfg.decoder.layers) // (num_base_layers + 1)
            self.layers.insert(place, build_base_layer(cfg, self.args))

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        newest = prev_output_tokens[:, -1:] if incremental_state is not None else prev_output_tokens
        for router in self.hash_routers:
            router.set_token_ids(newest.t().reshape(-1))  # (T*B,) time-major, as the layers flatten
        moe_modules = self.moe_modules
        for module in moe_modules:
            module.last_stats = None  # layerdrop may skip a layer: no stale statistics
        # incremental decoding runs the newest position only; the layers flatten (T, B) position-major
        start = prev_output_tokens.size(1) - 1 if incremental_state is not None else 0
        layout = BatchLayout(prev_output_tokens.size(0), start, incremental_state)
        try:
            with batch_layout(layout_routers(self), layout):
                x, extra = super().extract_features(prev_output_tokens, encoder_out, incremental_state, **kwargs)
        finally:
            for router in self.hash_routers:
                router.set_token_ids(None)
        extra["moe_stats"] = [m.last_stats for m in moe_modules if m.last_stats is not None]
        return x, extra


@register_model("moe_transformer_lm", dataclass=MoETransformerLanguageModelConfig)
class MoETransformerLanguageModel(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        check_config(args)  # ranges of every numeric flag (validation.py)
        check_moe_args(args)
        if args.decoder_layers_to_keep:
            raise ValueError(
                "--decoder-layers-to-keep is not supported by moe_transformer_lm (MoE layers sit at fixed places)"
            )
        if args.max_target_positions is None:
            args.max_target_positions = args.tokens_per_sample
        embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        model = cls(MoETransformerDecoder(args, task.target_dictionary, embed_tokens, no_encoder_attn=True))
        # built with all experts, then distributed over the data-parallel workers
        expert_parallel.parallelize_experts(model, *expert_parallel.data_parallel_layout())
        if getattr(args, "moe_compile", False):
            compile_moe(model)
        return model

    def load_state_dict(self, state_dict, *args, **kwargs):
        check_base_layer_layout(self, state_dict)
        return super().load_state_dict(state_dict, *args, **kwargs)


# ----------------------------------------------------------------- architectures
# Sizes are FLOP-matched to smlp_lm_* (see docs/baselines.md and fairseq_smlp/flops.py):
# with F_smlp = 4H and tMoE experts of width W, two sMLP blocks (one dense, one sparse)
# cost what two Transformer layers of FFN width 3H (base, large) or 2H (tiny) cost.
SIZES = {
    #        H     heads layers FFN   experts  (smlp_lm_* of the same size)
    "tiny": (128, 4, 4, 256, 4),
    "base": (768, 12, 12, 2304, 16),
    "large": (1024, 16, 24, 3072, 32),
    "9b": (1024, 16, 32, 3072, 64),  # the scaled comparison: 64 GPUs, one expert each (smlp_lm_9b)
}


def _register(model: str, family: str, doc: str, **family_defaults):
    """Register {family}_tiny/base/large/9b on `model`; a default may be a {size: value} dict
    (sizes it leaves out keep fairseq's default)."""
    sizes = {}
    for size, (embed_dim, heads, layers, ffn_dim, experts) in SIZES.items():
        defaults = dict(
            decoder_embed_dim=embed_dim,
            decoder_input_dim=embed_dim,
            decoder_output_dim=embed_dim,
            decoder_attention_heads=heads,
            decoder_layers=layers,
            decoder_ffn_embed_dim=ffn_dim,
            share_decoder_input_output_embed=True,
        )
        if model == "moe_transformer_lm":
            defaults["moe_experts"] = experts
        for name, value in family_defaults.items():
            if not isinstance(value, dict):
                defaults[name] = value
            elif size in value:
                defaults[name] = value[size]
        sizes[size] = defaults
    describe = lambda d: f"{doc}: {d['decoder_layers']} layers of width {d['decoder_embed_dim']}"  # noqa: E731
    # base_lm_architecture: fairseq's transformer_lm defaults for the rest (pre-norm, ...)
    register_archs(model, family, sizes, describe, finish=base_lm_architecture)


_register("transformer_lm", "transformer_lm", "dense Transformer LM, FLOP-matched to smlp_lm")
# 9b: the scaled comparison of the paper (Switch 9B, GShard 9B, HASH/Base 10B next to sMLP
# 9.4B on 64 GPUs): experts as wide as smlp_lm_9b's (4H), dense FFNs narrowed to 2H so the
# FLOPs per token stay those of smlp_lm_9b
SCALED = dict(decoder_ffn_embed_dim={"9b": 2048}, moe_expert_ffn_dim={"9b": 4096})
_register(
    "moe_transformer_lm",
    "switch_lm",
    "Switch: top-1 MoE FFN every other layer",
    moe_router="top1",
    moe_freq=2,
    moe_train_capacity_factor=1.25,
    **SCALED,
)
# top-2 sends each token through two experts: experts half as wide keep the FLOPs
_register(
    "moe_transformer_lm",
    "gshard_lm",
    "GShard: top-2 MoE FFN every other layer",
    moe_router="top2",
    moe_freq=2,
    moe_train_capacity_factor=2.0,
    decoder_ffn_embed_dim={"9b": 2048},
    moe_expert_ffn_dim={"tiny": 128, "base": 1152, "large": 1536, "9b": 2048},
)
_register(
    "moe_transformer_lm",
    "hash_lm",
    "HASH Layers: token-id-routed MoE FFN every other layer",
    moe_router="hash",
    moe_freq=2,
    **SCALED,
)
# Base Layers: fairseq inserts N whole BASE layers (each S FFN sublayers of width F) into a
# shallower Transformer; as many experts as smlp_lm_* has tMoE experts (one per worker in a
# multi-worker run)
_register(
    "moe_transformer_lm",
    "base_lm",
    "Base Layers: --base-layers with --base-experts experts",
    moe_router="none",
    moe_freq=0,
    base_layers=1,
    base_shuffle=1,
    base_experts={size: s[4] for size, s in SIZES.items()},
    decoder_layers={"tiny": 3, "base": 10, "large": 20, "9b": 17},
    base_sublayers={"tiny": 3, "base": 4, "large": 8, "9b": 18},
    decoder_ffn_embed_dim={"tiny": 240, "base": 2304, "large": 3072, "9b": 4096},
)
