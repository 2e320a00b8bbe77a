"""fairseq-smlp: sparse all-MLP language models for fairseq (--user-dir fairseq_smlp)."""
from . import fairseq_patches  # first: fairseq 0.12 on numpy 2 / torch >= 2.6
from . import criterions, models, tasks  # noqa: F401  (importing registers them)

fairseq_patches.install()
