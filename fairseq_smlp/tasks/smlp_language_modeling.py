"""language_modeling that knows which positions a model may be scored on.

Identical to fairseq's `language_modeling` for every model whose outputs are causal.
With partial-prediction routing the first P positions of each block fed the router and
are not predictions; this task makes fairseq-eval-lm score positions >= P only (and
says so), as the training criterion does.
"""
import logging
import os

from fairseq.data import BaseWrapperDataset
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

logger = logging.getLogger(__name__)


class ScoreFromDataset(BaseWrapperDataset):
    """Marks every sample of a batch as scored from position `score_from` on
    (fairseq's SequenceScorer reads `start_indices`)."""

    def __init__(self, dataset, score_from: int):
        super().__init__(dataset)
        self.score_from = score_from

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if "net_input" in batch:
            batch["start_indices"] = [self.score_from] * batch["target"].size(0)
        return batch


def check_sample_fits(tokens_per_sample: int, max_positions) -> None:
    """fairseq-train skips every block longer than the model's window without a word (and
    then stops with "The dataset is empty"); refuse the flags instead."""
    if isinstance(max_positions, int) and tokens_per_sample > max_positions:
        raise ValueError(
            f"--tokens-per-sample {tokens_per_sample} exceeds the model's {max_positions} positions "
            f"(--max-target-positions; for sMLP the size of its spatial matrices), so every block would be "
            f"skipped: pass --tokens-per-sample {max_positions} or less (or, when training, a larger "
            f"--max-target-positions)"
        )


def check_criterion_scores_from(criterion, score_from: int, name=None) -> None:
    """With partial-prediction routing only a criterion that leaves out the positions before
    the model's `score_from` may train it (a criterion declares it: `honours_score_from = True`);
    fairseq's cross_entropy would silently train on positions that saw the future."""
    if score_from > 0 and not getattr(criterion, "honours_score_from", False):
        name = name or type(criterion).__name__
        raise ValueError(
            f"--criterion {name} scores every position, but with --smoe-routing partial the first {score_from} "
            f"positions of each block fed the router (they saw later tokens) and must not be trained on: "
            f"use --criterion moe_cross_entropy"
        )


@register_task("smlp_language_modeling", dataclass=LanguageModelingConfig)
class SmlpLanguageModelingTask(LanguageModelingTask):
    scores_partial_prediction = True  # models may rely on it (see SmlpLanguageModel.build_model)

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        check_sample_fits(self.args.tokens_per_sample, model.max_positions())
        model.dictionary_file = os.path.join(self.args.data.split(os.pathsep)[0], "dict.txt")  # named in load errors
        self.score_from = getattr(model.decoder, "score_from", 0)
        return model

    def build_criterion(self, cfg):
        """Refuse a criterion that would score the routing prefix (positions that saw the future)."""
        criterion = super().build_criterion(cfg)
        check_criterion_scores_from(criterion, getattr(self, "score_from", 0), getattr(cfg, "_name", None))
        return criterion

    def eval_lm_dataloader(self, dataset, *args, context_window: int = 0, **kwargs):
        max_positions = kwargs.get("max_positions")
        if max_positions is not None and self.args.tokens_per_sample > max_positions:
            # fairseq would silently skip every block longer than the model's window
            raise ValueError(
                f"--tokens-per-sample {self.args.tokens_per_sample} exceeds the model's "
                f"{max_positions} positions (its spatial matrices); pass --tokens-per-sample {max_positions}"
            )
        score_from = getattr(self, "score_from", 0)
        if score_from > 0:
            if context_window > 0:
                raise ValueError(
                    "--context-window is not supported with partial-prediction routing: the routing "
                    "prefix already fixes which positions are scored"
                )
            logger.info(
                f"partial prediction: perplexity over positions >= {score_from} of each block only "
                f"(positions < {score_from} fed the sMoE router and are not predictions)"
            )
            dataset = ScoreFromDataset(dataset, score_from)
        return super().eval_lm_dataloader(dataset, *args, context_window=context_window, **kwargs)
