from . import smlp_language_modeling  # noqa: F401
