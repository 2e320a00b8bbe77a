"""fairseq-smlp checkpoint -> a Hugging Face config and state dict, with a ledger of every tensor.

Per family, one small function makes the transformers config and one rename table maps the
fairseq state-dict keys onto the transformers model's keys (FAMILIES at the bottom). The
ledger (`map_state_dict`) refuses an export in which a fairseq tensor (parameter or
persistent buffer: every expert, every HASH table) would be left out, two tensors would land
on one place, a place would stay empty, or a shape would disagree with the checkpoint's own
configuration (an extra or a missing expert).
"""
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import UserError

# rank files of any world size are resharded to one worker first (checkpoints/reshard.py)
from ..checkpoints.reshard import rank_files, reshard


class ExportError(UserError, ValueError):
    """The checkpoint cannot be exported as it is; the message says why and what to do."""


# ----------------------------------------------------------------------------- reading a checkpoint
@contextmanager
def single_worker_checkpoint(path: str, work_dir: Optional[str] = None):
    """Yield the path of a one-worker checkpoint: `path` itself, or its rank files
    (checkpoint_last-rank-R.pt, given as checkpoint_last.pt or as one of them) resharded into a
    temporary folder in `work_dir` (the export's own folder: a 9B merge does not fit /tmp),
    removed when the block ends."""
    rank_file = re.match(r"(.*)-rank-\d+\.pt$", path)
    common = f"{rank_file.group(1)}.pt" if rank_file else path
    if os.path.exists(common):
        yield common
        return
    with tempfile.TemporaryDirectory(prefix=".export_hf_merge_", dir=work_dir) as tmp:
        merged = os.path.join(tmp, "merged.pt")
        try:  # reshard reports bad input (no rank files, one missing) with sys.exit
            reshard(rank_files([common]), 1, merged)
        except SystemExit as e:
            raise ExportError(str(e)) from None
        yield merged


def load_checkpoint(path: str) -> dict:
    """fairseq's loader (the plugin names a corrupt file); cfg becomes an OmegaConf config."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fairseq_smlp  # noqa: F401  (registers the models; atomic / explained checkpoint loads)

    if not os.path.exists(path):
        raise ExportError(f"checkpoint {path} does not exist (nor any {path[:-3]}-rank-R.pt)")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    if state.get("cfg") is None and state.get("args") is not None:
        state["cfg"] = convert_namespace_to_omegaconf(state["args"])
    if state.get("cfg") is None or "model" not in state:
        raise ExportError(f"{path} is not a fairseq checkpoint (no 'cfg'/'args' or no 'model')")
    meta = state.get("expert_parallel") or {}
    if meta.get("world_size", 1) > 1:
        raise ExportError(
            f"{path} holds rank {meta['rank']} of {meta['world_size']} workers: pass the common name (checkpoint_X.pt)"
        )
    return state


def model_family(model_cfg) -> str:
    """The registered model of the checkpoint's arch: smlp_lm, transformer_lm or moe_transformer_lm."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    arch = model_cfg.get("_name") or model_cfg.get("arch")
    name = ARCH_MODEL_NAME_REGISTRY.get(arch, arch)
    if name not in FAMILIES:
        raise ExportError(f"--arch {arch} (model {name}) cannot be exported: supported models are {sorted(FAMILIES)}")
    return name


# ----------------------------------------------------------------------------- the ledger
Rules = List[Tuple[str, str]]  # (regular expression over a fairseq key, its transformers key)
BOOKKEEPING = ("decoder.version",)  # fairseq's state-dict format marker: no weight, nothing to export


def rename(key: str, rules: Rules) -> Optional[str]:
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def map_state_dict(
    state: Dict[str, torch.Tensor], rules: Rules, expected: Dict[str, torch.Size]
) -> Dict[str, torch.Tensor]:
    """fairseq state dict -> transformers state dict, each tensor accounted for exactly once.

    expected: the transformers model's keys and shapes (tied weights appear under both names,
    as in the fairseq state dict). Raises ExportError listing every leftover, clash, gap and
    shape mismatch."""
    mapped, source, leftover, clashes, shapes = {}, {}, [], [], []
    for key, tensor in state.items():
        if key in BOOKKEEPING:
            continue
        target = rename(key, rules)
        if target is None or target not in expected:
            leftover.append(f"{key} -> {target or '(no rule)'}")
        elif target in mapped:
            clashes.append(f"{source[target]} and {key} -> {target}")
        elif tuple(tensor.shape) != tuple(expected[target]):
            shapes.append(f"{key} {tuple(tensor.shape)} -> {target} {tuple(expected[target])}")
        else:
            mapped[target], source[target] = tensor, key
    missing = [k for k in expected if k not in mapped]
    problems = [
        (leftover, "checkpoint tensors with no place in the exported model (they would be lost)"),
        (clashes, "checkpoint tensors mapped onto the same exported tensor (one would be lost)"),
        (shapes, "shapes that disagree with the checkpoint's configuration (an expert missing or duplicated?)"),
        (missing, "exported tensors that no checkpoint tensor fills"),
    ]
    message = "; ".join(f"{what}: {', '.join(items)}" for items, what in problems if items)
    if message:
        raise ExportError(f"export refused, the checkpoint does not map one-to-one: {message}")
    return mapped


# ----------------------------------------------------------------------------- configs per family
def hf_modules():
    """The exported modelling code, imported from its file in this package."""
    from .hf_code import modeling_fairseq_smlp

    return modeling_fairseq_smlp


def smlp_config(m, vocab_size: int):
    """sMLP and dense gMLP (arch smlp_lm_*, gmlp_lm_*)."""
    from ..models.smlp_lm import sparse_block_indices

    positions = m.get("max_target_positions") or m.tokens_per_sample
    sparse = set(sparse_block_indices(m))
    if sparse and m.get("tmoe_router", "base") != "base":
        raise ExportError(f"--tmoe-router {m.tmoe_router}: only the paper's Base-layer tMoE routing is exported")
    partial = bool(sparse) and m.smoe_routing == "partial"
    prefix = max(1, int(math.ceil(m.partial_prefix_ratio * positions))) if partial else 0
    if partial and m.get("partial_balance") == "assignment" and m.get("balanced_assignment") == "libbase":
        print("export_hf: warning: this partial-prediction model was trained with --balanced-assignment libbase; the "
              "exported routing uses the torch solver (same optimum; on exact ties the channels may be assigned "
              "differently)")
    return hf_modules().FairseqSmlpConfig(
        vocab_size=vocab_size, hidden_size=m.decoder_embed_dim, max_position_embeddings=positions,
        blocks=["smlp" if i in sparse else "gmlp" for i in range(m.decoder_layers)],
        embed_scale=1.0, position_embedding="none", final_norm=True, dropout=m.dropout,
        ffn_dim=m.decoder_ffn_embed_dim, smoe_experts=m.smoe_experts, smoe_chunk=m.smoe_chunk,
        smoe_routing=m.smoe_routing,
        partial_prefix_length=prefix, partial_balance=m.partial_balance,
        tmoe_experts=m.tmoe_experts, tmoe_ffn_dim=m.tmoe_ffn_embed_dim,
        score_from=prefix, tie_word_embeddings=m.share_decoder_input_output_embed,
    )


UNSUPPORTED_TRANSFORMER_OPTIONS = {
    "adaptive_softmax_cutoff": "an adaptive softmax", "adaptive_input": "adaptive input embeddings",
    "character_embeddings": "character embeddings", "tie_adaptive_weights": "tied adaptive weights",
    "scale_attn": "NormFormer (--scale-attn)", "scale_fc": "NormFormer (--scale-fc)",
    "scale_heads": "NormFormer (--scale-heads)", "scale_resids": "NormFormer (--scale-resids)",
    "cross_self_attention": "--cross-self-attention", "quant_noise_pq": "quantization noise",
}


EXPORTED_ROUTERS = ("top1", "top2", "hash", "none")  # --moe-router values the exported model routes alike


def check_transformer_options(m) -> None:
    for option, what in UNSUPPORTED_TRANSFORMER_OPTIONS.items():
        if m.get(option):
            raise ExportError(
                f"the checkpoint uses {what} (--{option.replace('_', '-')}), which the export does not support"
            )
    if m.get("decoder_layers_to_keep"):
        raise ExportError("--decoder-layers-to-keep: prune the layers before exporting")
    router = m.get("moe_router", "none")
    if router not in EXPORTED_ROUTERS:
        # top1_biased, sinkhorn, causal_balanced: the exported model's routers cannot reproduce them
        raise ExportError(f"--moe-router {router}: the export supports top1, top2 and hash routing")


def transformer_blocks(m, state) -> List[str]:
    """Layer kinds in fairseq's order: MoE FFN every --moe-freq layers, Base layers inserted as fairseq does."""
    from ..models.moe_transformer_lm import is_moe_layer

    layers, router = m.decoder_layers, m.get("moe_router", "none")
    moe_freq = m.get("moe_freq", 0)
    blocks = ["moe" if router != "none" and is_moe_layer(i, moe_freq) else "attention" for i in range(layers)]
    for i in range(m.get("base_layers", 0) or 0):
        blocks.insert(((i + 1) * layers) // (m.base_layers + 1), "base")
    return blocks


# A Base layer with all E experts in one process (moe/base_experts.py) holds them stacked:
# (E, ...) tensors per sublayer. Split into one expert network each, fairseq's BaseLayer naming
# plus an expert index (expert_networks.E.S.*), which the export's BaseLayer takes as experts.E.S.*
STACKED_BASE = re.compile(r"decoder\.layers\.(\d+)\.experts\.sublayers\.(\d+)\.(norm|fc1|fc2)_(weight|bias)")
STACKED_CENTROIDS = re.compile(r"decoder\.layers\.(\d+)\.router\.centroids")


def unstack_base_experts(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """state dict with stacked Base-layer experts -> the same with one network per expert (a new dict)."""
    out = {}
    for key, tensor in state.items():
        stacked, centroids = STACKED_BASE.fullmatch(key), STACKED_CENTROIDS.fullmatch(key)
        if centroids:
            out[f"decoder.layers.{centroids.group(1)}.expert_centroids"] = tensor
        elif stacked:
            layer, sublayer, part, kind = stacked.groups()
            name = {"norm": "norm", "fc1": "ff1", "fc2": "ff2"}[part]
            for e in range(tensor.size(0)):
                # (E, 1, D) vectors -> (D,); (E, in, out) matmul weights -> nn.Linear's (out, in)
                value = tensor[e, 0] if kind == "bias" or part == "norm" else tensor[e].t()
                out[f"decoder.layers.{layer}.expert_networks.{e}.{sublayer}.{name}.{kind}"] = value.contiguous()
        else:
            out[key] = tensor
    return out


def base_experts(state, blocks) -> int:
    """Experts of a Base layer = its centroids; fairseq's BaseLayer holds one expert network per
    worker (only one is in a checkpoint), a one-process Base layer all of them."""
    state = unstack_base_experts(state)
    counts = {state[f"decoder.layers.{i}.expert_centroids"].size(0) for i, kind in enumerate(blocks) if kind == "base"}
    if not counts:
        return 1
    if len(counts) == 1 and any(".expert_networks." in k for k in state):
        return counts.pop()
    if counts != {1}:
        raise ExportError(
            f"Base layers with {max(counts)} centroids but one expert network in the file: fairseq's BaseLayer keeps "
            "one expert per worker and only rank 0 saves, so the other workers' experts are not in this checkpoint"
        )
    return 1


def transformer_config(m, vocab_size: int, state):
    """fairseq transformer_lm (when XGLM does not fit) and moe_transformer_lm (Switch, GShard, HASH, Base)."""
    check_transformer_options(m)
    blocks = transformer_blocks(m, state)
    if m.no_token_positional_embeddings:
        positions = "none"
    else:
        positions = "learned" if m.decoder_learned_pos else "sinusoidal"
    return hf_modules().FairseqSmlpConfig(
        vocab_size=vocab_size, hidden_size=m.decoder_embed_dim, blocks=blocks,
        max_position_embeddings=m.max_target_positions or m.tokens_per_sample,
        embed_scale=1.0 if m.no_scale_embedding else math.sqrt(m.decoder_embed_dim),
        position_embedding=positions, input_dim=m.decoder_input_dim, output_dim=m.decoder_output_dim,
        layernorm_embedding=bool(m.layernorm_embedding), final_norm=not m.no_decoder_final_norm,
        dropout=m.dropout, attention_dropout=m.attention_dropout,
        activation_dropout=max(m.get("activation_dropout", 0) or 0, m.get("relu_dropout", 0) or 0),
        ffn_dim=m.decoder_ffn_embed_dim, num_attention_heads=m.decoder_attention_heads,
        activation_function=m.activation_fn,
        moe_router=m.get("moe_router", "none"),
        moe_experts=m.get("moe_experts", 1),
        moe_expert_ffn_dim=m.get("moe_expert_ffn_dim", 0) or m.decoder_ffn_embed_dim,
        moe_eval_capacity_factor=m.get("moe_eval_capacity_factor", 0.0),
        moe_second_expert_queue=m.get("moe_second_expert_queue", "causal"),  # fairseq's default when not recorded
        base_experts=base_experts(state, blocks), base_sublayers=m.get("base_sublayers", 1),
        tie_word_embeddings=m.share_decoder_input_output_embed,
    )


XGLM_ACTIVATIONS = {
    "relu": "relu", "gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new", "tanh": "tanh",
    "linear": "linear",
}


def xglm_fits(m, pad: int) -> bool:
    """transformers' XGLM is fairseq's transformer_lm (sqrt(d)-scaled embeddings, sinusoidal positions
    offset by padding_idx + 1 = 2, pre-norm, final LayerNorm) when the checkpoint uses nothing else."""
    return (
        m.decoder_input_dim == m.decoder_embed_dim == m.decoder_output_dim and pad == 1
        and not m.decoder_learned_pos and not m.no_token_positional_embeddings and not m.layernorm_embedding
        and not m.no_decoder_final_norm and not (m.get("base_layers", 0) or 0) and m.activation_fn in XGLM_ACTIVATIONS
        and not any(m.get(option) for option in UNSUPPORTED_TRANSFORMER_OPTIONS)
    )


def skip_broken_torchaudio() -> None:
    """fairseq-fixed installs a torchaudio that cannot load next to torch 2.13 (fairseq's LM code
    never imports it), but transformers imports torchaudio whenever it is installed, with its
    native model classes (XGLM). Tell transformers it is absent when it cannot be imported."""
    try:
        import torchaudio  # noqa: F401
    except Exception:
        import transformers.utils
        import transformers.utils.import_utils

        def unavailable():
            return False

        transformers.utils.is_torchaudio_available = unavailable
        transformers.utils.import_utils.is_torchaudio_available = unavailable


def xglm_config(m, vocab_size: int):
    skip_broken_torchaudio()
    from transformers import XGLMConfig

    return XGLMConfig(
        vocab_size=vocab_size, max_position_embeddings=m.max_target_positions or m.tokens_per_sample,
        d_model=m.decoder_embed_dim, ffn_dim=m.decoder_ffn_embed_dim, num_layers=m.decoder_layers,
        attention_heads=m.decoder_attention_heads, activation_function=XGLM_ACTIVATIONS[m.activation_fn],
        dropout=m.dropout, attention_dropout=m.attention_dropout,
        activation_dropout=max(m.get("activation_dropout", 0) or 0, m.get("relu_dropout", 0) or 0),
        layerdrop=m.get("decoder_layerdrop", 0) or 0, scale_embedding=not m.no_scale_embedding,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        tie_word_embeddings=m.share_decoder_input_output_embed,
    )


# ----------------------------------------------------------------------------- rename tables
SMLP_RULES: Rules = [
    (r"decoder\.embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"decoder\.final_norm\.(weight|bias)", r"model.final_norm.\1"),
    (r"decoder\.output_projection\.weight", "lm_head.weight"),
    (r"decoder\.layers\.(\d+)\.(.+)", r"model.layers.\1.\2"),  # the exported blocks keep fairseq-smlp's names
]
TRANSFORMER_RULES: Rules = [
    (r"decoder\.embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"decoder\.embed_positions\.weight", "model.embed_positions.weight"),  # learned positions
    (r"decoder\.project_in_dim\.weight", "model.project_in.weight"),
    (r"decoder\.project_out_dim\.weight", "model.project_out.weight"),
    (r"decoder\.layernorm_embedding\.(weight|bias)", r"model.layernorm_embedding.\1"),
    (r"decoder\.layer_norm\.(weight|bias)", r"model.final_norm.\1"),
    (r"decoder\.output_projection\.weight", "lm_head.weight"),
    # the MoE FFN, in fairseq's fc1 slot
    (r"decoder\.layers\.(\d+)\.fc1\.(router|experts)\.(.+)", r"model.layers.\1.moe.\2.\3"),
    (r"decoder\.layers\.(\d+)\.expert_centroids", r"model.layers.\1.centroids"),  # Base layer
    (r"decoder\.layers\.(\d+)\.expert_network\.(\d+)\.(.+)", r"model.layers.\1.experts.0.\2.\3"),  # its one expert
    # all E experts of a one-process Base layer (unstack_base_experts)
    (r"decoder\.layers\.(\d+)\.expert_networks\.(\d+)\.(.+)", r"model.layers.\1.experts.\2.\3"),
    (r"decoder\.layers\.(\d+)\.(.+)", r"model.layers.\1.\2"),  # attention, norms, dense fc1/fc2
]
XGLM_RULES: Rules = [
    (r"decoder\.embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"decoder\.layer_norm\.(weight|bias)", r"model.layer_norm.\1"),
    (r"decoder\.output_projection\.weight", "lm_head.weight"),
    (r"decoder\.layers\.(\d+)\.(.+)", r"model.layers.\1.\2"),
]


@dataclass
class Export:
    """What one family exports to: a transformers config, its model class, the key renames."""

    config: object
    model_class: type
    rules: Rules
    native: bool  # a class transformers ships (no remote code)


def smlp_export(m, vocab_size, state):
    return Export(smlp_config(m, vocab_size), hf_modules().FairseqSmlpForCausalLM, SMLP_RULES, native=False)


def transformer_lm_export(m, vocab_size, state):
    if xglm_fits(m, pad=1):
        skip_broken_torchaudio()
        from transformers import XGLMForCausalLM

        return Export(xglm_config(m, vocab_size), XGLMForCausalLM, XGLM_RULES, native=True)
    return moe_transformer_export(m, vocab_size, state)


def moe_transformer_export(m, vocab_size, state):
    config = transformer_config(m, vocab_size, state)
    return Export(config, hf_modules().FairseqSmlpForCausalLM, TRANSFORMER_RULES, native=False)


FAMILIES: Dict[str, Callable] = {
    "smlp_lm": smlp_export,  # sMLP (both routings) and dense gMLP
    "transformer_lm": transformer_lm_export,  # dense Transformer: XGLM when it fits
    "moe_transformer_lm": moe_transformer_export,  # Switch, GShard, HASH, Base Layers
}


def plan_export(state: dict) -> Export:
    model_cfg = state["cfg"]["model"]
    vocab_size = state["model"]["decoder.embed_tokens.weight"].size(0)
    return FAMILIES[model_family(model_cfg)](model_cfg, vocab_size, state["model"])


def build_hf_model(state: dict, plan: Export):
    """The transformers model holding the checkpoint's weights (built on the meta device, then filled)."""
    with torch.device("meta"):
        model = plan.model_class(plan.config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    weights = map_state_dict(unstack_base_experts(state["model"]), plan.rules, expected)
    model.load_state_dict(weights, strict=True, assign=True)
    if plan.config.tie_word_embeddings:  # one tensor again (assign=True loaded two equal copies)
        if not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"]):
            raise ExportError("the checkpoint says input and output embeddings are shared, but they differ")
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
