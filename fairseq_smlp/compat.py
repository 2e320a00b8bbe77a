"""Keep fairseq 0.12 working with the current numpy and torch (imported before anything else)."""
import os
import types

import numpy as np

# numpy 2 removed np.compat; fairseq 0.12's TokenBlockDataset (used by fairseq-interactive and
# hub generation for language models) still reads np.compat.long.
if "compat" not in np.__dict__:
    np.compat = types.SimpleNamespace(long=np.int64)

# torch >= 2.6 loads checkpoints with weights_only=True by default and refuses fairseq's
# (they hold omegaconf configs), which breaks resuming and fairseq-eval-lm. Checkpoints are
# trusted files of the user's own runs; an explicit setting by the user still wins.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
