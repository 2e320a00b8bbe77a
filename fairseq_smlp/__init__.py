"""fairseq-smlp: sparse all-MLP language models for fairseq (--user-dir fairseq_smlp)."""
from . import compat  # noqa: F401  (first: fairseq 0.12 on numpy 2 / torch >= 2.6)
from . import checkpoint_io, startup_checks
from . import criterions, models, tasks  # noqa: F401  (importing registers them)

checkpoint_io.install()  # atomic checkpoint copies; a corrupt checkpoint is named in the error
startup_checks.install()  # bad flags refused before --save-dir is created
