"""fairseq's own BaseLayer (Base Layers, Lewis et al. 2021) for runs with several workers:
one expert per worker, E = W. One process holds all E experts in BaseExpertsLayer instead
(moe/base_experts.py); `build_base_layer` picks between the two.
"""
import contextlib
from unittest import mock

import torch
from fairseq.distributed import utils as distributed_utils
from fairseq.modules import base_layer

from .base_experts import BaseExpertsLayer
from .router import RoutingStats, check_finite


class FairseqBaseLayer(base_layer.BaseLayer):
    """fairseq's BaseLayer (Base Layers, Lewis et al. 2021), one expert per worker, that
    also runs in a single process (then: one expert, the identity all-to-all).

    Its maths are fairseq's; this subclass only (1) supplies rank 0 and the local
    all-to-all when torch.distributed is not initialised, and (2) records the expert load
    of each batch for the training log.
    """

    def __init__(self, args):
        with base_layer_as_only_worker():
            super().__init__(args)
        self.name = "base_layer"
        self.last_stats = None
        if self.num_workers > 1:
            # this worker's expert differs from the others': every rank saves its own file
            # (checkpoints/rank_files.py), as for sharded ExpertFFNs; fairseq made every rank
            # write the same checkpoint_*.pt, keeping one expert of W
            for p in self.expert_network.parameters():
                p.expert_sharded = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Refuse, with the fix, a checkpoint saved by another number of workers."""
        saved = state_dict.get(prefix + "expert_centroids")
        if saved is not None and saved.size(0) != self.num_workers:
            raise ValueError(
                f"{prefix}expert_centroids holds {saved.size(0)} experts but fairseq's BaseLayer here has one per "
                f"worker ({self.num_workers}): the checkpoint was saved by {saved.size(0)} workers; resume on "
                f"{saved.size(0)} workers, or convert it for one process with "
                "`python -m fairseq_smlp.checkpoints reshard CKPT --to-world-size 1 --out NEW.pt`"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_features, *args, **kwargs):
        # fairseq's code multiplies the input with the centroids outside autocast's cast lists
        # (`mv`): give it the weights' dtype (fp32 under autocast, fp16/bf16 under --fp16/--bf16),
        # else "expected m1 and m2 to have the same dtype"
        if self.num_workers > 1 and input_features.requires_grad:
            self._check_equal_token_counts(input_features.numel() // input_features.size(-1))
        with base_layer_as_only_worker():
            result, *rest = super().forward(input_features.to(self.expert_centroids.dtype), *args, **kwargs)
        return (result.to(input_features.dtype), *rest)

    def _check_equal_token_counts(self, tokens: int) -> None:
        """fairseq's training path exchanges equal blocks (shuffle, balanced assignment): with
        unequal token counts on the workers (an epoch's last, smaller batch) gloo aborted a
        worker (SIGABRT) and NCCL would hang. All workers compare counts and stop together."""
        counts = torch.tensor([tokens], device=self.expert_centroids.device)
        gathered = [torch.zeros_like(counts) for _ in range(self.num_workers)]
        torch.distributed.all_gather(gathered, counts, group=distributed_utils.get_data_parallel_group())
        counts = [int(c) for c in gathered]
        if len(set(counts)) > 1 or counts[0] % self.num_workers:
            raise ValueError(
                f"{self.name}: fairseq's BaseLayer trains only on the same number of tokens on every worker, a multiple "
                f"of the {self.num_workers} workers; this batch has {counts} (an epoch's last batch?). Keep every batch "
                "full (--sample-break-mode none with --max-tokens a multiple of --tokens-per-sample, and fewer updates "
                "than an epoch), or use the single-process Base layer"
            )

    def balanced_assignment(self, scores):
        """Balanced: each expert gets an equal share of this worker's tokens.

        With one expert every token goes to it; libbase's auction needs two experts to
        bid between (it fails with one), so that trivial answer is given directly.
        fairseq would quietly replace NaN scores by the minimum: stop with the layer's name instead.
        """
        scores = scores.float()  # fp16 scores: libbase's auction bids in fp32
        check_finite(scores, self.name)
        if self.num_workers == 1:
            result = torch.arange(scores.size(0), device=scores.device), None, None
        else:
            result = super().balanced_assignment(scores)
        counts = torch.full((self.num_workers,), scores.size(0) / self.num_workers, device=scores.device)
        self._record(counts)
        return result

    def greedy_assignment(self, scores, k=1):
        check_finite(scores, self.name)
        sort_by_expert, input_splits, output_splits = super().greedy_assignment(scores, k)
        self._record(torch.tensor(output_splits, dtype=torch.float, device=scores.device))
        return sort_by_expert, input_splits, output_splits

    def _record(self, counts: torch.Tensor) -> None:
        """counts: (workers,) tokens this worker sends to each expert."""
        self.last_stats = RoutingStats(layer=self.name, expert_counts=counts)


def build_base_layer(cfg, args):
    """The Base layer for this run: all E experts in this process when it is the only
    worker, fairseq's BaseLayer (one expert per worker) with several workers.
    cfg: fairseq's TransformerConfig; args: the model's arguments (our own fields)."""
    experts = args.base_experts or 0
    workers = distributed_utils.get_data_parallel_world_size()
    if workers == 1 and experts >= 1:
        return BaseExpertsLayer(
            cfg.decoder.embed_dim, cfg.decoder.ffn_embed_dim, experts, cfg.base_sublayers,
            activation=str(cfg.activation_fn), dropout=args.expert_dropout or 0.0,
        )
    if experts not in (0, workers):
        raise ValueError(
            f"--base-experts {experts} with {workers} data-parallel workers: fairseq's BaseLayer, used when there are "
            f"several workers, holds one expert per worker; set --base-experts {workers} (or 0)"
        )
    return FairseqBaseLayer(cfg)




def check_base_layer_layout(model, state_dict) -> None:
    """A checkpoint of fairseq's BaseLayer (W workers, one expert each) loaded where the Base
    layer holds all its experts in one process failed on key names: say why and how to convert it."""
    saved = sorted(k for k in state_dict if k.endswith(".expert_centroids"))
    fairseq_layers = any(isinstance(m, FairseqBaseLayer) for m in model.modules())
    if saved and not fairseq_layers:
        workers = state_dict[saved[0]].size(0)
        raise ValueError(
            f"{saved[0]}: the checkpoint holds fairseq's BaseLayer of {workers} workers (one expert per worker, one rank "
            "file each) but this process holds every expert of a Base layer itself: convert the rank files with "
            f"`python -m fairseq_smlp.checkpoints reshard CKPT --to-world-size 1 --out NEW.pt`"
        )


class _LocalAll2All(torch.autograd.Function):
    """All-to-all among one worker: every token stays where it is."""

    @staticmethod
    def forward(ctx, xs, input_splits=None, output_splits=None):
        return xs.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


@contextlib.contextmanager
def base_layer_as_only_worker():
    """fairseq's BaseLayer asks torch.distributed for its rank and all-to-all even in one
    process: give it rank 0 and the identity all-to-all while no process group exists (one
    process, e.g. tests or --base-experts 0); nothing changes when torch.distributed is set up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    from fairseq.distributed import utils as distributed_utils
    from fairseq.modules import base_layer

    with mock.patch.object(distributed_utils, "get_data_parallel_rank", lambda: 0), mock.patch.object(base_layer, "All2All", _LocalAll2All):
        yield
