"""Cross-entropy for MoE language models: token loss + weighted router auxiliary losses,
with the routing statistics of every MoE layer in the training log."""
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from .fused_output_loss import LinearCrossEntropy, fused_output_weight


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
    out = {"load_max": share.max().item(), "load_min": share.min().item(), "unused": (counts == 0).sum().item()}
    if stats.aux_loss is not None:
        out["aux"] = stats.aux_loss.item()
    if stats.dropped is not None:
        out["dropped"] = (stats.dropped.float() / stats.total.float().clamp(min=1)).item()
    return out


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyConfig)
class MoECrossEntropyCriterion(FairseqCriterion):
    """loss = sum of token NLL over scored positions + w * sum_layers aux * scored tokens.

    The auxiliary losses are per-token means, so they are scaled by the number of scored
    tokens to survive fairseq's division of the loss by the sample size. Positions before
    the model's `score_from` (partial-prediction routing) are not scored.
    """

    def __init__(self, task, moe_aux_loss_weight, no_fused_output_loss=False):
        super().__init__(task)
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
            nll = LinearCrossEntropy.apply(features.reshape(-1, features.size(-1)), weight, target.reshape(-1), self.padding_idx)
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
        for s in moe_stats:
            for key, value in layer_statistics(s).items():
                logging_output[f"moe.{s.layer}.{key}"] = value
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
        for key in sorted(k for k in sums if k.startswith("moe.")):
            # per-batch values averaged over batches (and workers)
            metrics.log_scalar(_short_name(key), sums[key] / batches, batches, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _short_name(key: str) -> str:
    """moe.decoder.layers.1.feature_moe.router.load_max -> moe_L1_feature_moe_load_max"""
    parts = key.split(".")
    layer = parts[parts.index("layers") + 1] if "layers" in parts else "?"
    kind = "feature_moe" if "feature_moe" in parts else ("spatial_moe" if "gate" in parts else parts[-2])
    return f"moe_L{layer}_{kind}_{parts[-1]}"
