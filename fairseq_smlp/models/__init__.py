from . import smlp_lm  # noqa: F401
from . import gmlp_archs, moe_transformer_lm  # noqa: F401  (baselines: gmlp_lm_*, switch/gshard/hash/base/transformer_lm_*)
