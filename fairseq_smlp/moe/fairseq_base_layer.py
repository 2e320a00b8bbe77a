"""fairseq's own BaseLayer (Base Layers, Lewis et al. 2021) for runs with several workers:
one expert per worker, E = W. One process holds all E experts in BaseExpertsLayer instead
(moe/base_experts.py); with W workers expert parallelism (distributed/expert_parallel.py,
parallelize_experts) puts this layer in its place, rank r holding expert r.
"""
import contextlib
from types import SimpleNamespace
from unittest import mock

import torch
import torch.nn as nn
from fairseq.distributed import utils as distributed_utils
from fairseq.modules import base_layer

from .router import RoutingStats, check_finite


class FairseqBaseLayer(base_layer.BaseLayer):
    """fairseq's BaseLayer (Base Layers, Lewis et al. 2021), one expert per worker, that
    also runs in a single process (then: one expert, the identity all-to-all).

    Its maths are fairseq's; this subclass only (1) is built without a process group, for one
    worker, and made a W-worker layer by `shard_experts`; (2) supplies the local all-to-all when
    torch.distributed is not initialised; (3) records the expert load of each batch for the
    training log.
    """

    def __init__(self, args):
        # fairseq's BaseLayer.__init__, for one worker: fairseq's asks the process group for the
        # worker count and this worker's rank. Same parameters, same order of initialisation.
        nn.Module.__init__(self)
        self.num_workers, self.expert_id = 1, 0
        expert_centroids = torch.empty(self.num_workers, args.decoder_embed_dim)
        torch.nn.init.orthogonal_(expert_centroids, gain=0.1)
        self.register_parameter("expert_centroids", torch.nn.Parameter(expert_centroids))
        self.expert_network = nn.Sequential(*([base_layer.BaseSublayer(args) for _ in range(args.base_sublayers)]))
        self.shuffle = args.base_shuffle
        self.cpp = self.load_assignment()
        for param in self.expert_network.parameters():
            param.expert = True  # fairseq's legacy_ddp does not sync their gradients
        self.name = "base_layer"
        self.last_stats = None

    def shard_experts(self, world_size: int, rank: int) -> None:
        """One expert per worker for `world_size` workers, this one rank `rank`'s (parallelize_experts
        calls this once, after the model is built). The W centroids are drawn as fairseq draws them,
        from the random state every worker shares; each worker keeps the expert it was built with."""
        if world_size == 1:
            return
        if self.num_workers > 1:
            raise RuntimeError(f"{self.name} is already spread over {self.num_workers} workers")
        old = self.expert_centroids
        centroids = torch.empty(world_size, old.size(1), dtype=old.dtype, device=old.device)
        torch.nn.init.orthogonal_(centroids, gain=0.1)
        self.expert_centroids = nn.Parameter(centroids)
        self.num_workers, self.expert_id = world_size, rank
        self._mark_own_expert()

    @classmethod
    def from_experts(cls, layer, world_size: int, rank: int) -> "FairseqBaseLayer":
        """fairseq's BaseLayer for rank `rank` of `world_size` workers holding expert `rank` of
        `layer` (a BaseExpertsLayer with E = W experts) and all its centroids: the layout of
        a W-worker run, whose rank files `reshard --to-world-size 1` merges back into `layer`'s.

            router.centroids (W, H)                      -> expert_centroids (W, H)
            experts.sublayers.s.norm_{weight,bias}[r] (1, H) -> expert_network.s.norm.{weight,bias} (H)
            experts.sublayers.s.fc1_weight[r] (H, F)     -> expert_network.s.ff1.weight (F, H)
            experts.sublayers.s.fc1_bias[r] (1, F)       -> expert_network.s.ff1.bias (F)
            experts.sublayers.s.fc2_weight[r] (F, H)     -> expert_network.s.ff2.weight (H, F)
            experts.sublayers.s.fc2_bias[r] (1, H)       -> expert_network.s.ff2.bias (H)
        """
        stacks = layer.experts.sublayers
        embed_dim, ffn_dim = stacks[0].fc1_weight.shape[1:]
        args = SimpleNamespace(decoder_embed_dim=embed_dim, decoder_ffn_embed_dim=ffn_dim, base_sublayers=len(stacks),
                               activation_fn=layer.activation, base_shuffle=layer.shuffle)
        with torch.device("meta"):  # every parameter is replaced below: no memory, no random numbers
            new = cls(args)
        new.num_workers, new.expert_id, new.name = world_size, rank, layer.router.name

        def take(tensor):
            return nn.Parameter(tensor.detach().clone())

        new.expert_centroids = take(layer.router.centroids)
        for sub, stacked in zip(new.expert_network, stacks):
            sub.norm.weight, sub.norm.bias = take(stacked.norm_weight[rank, 0]), take(stacked.norm_bias[rank, 0])
            sub.ff1.weight, sub.ff1.bias = take(stacked.fc1_weight[rank].t()), take(stacked.fc1_bias[rank, 0])
            sub.ff2.weight, sub.ff2.bias = take(stacked.fc2_weight[rank].t()), take(stacked.fc2_bias[rank, 0])
        for param in new.expert_network.parameters():
            param.expert = True
        new._mark_own_expert()
        return new

    def _mark_own_expert(self) -> None:
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
                f"{self.name}: fairseq's BaseLayer trains only on the same number of tokens on every worker, a "
                f"multiple of the {self.num_workers} workers; this batch has {counts} (an epoch's last batch?). Keep "
                "every batch full (--sample-break-mode none with --max-tokens a multiple of --tokens-per-sample, and "
                "fewer updates than an epoch), or use the single-process Base layer"
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


def check_base_layer_layout(model, state_dict) -> None:
    """A checkpoint of fairseq's BaseLayer (W workers, one expert each) loaded where the Base
    layer holds all its experts in one process failed on key names: say why and how to convert it."""
    saved = sorted(k for k in state_dict if k.endswith(".expert_centroids"))
    fairseq_layers = any(isinstance(m, FairseqBaseLayer) for m in model.modules())
    if saved and not fairseq_layers:
        workers = state_dict[saved[0]].size(0)
        raise ValueError(
            f"{saved[0]}: the checkpoint holds fairseq's BaseLayer of {workers} workers (one expert per worker, one "
            "rank file each) but this process holds every expert of a Base layer itself: convert the rank files with "
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
    """fairseq's BaseLayer calls torch.distributed's all-to-all even in one process: give it
    the identity all-to-all while no process group exists (one process, e.g. tests or
    --base-experts 0); nothing changes when torch.distributed is set up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with mock.patch.object(base_layer, "All2All", _LocalAll2All):
        yield
