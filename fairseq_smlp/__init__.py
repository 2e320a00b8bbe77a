"""fairseq-smlp: sparse all-MLP language models for fairseq (--user-dir fairseq_smlp)."""
from . import criterions, models, tasks  # noqa: F401  (importing registers them)
