"""Cross-entropy for MoE language models: token loss + weighted router auxiliary losses,
with the routing health of the MoE layers in the training log.

Log fields (loads as shares of a perfectly balanced load: 1.0 = balanced):
    moe_load_max   the most loaded expert of any layer        moe_load_min  the least loaded
    moe_unused     experts that got nothing, summed over layers
    moe_aux        the layers' auxiliary losses, summed       moe_dropped   the largest share of
                                                                            tokens a layer dropped
    moe_bias_range the largest max - min of a top1_biased router's selection bias over layers
    moe_entropy    the lowest normalised load entropy of any layer (moe/health.py: 1 = every
                   expert equally loaded, 0 = one expert takes all), a batch's load each,
                   averaged over batches
    moe_changed    validation only, from the second validation on: the share of the routed
                   tokens whose first-choice expert differs from the previous validation's
                   (all token-routing layers pooled; sums of tokens, exact over the batches)
and per layer `moe/L{block}_{feature_moe|spatial_moe|...}_{load_max,load_min,unused,aux,dropped,
entropy,bias_range,changed}`, which only the JSON log and TensorBoard (--tensorboard-logdir)
show (fairseq_patches.py).
"""
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from ..moe.health import load_entropy
from ..validation import check_value
from .fused_output_loss import LinearCrossEntropy, fused_output_weight

PER_LAYER_PREFIX = "moe/"  # per-layer routing figures: JSON log and TensorBoard only (fairseq_patches.py)
CHANGED, COMPARED = "changed", "compared"  # token counts; logged as the share changed / compared


def without_per_layer(stats: dict) -> dict:
    """The stats of the plain log line (simple, tqdm): the routing summary without the per-layer
    figures, which are a hundred fields at 9b (the JSON log and TensorBoard keep them)."""
    return {k: v for k, v in stats.items() if not k.startswith(PER_LAYER_PREFIX)}


@dataclass
class MoECrossEntropyConfig(FairseqDataclass):
    moe_aux_loss_weight: float = field(
        default=0.01, metadata={"help": "weight of the routers' load-balancing losses (Switch/GShard: 0.01)"}
    )
    no_fused_output_loss: bool = field(
        default=False,
        metadata={"help": "training: compute the output projection and log-softmax separately instead of fused "
                          "(same numbers, slower; see criterions/fused_output_loss.py)"},
    )


def layer_statistics(stats) -> dict:
    """Load of one router on one batch, as shares of a perfectly balanced load (1.0)."""
    counts = stats.expert_counts.float()
    share = counts * counts.numel() / counts.sum().clamp(min=1)
    out = {
        "load_max": share.max().item(), "load_min": share.min().item(), "unused": (counts == 0).sum().item(),
        "entropy": load_entropy(counts).item(),
    }
    if stats.aux_loss is not None:
        out["aux"] = stats.aux_loss.item()
    if stats.dropped is not None:
        out["dropped"] = (stats.dropped.float() / stats.total.float().clamp(min=1)).item()
    if getattr(stats, "bias_range", None) is not None:
        out["bias_range"] = stats.bias_range.item()
    if getattr(stats, "compared", None) is not None:
        out[CHANGED], out[COMPARED] = stats.changed.item(), stats.compared.item()
    return out


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyConfig)
class MoECrossEntropyCriterion(FairseqCriterion):
    """loss = sum of token NLL over scored positions + w * sum_layers aux * scored tokens.

    The auxiliary losses are per-token means, so they are scaled by the number of scored
    tokens to survive fairseq's division of the loss by the sample size. Positions before
    the model's `score_from` (partial-prediction routing) are not scored.
    """

    honours_score_from = True  # positions before the model's score_from are not scored (tasks check it)

    def __init__(self, task, moe_aux_loss_weight, no_fused_output_loss=False):
        super().__init__(task)
        check_value("--moe-aux-loss-weight", moe_aux_loss_weight)
        self.aux_weight = moe_aux_loss_weight
        self.fused = not no_fused_output_loss

    def forward(self, model, sample, reduce=True):
        weight = fused_output_weight(model) if self.fused and model.training else None
        net_output = model(**sample["net_input"], features_only=weight is not None)
        extra = net_output[1] if isinstance(net_output[1], dict) else {}
        target = model.get_targets(sample, net_output)
        score_from = extra.get("score_from", 0)
        if score_from > 0:
            target = target.clone()
            target[:, :score_from] = self.padding_idx
        if weight is not None:  # net_output[0]: features (B, T, H)
            features = net_output[0]
            rows = features.reshape(-1, features.size(-1))
            nll = LinearCrossEntropy.apply(rows, weight, target.reshape(-1), self.padding_idx)
        else:
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
            nll = F.nll_loss(
                lprobs.view(-1, lprobs.size(-1)), target.reshape(-1), ignore_index=self.padding_idx, reduction="sum"
            )
        scored = int(target.ne(self.padding_idx).sum())

        moe_stats = extra.get("moe_stats", [])
        aux_losses = [s.aux_loss for s in moe_stats if s.aux_loss is not None]
        aux = torch.stack(aux_losses).sum().float() if aux_losses else nll.new_zeros(())
        loss = nll + self.aux_weight * aux * scored

        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "ntokens": sample["ntokens"],
            "nscored": scored,
            "nsentences": sample["target"].size(0),
            "sample_size": scored,
            "moe_batches": 1,
        }
        logging_output.update(routing_log(moe_stats))
        return loss, scored, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sums = defaultdict(float)
        for log in logging_outputs:
            for key, value in log.items():
                sums[key] += float(value)
        scored, sample_size = sums["nscored"], sums["sample_size"]
        # base 2, as fairseq's cross_entropy
        metrics.log_scalar("loss", sums["loss"] / max(sample_size, 1) / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", sums["nll_loss"] / max(scored, 1) / math.log(2), scored, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        batches = max(sums["moe_batches"], 1)
        keys = [k for k in sums if (k.startswith("moe_") and k != "moe_batches") or k.startswith(PER_LAYER_PREFIX)]
        for key in sorted(keys):
            if key.endswith(COMPARED):
                continue
            if key.endswith(CHANGED):  # token counts: the share of all compared tokens
                compared = sums[key[: -len(CHANGED)] + COMPARED]
                metrics.log_scalar(key, sums[key] / max(compared, 1), compared, round=4)
                continue
            # per-batch values averaged over batches (and workers)
            metrics.log_scalar(key, sums[key] / batches, batches, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def routing_log(moe_stats) -> dict:
    """Per-layer figures and their summary over layers, for one batch."""
    log, layers = {}, [layer_statistics(s) for s in moe_stats]
    for s, figures in zip(moe_stats, layers):
        for key, value in figures.items():
            log[f"{PER_LAYER_PREFIX}{_layer_name(s.layer)}_{key}"] = value
    if layers:
        log["moe_load_max"] = max(f["load_max"] for f in layers)
        log["moe_load_min"] = min(f["load_min"] for f in layers)
        log["moe_unused"] = sum(f["unused"] for f in layers)
        aux = [f["aux"] for f in layers if "aux" in f]
        if aux:
            log["moe_aux"] = sum(aux)
        dropped = [f["dropped"] for f in layers if "dropped" in f]
        if dropped:
            log["moe_dropped"] = max(dropped)
        bias_range = [f["bias_range"] for f in layers if "bias_range" in f]
        if bias_range:
            log["moe_bias_range"] = max(bias_range)
        log["moe_entropy"] = min(f["entropy"] for f in layers)
        compared = [f for f in layers if COMPARED in f]
        if compared:
            log[f"moe_{CHANGED}"] = sum(f[CHANGED] for f in compared)
            log[f"moe_{COMPARED}"] = sum(f[COMPARED] for f in compared)
    return log


def _layer_name(layer: str) -> str:
    """decoder.layers.1.feature_moe.router -> L1_feature_moe"""
    parts = layer.split(".")
    index = parts[parts.index("layers") + 1] if "layers" in parts else "?"
    kind = next((name for part, name in _KINDS.items() if part in parts), parts[-1])
    return f"L{index}_{kind}"


# a part of the router's module name -> the kind of MoE it routes
_KINDS = {"feature_moe": "feature_moe", "gate": "spatial_moe", "fc1": "ffn_moe", "base_layer": "base_layer"}
