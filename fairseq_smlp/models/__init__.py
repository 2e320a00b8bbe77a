from . import smlp_lm  # noqa: F401
