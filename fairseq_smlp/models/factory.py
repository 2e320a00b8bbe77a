"""Models built without data: the one offline model factory that flops, dry_run, reshard, the
benchmarks and the tests use.

fairseq builds a model from its parsed config and a task, of which build_model reads only the
dictionaries: `offline_task` supplies those. Models are built with all their experts and no
process group; `world_size=W` then applies expert parallelism explicitly, as rank 0 of W
workers (distributed/expert_parallel.py, parallelize_experts): rank 0's shapes, fairseq's own
BaseLayer with its one expert of W.
"""
import warnings
from types import SimpleNamespace

import torch

from ..distributed.expert_parallel import parallelize_experts

DEFAULT_VOCAB = 51200


def default_seq_len(arch: str) -> int:
    """The sequence length an arch is compared at: tiny 128, otherwise 1,024 tokens."""
    return 128 if arch.endswith("_tiny") else 1024


def offline_dictionary(size: int):
    """A fairseq Dictionary of `size` symbols (the specials, then w0, w1, ...)."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for i in range(size - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    if len(dictionary) != size:
        raise ValueError(f"--vocab must be >= {len(dictionary)} (the special symbols), got {size}")
    return dictionary


def offline_task(vocab_size: int, task_cfg=None):
    """What build_model reads from a task: the dictionaries (and the task's config, if any)."""
    dictionary = offline_dictionary(vocab_size)
    return SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary, scores_partial_prediction=True,
                           cfg=task_cfg, args=task_cfg)


def build_from_config(cfg, vocab_size: int = DEFAULT_VOCAB, world_size: int = 1, device: str = "meta", task=None):
    """fairseq's models.build_model(cfg.model, task) on `device` (meta: shapes only, no memory),
    then distributed as rank 0 of `world_size` data-parallel workers (no process group)."""
    from fairseq import models

    task = task or offline_task(vocab_size, getattr(cfg, "task", None))
    with torch.device(device):
        model = models.build_model(cfg.model, task)
        return parallelize_experts(model, world_size, 0) if world_size > 1 else model


def parse_model_config(arch: str, model_args=(), seq_len: int = None):
    """The full cfg fairseq-train would parse for `--arch ARCH model_args` (no data read)."""
    import fairseq_smlp  # noqa: F401  (registers the plugin's models)
    from fairseq import models, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    if arch not in models.ARCH_MODEL_REGISTRY:
        raise ValueError(f"--arch {arch} is not a registered architecture")
    argv = ["/nonexistent-data", "--task", "language_modeling", "--arch", arch,
            "--tokens-per-sample", str(seq_len or default_seq_len(arch)), *model_args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hydra's deprecation notices
        return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))


def build_model(arch: str, model_args=(), seq_len: int = None, vocab: int = DEFAULT_VOCAB, world_size: int = 1,
                device: str = "meta", task=None):
    """Parse `--arch ARCH model_args` as fairseq-train does and build the model on `device`
    (meta: shapes only), as rank 0 of `world_size` workers. Returns (model, seq_len)."""
    seq_len = seq_len or default_seq_len(arch)
    cfg = parse_model_config(arch, model_args, seq_len)
    return build_from_config(cfg, vocab, world_size, device, task or offline_task(vocab)), seq_len
